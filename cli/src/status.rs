//! `corral status [--json]`: what the local agent enforces and how its event path is doing.

use std::process::ExitCode;

use corral_proto::v1 as pb;
use serde_json::json;

use crate::{
    client::{self, SocketArgs},
    error::CliError,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

fn to_json(s: &pb::AgentStatus) -> serde_json::Value {
    let principals: Vec<_> = s
        .principals
        .iter()
        .map(|p| {
            let pr = p.principal.clone().unwrap_or_default();
            json!({
                "identity": pr.identity, "session": pr.session, "cgroup_id": pr.cgroup_id,
                "policy": p.policy, "processes": p.processes,
                "containment_opt_outs": p.containment_opt_outs,
            })
        })
        .collect();
    let unenrolled: Vec<_> = s
        .unenrolled_pods
        .iter()
        .map(|p| {
            json!({
                "namespace": p.namespace, "name": p.name, "uid": p.uid, "reason": p.reason,
                "state": p.state, "since_unix_nano": p.since_unix_nano,
            })
        })
        .collect();
    let grants: Vec<_> = s
        .grants
        .iter()
        .map(|g| {
            json!({
                "id": g.id, "identity": g.identity, "session": g.session, "grant": g.grant,
                "expires_unix_nano": g.expires_unix_nano,
            })
        })
        .collect();
    json!({
        "node": s.node,
        "exec_enforcement": s.exec_enforcement,
        "exec_scripts": s.exec_scripts,
        "sock_addr_hooks": s.sock_addr_hooks,
        "guard_hooks": s.guard_hooks,
        "policy_revision": s.policy_revision,
        "policies": s.policies,
        "last_error": s.last_error,
        "principals": principals,
        "unenrolled_pods": unenrolled,
        "grants": grants,
        "events_delivered": s.events_delivered,
        "events_dropped_kernel": s.events_dropped_kernel,
        "events_dropped_subscribers": s.events_dropped_subscribers,
        "events_suppressed": s.events_suppressed,
        "containers_enrolled": s.containers_enrolled,
        "containers_failed_open": s.containers_failed_open,
        "containers_missed": s.containers_missed,
        "dns": s.dns.as_ref().map(|d| json!({
            "port": d.port, "upstream": d.upstream, "queries": d.queries, "refused": d.refused,
            "learned": d.learned, "learned_now": d.learned_now, "failures": d.failures,
            "capped": d.capped, "namespaces": d.namespaces,
        })),
        "server_state": s.server_state,
        "server": s.server,
    })
}

fn human(s: &pb::AgentStatus) -> String {
    let mut out = format!(
        "node:        {}\nmode:        {}{}\nexec:        {} (scripts: {})\nsock_addr:   {}\nguards:      {}\npolicy:      revision {} ({})\n",
        s.node,
        s.server_state,
        if s.server.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.server)
        },
        s.exec_enforcement,
        s.exec_scripts,
        s.sock_addr_hooks.join(", "),
        if s.guard_hooks.is_empty() {
            "none".to_owned()
        } else {
            s.guard_hooks.join(", ")
        },
        s.policy_revision,
        if s.policies.is_empty() {
            "none: enrolled principals are denied everything".to_owned()
        } else {
            s.policies.join(", ")
        }
    );
    if !s.last_error.is_empty() {
        out.push_str("last error:  the latest policy input was rejected; the previous policy stays in force:\n");
        for l in s.last_error.lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out.push_str(&format!(
        "events:      {} delivered, {} dropped in kernel, {} dropped for slow subscribers\n",
        s.events_delivered, s.events_dropped_kernel, s.events_dropped_subscribers
    ));
    if s.containers_enrolled != 0 || s.containers_failed_open != 0 || s.containers_missed != 0 {
        out.push_str(&format!(
            "containers:  {} enrolled by the OCI hook",
            s.containers_enrolled
        ));
        if s.containers_failed_open != 0 {
            out.push_str(&format!(
                ", {} STARTED UNPOLICED (hook --fail-open, agent unreachable)",
                s.containers_failed_open
            ));
        }
        if s.containers_missed != 0 {
            out.push_str(&format!(
                ", {} MISSED by the hook (policed only once the pod watch enrolled the pod)",
                s.containers_missed
            ));
        }
        out.push('\n');
    }
    if let Some(d) = &s.dns {
        let upstream = if d.upstream.is_empty() {
            "NO UPSTREAM"
        } else {
            d.upstream.as_str()
        };
        out.push_str(&format!(
            "dns proxy:   port {} -> {upstream}: {} queries, {} refused, {} addresses opened ({} open now, {} over a principal's cap), {} failures; {} pod namespaces\n",
            d.port, d.queries, d.refused, d.learned, d.learned_now, d.capped, d.failures, d.namespaces
        ));
    }
    out.push_str(&format!("principals:  {}\n", s.principals.len()));
    for p in &s.principals {
        let pr = p.principal.clone().unwrap_or_default();
        out.push_str(&format!(
            "  {} session {} policy {} processes {}{}\n",
            pr.identity,
            pr.session,
            if p.policy.is_empty() { "-" } else { &p.policy },
            p.processes,
            if p.containment_opt_outs.is_empty() {
                String::new()
            } else {
                format!(" opt-outs {}", p.containment_opt_outs.join(", "))
            }
        ));
    }
    if !s.grants.is_empty() {
        out.push_str(&format!("grants:      {}\n", s.grants.len()));
        for g in &s.grants {
            let session = if g.session.is_empty() {
                "every session".to_owned()
            } else {
                format!("session {}", g.session)
            };
            out.push_str(&format!(
                "  grant {} {} for {} {session}, expires in {}\n",
                g.id,
                g.grant,
                g.identity,
                until(g.expires_unix_nano)
            ));
        }
    }
    if !s.unenrolled_pods.is_empty() {
        out.push_str(&format!(
            "NOT ENFORCED: {} pod(s) opted in and not enrolled:\n",
            s.unenrolled_pods.len()
        ));
        for p in &s.unenrolled_pods {
            out.push_str(&format!(
                "  {}/{} ({}, {}): {}\n",
                p.namespace,
                p.name,
                p.state,
                since(p.since_unix_nano),
                p.reason
            ));
        }
    }
    out
}

/// `since 12s ago` from a wall-clock time in nanoseconds.
fn since(unix_nano: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "since {}s ago",
        now.saturating_sub(unix_nano / 1_000_000_000)
    )
}

/// `42s` until a Unix time in nanoseconds (`0s` once past).
fn until(unix_nano: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{}s", (unix_nano / 1_000_000_000).saturating_sub(now))
}

/// Asks the agent for its status and prints it.
pub async fn run(a: &Args) -> Result<ExitCode, CliError> {
    let mut c = client::connect(&a.socket.socket).await?;
    let s = c
        .status(pb::StatusRequest {})
        .await
        .map_err(CliError::agent)?
        .into_inner();
    if a.json {
        println!("{}", to_json(&s));
    } else {
        print!("{}", human(&s));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> pb::AgentStatus {
        pb::AgentStatus {
            node: "node-a".into(),
            unenrolled_pods: vec![pb::UnenrolledPod {
                namespace: "agents".into(),
                name: "ghost".into(),
                uid: "0a-1".into(),
                reason: "no cgroup for pod 0a-1".into(),
                state: "failed".into(),
                since_unix_nano: 1_700_000_000_000_000_000,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn unenrolled_pods_are_shown_in_both_formats() {
        let s = status();
        let j = to_json(&s);
        assert_eq!(
            j["unenrolled_pods"],
            json!([{"namespace": "agents", "name": "ghost", "uid": "0a-1",
                    "reason": "no cgroup for pod 0a-1", "state": "failed",
                    "since_unix_nano": 1_700_000_000_000_000_000_u64}])
        );
        let h = human(&s);
        assert!(
            h.contains(
                "NOT ENFORCED: 1 pod(s) opted in and not enrolled:\n  agents/ghost (failed, since "
            ),
            "{h}"
        );
        assert!(h.ends_with("s ago): no cgroup for pod 0a-1\n"), "{h}");
        let none = pb::AgentStatus::default();
        assert_eq!(to_json(&none)["principals"], json!([]));
        assert_eq!(to_json(&none)["unenrolled_pods"], json!([]));
        assert!(!human(&none).contains("NOT ENFORCED"));
    }

    #[test]
    fn containment_opt_outs_are_shown_in_both_formats() {
        let principal = |opt_outs: &[&str]| pb::PrincipalStatus {
            principal: Some(pb::Principal {
                identity: "spiffe://t/a".into(),
                session: "s1".into(),
                cgroup_id: 7,
                opt_outs: opt_outs.iter().map(|o| (*o).to_owned()).collect(),
            }),
            policy: "p".into(),
            processes: 1,
            containment_opt_outs: opt_outs.iter().map(|o| (*o).to_owned()).collect(),
        };
        let s = pb::AgentStatus {
            principals: vec![principal(&["user=1000", "no-seccomp"]), principal(&[])],
            ..Default::default()
        };
        let j = to_json(&s);
        assert_eq!(
            j["principals"][0]["containment_opt_outs"],
            json!(["user=1000", "no-seccomp"])
        );
        assert_eq!(j["principals"][1]["containment_opt_outs"], json!([]));
        let h = human(&s);
        assert!(
            h.contains(
                "  spiffe://t/a session s1 policy p processes 1 opt-outs user=1000, no-seccomp\n"
            ),
            "{h}"
        );
        assert!(
            h.contains("  spiffe://t/a session s1 policy p processes 1\n"),
            "{h}"
        );
    }
}
