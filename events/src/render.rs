//! Events for people and scripts: one JSON object per event (`corral events --json`, the audit
//! log) and one readable line (`corral events`).

use corral_proto::v1 as pb;
use serde_json::{Value, json};

pub fn verdict_name(v: i32) -> &'static str {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Allow) => "allow",
        Ok(pb::Verdict::Deny) => "deny",
        Ok(pb::Verdict::AuditDeny) => "audit-deny",
        _ => "unspecified",
    }
}

pub fn reason_name(r: i32) -> &'static str {
    match pb::Reason::try_from(r) {
        Ok(pb::Reason::Rule) => "rule",
        Ok(pb::Reason::Default) => "default",
        Ok(pb::Reason::Chaining) => "chaining",
        Ok(pb::Reason::Grant) => "grant",
        Ok(pb::Reason::NoPolicy) => "no-policy",
        Ok(pb::Reason::Containment) => "containment",
        _ => "unspecified",
    }
}

pub fn grant_state_name(s: i32) -> &'static str {
    match pb::GrantState::try_from(s) {
        Ok(pb::GrantState::Pending) => "pending",
        Ok(pb::GrantState::Active) => "active",
        Ok(pb::GrantState::Denied) => "denied",
        Ok(pb::GrantState::Revoked) => "revoked",
        Ok(pb::GrantState::Expired) => "expired",
        Ok(pb::GrantState::Ended) => "ended",
        _ => "unspecified",
    }
}

/// One JSON object (field names as in the proto, enums as words).
pub fn event_json(e: &pb::Event, subscriber_dropped: Option<u64>) -> Value {
    let principal = e.principal.as_ref().map(|p| {
        json!({
            "identity": p.identity, "session": p.session, "cgroup_id": p.cgroup_id,
            "opt_outs": p.opt_outs,
        })
    });
    let process = e.process.as_ref().map(|p| {
        json!({
            "pid": p.pid, "ppid": p.ppid, "uid": p.uid, "binary": p.binary, "argv": p.argv,
            "exec_id": p.exec_id, "parent_exec_id": p.parent_exec_id,
        })
    });
    let decision = e.decision.as_ref().map(|d| {
        json!({
            "verdict": verdict_name(d.verdict), "reason": reason_name(d.reason),
            "policy": d.policy, "revision": d.revision, "rule_index": d.rule_index,
            "grant_id": d.grant_id, "grant_available": d.grant_available,
        })
    });
    let mut v = json!({
        "seq": e.seq,
        "time_unix_nano": e.time_unix_nano,
        "node": e.node,
        "kind": super::hub::kind(e),
        "principal": principal,
        "process": process,
        "decision": decision,
        "suppressed": e.suppressed,
        "repeats": e.repeats,
    });
    match &e.call {
        Some(pb::event::Call::Connect(c)) => {
            v["connect"] = json!({
                "family": c.family, "protocol": c.protocol, "destination": c.destination,
                "port": c.port, "zone": c.zone, "hook": c.hook, "name": c.name,
            });
        }
        Some(pb::event::Call::Exec(x)) => v["exec"] = json!({"path": x.path}),
        Some(pb::event::Call::Socket(s)) => {
            v["socket"] = json!({
                "family": s.family, "type": s.r#type, "protocol": s.protocol, "hook": s.hook,
                "option": s.option,
            });
        }
        Some(pb::event::Call::Grant(g)) => {
            v["grant"] = json!({
                "id": g.id, "grant": g.grant, "state": grant_state_name(g.state),
                "actor": g.actor, "reason": g.reason, "expires_unix_nano": g.expires_unix_nano,
            });
        }
        Some(pb::event::Call::Container(c)) => {
            v["container"] = json!({
                "id": c.container_id, "action": c.action, "pid": c.pid,
                "cgroup_path": c.cgroup_path, "reason": c.reason,
            });
        }
        Some(pb::event::Call::Dns(d)) => {
            v["dns"] = json!({
                "name": d.name, "type": d.r#type, "chain": d.chain, "answers": d.answers,
                "zone": d.zone, "rcode": d.rcode, "transport": d.transport,
            });
        }
        None => {}
    }
    if let Some(d) = subscriber_dropped {
        v["subscriber_dropped"] = json!(d);
    }
    v
}

/// The call in a few words: `connect tcp 127.0.0.1:9090 (zone local)`, `exec /usr/bin/curl`,
/// `socket ipv4 raw icmp`.
pub fn call_text(e: &pb::Event) -> String {
    match &e.call {
        Some(pb::event::Call::Connect(c)) => {
            let dest = if c.family == "unix" {
                c.destination.clone()
            } else if c.family == "ipv6" {
                format!("[{}]:{}", c.destination, c.port)
            } else {
                format!("{}:{}", c.destination, c.port)
            };
            let verb = if c.hook.starts_with("sendmsg") {
                "sendmsg"
            } else {
                "connect"
            };
            let zone = match (c.zone.is_empty(), c.name.is_empty()) {
                (true, _) => String::new(),
                (false, true) => format!(" (zone {})", c.zone),
                (false, false) => format!(" (zone {}, name {})", c.zone, c.name),
            };
            let repeats = match e.repeats {
                0 => String::new(),
                n => format!(" (+{n} identical before)"),
            };
            if c.protocol.is_empty() {
                format!("{verb} {} {dest}{zone}{repeats}", c.family)
            } else {
                format!("{verb} {} {dest}{zone}{repeats}", c.protocol)
            }
        }
        Some(pb::event::Call::Exec(x)) => format!("exec {}", x.path),
        Some(pb::event::Call::Socket(s)) if s.hook == "setsockopt" => {
            format!("setsockopt {} {} {}", s.family, s.protocol, s.option)
        }
        Some(pb::event::Call::Socket(s)) => {
            format!("socket {} {} {}", s.family, s.r#type, s.protocol)
        }
        Some(pb::event::Call::Grant(g)) => {
            let mut s = format!(
                "grant {} ({}) {} by {}",
                g.id,
                g.grant,
                grant_state_name(g.state),
                g.actor
            );
            if !g.reason.is_empty() {
                s.push_str(&format!(": {}", g.reason));
            }
            s
        }
        Some(pb::event::Call::Container(c)) if c.reason.is_empty() => {
            format!("container {} {} (pid {})", c.container_id, c.action, c.pid)
        }
        Some(pb::event::Call::Container(c)) => format!(
            "container {} {} (pid {}): {}",
            c.container_id, c.action, c.pid, c.reason
        ),
        Some(pb::event::Call::Dns(d)) => {
            let zone = if d.zone.is_empty() {
                String::new()
            } else {
                format!(" (zone {})", d.zone)
            };
            let answers = if d.answers.is_empty() {
                String::new()
            } else {
                format!(" -> {}", d.answers.join(", "))
            };
            format!("dns {} {}{zone}: {}{answers}", d.r#type, d.name, d.rcode)
        }
        None => "process".into(),
    }
}

/// The rule in a few words: `quickstart#1 rev 3`, `quickstart default rev 3`.
pub fn rule_text(d: &pb::Decision) -> String {
    let policy = if d.policy.is_empty() {
        "-"
    } else {
        d.policy.as_str()
    };
    let mut s = match (d.rule_index, reason_name(d.reason)) {
        (Some(i), "rule") => format!("{policy}#{i} rev {}", d.revision),
        (_, reason) => format!("{policy} {reason} rev {}", d.revision),
    };
    if !d.grant_id.is_empty() {
        s.push_str(&format!(" grant={}", d.grant_id));
    }
    if !d.grant_available.is_empty() {
        s.push_str(&format!(" grant_available={}", d.grant_available));
    }
    s
}

/// One readable line: time, identity, pid, binary, call, verdict, rule.
pub fn event_line(e: &pb::Event) -> String {
    let secs = e.time_unix_nano / 1_000_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let ms = (e.time_unix_nano / 1_000_000) % 1000;
    let identity = e.principal.as_ref().map_or_else(
        || "-".to_owned(),
        |p| {
            if p.opt_outs.is_empty() {
                p.identity.clone()
            } else {
                format!("{} [opt-out {}]", p.identity, p.opt_outs.join(","))
            }
        },
    );
    let (pid, binary) = e
        .process
        .as_ref()
        .map_or((0, "-"), |p| (p.pid, p.binary.as_str()));
    let (verdict, rule) = e.decision.as_ref().map_or(("-", String::new()), |d| {
        (verdict_name(d.verdict), rule_text(d))
    });
    format!(
        "{h:02}:{m:02}:{s:02}.{ms:03}Z {identity} pid={pid} {binary} {} {verdict} {rule}",
        call_text(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_json_carry_who_what_and_which_rule() {
        let e = pb::Event {
            seq: 7,
            time_unix_nano: 3_723_004_000_000,
            principal: Some(pb::Principal {
                identity: "spiffe://t/a".into(),
                session: "s1".into(),
                cgroup_id: 9,
                opt_outs: Vec::new(),
            }),
            process: Some(pb::Process {
                pid: 42,
                binary: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "x".into()],
                ..Default::default()
            }),
            call: Some(pb::event::Call::Connect(pb::ConnectCall {
                family: "ipv4".into(),
                protocol: "tcp".into(),
                destination: "127.0.0.1".into(),
                port: 9090,
                zone: "local".into(),
                hook: "connect4".into(),
                name: String::new(),
            })),
            decision: Some(pb::Decision {
                verdict: pb::Verdict::Deny as i32,
                reason: pb::Reason::Rule as i32,
                policy: "quickstart".into(),
                revision: 3,
                rule_index: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "01:02:03.004Z spiffe://t/a pid=42 /usr/bin/curl connect tcp 127.0.0.1:9090 (zone local) deny quickstart#1 rev 3"
        );
        let j = event_json(&e, Some(0));
        assert_eq!(j["principal"]["session"], "s1");
        assert_eq!(j["principal"]["opt_outs"], json!([]));
        let mut opted = e.clone();
        if let Some(p) = opted.principal.as_mut() {
            p.opt_outs = vec!["user=1000".into(), "no-seccomp".into()];
        }
        assert!(
            event_line(&opted).contains("spiffe://t/a [opt-out user=1000,no-seccomp] pid=42"),
            "{}",
            event_line(&opted)
        );
        assert_eq!(
            event_json(&opted, None)["principal"]["opt_outs"][1],
            "no-seccomp"
        );
        assert_eq!(j["decision"]["verdict"], "deny");
        assert_eq!(j["decision"]["rule_index"], 1);
        assert_eq!(j["process"]["argv"][1], "x");
        assert_eq!(j["connect"]["port"], 9090);
    }

    #[test]
    fn unix_destinations_grants_and_grant_changes_read_plainly() {
        let mut e = pb::Event {
            time_unix_nano: 3_723_004_000_000,
            call: Some(pb::event::Call::Connect(pb::ConnectCall {
                family: "unix".into(),
                destination: "/var/run/docker.sock".into(),
                zone: "docker".into(),
                hook: "connect_unix".into(),
                ..Default::default()
            })),
            decision: Some(pb::Decision {
                verdict: pb::Verdict::Deny as i32,
                reason: pb::Reason::Default as i32,
                policy: "p".into(),
                revision: 2,
                grant_available: "docker-admin".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            call_text(&e),
            "connect unix /var/run/docker.sock (zone docker)"
        );
        assert!(
            event_line(&e).ends_with("deny p default rev 2 grant_available=docker-admin"),
            "{}",
            event_line(&e)
        );
        e.call = Some(pb::event::Call::Grant(pb::GrantChange {
            id: "7".into(),
            grant: "crm-write".into(),
            state: pb::GrantState::Active as i32,
            actor: "alice".into(),
            reason: "ok".into(),
            expires_unix_nano: 0,
        }));
        e.decision = None;
        assert_eq!(call_text(&e), "grant 7 (crm-write) active by alice: ok");
        assert_eq!(event_json(&e, None)["grant"]["state"], "active");
        assert_eq!(crate::hub::kind(&e), "grant");
    }
}
