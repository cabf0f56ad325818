//! End to end, observability: event subscribers, `corral status`, metrics, the audit log, JSON
//! logs, `corral policy explain` and the allow-event rate limit, against the real agent and
//! kernel (see `e2e_agent.rs` and `agent_util` for the harness).

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use corral_tests::{
    e2e::{Reaped, bin, udp, wait_for},
    privileged,
};
use serde_json::Value;

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod agent_util;

use agent_util::{
    ALLOWED, Agent, DENIED, Spec, corral, events, is_deny_to, policy, probe_cmd, status,
};

#[test]
fn a_stalled_subscriber_stalls_neither_enforcement_nor_other_subscribers() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("slow")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let _agent = Agent::start(&spec, true, &["--subscriber-queue", "64"])?;
    let id = "spiffe://e2e.corral/agent/slow";

    // Never read: its pipe fills, then the gRPC stream, then its queue in the agent.
    let stalled = Command::new(bin("corral")?)
        .args(["events", "--follow", "--json", "--socket"])
        .arg(&spec.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let _stalled = Reaped(Some(stalled));
    // Reads everything, remembering sessions it saw.
    let mut reader = Command::new(bin("corral")?)
        .args(["events", "--follow", "--json", "--identity", id, "--socket"])
        .arg(&spec.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = reader.stdout.take().context("reader stdout")?;
    let _reader = Reaped(Some(reader));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(s) = v["principal"]["session"].as_str()
                && let Ok(mut g) = seen2.lock()
            {
                g.push(s.to_owned());
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let n = 50_000;
    let t0 = Instant::now();
    let flood = probe_cmd(
        &spec,
        id,
        "flood",
        &[&format!("repeat:{n}:{}", udp(DENIED))],
    )?;
    let took = t0.elapsed();
    println!("{n} denied connects in {took:?}: {flood:?}");
    assert_eq!(flood, [format!("EPERM={n}")], "every connect decided");
    assert!(
        took < Duration::from_secs(30),
        "enforcement slowed: {took:?}"
    );

    // The reader may still be catching up (its own queue is bounded too, and drops what
    // overflows): send markers until one arrives after it has caught up.
    let mut last_marker = Instant::now() - Duration::from_secs(1);
    wait_for(10, "the reading subscriber to get a marker event", || {
        if last_marker.elapsed() >= Duration::from_millis(500) {
            let marker = probe_cmd(&spec, id, "marker", &[&udp(DENIED)])?;
            assert_eq!(marker, ["EPERM"]);
            last_marker = Instant::now();
        }
        Ok(seen
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .any(|s| s == "marker")
            .then_some(()))
    })?;
    let s = status(&spec)?;
    println!(
        "delivered {} kernel drops {} subscriber drops {}",
        s["events_delivered"], s["events_dropped_kernel"], s["events_dropped_subscribers"]
    );
    assert!(
        s["events_dropped_subscribers"].as_u64() > Some(0),
        "the stalled subscriber's losses are counted: {s}"
    );
    let delivered = s["events_delivered"].as_u64().unwrap_or(0);
    let kernel = s["events_dropped_kernel"].as_u64().unwrap_or(0);
    assert!(
        delivered + kernel >= n as u64,
        "every decision is delivered or counted as dropped: {delivered} + {kernel} < {n}"
    );
    Ok(())
}

#[test]
fn status_reports_features_policy_and_principals() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("status")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let _agent = Agent::start(&spec, true, &[])?;
    let s = status(&spec)?;
    assert!(
        ["lsm", "tracepoint+sigkill"].contains(&s["exec_enforcement"].as_str().unwrap_or("")),
        "{s}"
    );
    let hooks: Vec<&str> = s["sock_addr_hooks"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        hooks[..8],
        [
            "connect4",
            "connect6",
            "sendmsg4",
            "sendmsg6",
            "recvmsg4",
            "recvmsg6",
            "getpeername4",
            "getpeername6"
        ],
        "{s}"
    );
    // The unix hooks are listed where the kernel has them (6.7+; this CI machine does).
    assert!(
        hooks.len() == 8 || hooks[8..] == ["connect_unix", "sendmsg_unix"],
        "{s}"
    );
    assert_eq!(s["policies"][0], "e2e");
    assert_eq!(s["policy_revision"], 1);
    let out = corral(&spec, &["status"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("revision 1 (e2e)"), "{text}");
    // A missing agent: one sentence on stderr, non-zero exit.
    let missing = Command::new(bin("corral")?)
        .args(["status", "--socket"])
        .arg(spec.dir.join("nope.sock"))
        .output()?;
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the corral agent"), "{err}");
    Ok(())
}

#[test]
fn metrics_audit_log_and_json_logs_record_the_decisions() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("metrics")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let audit = spec.dir.join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let agent = Agent::start(
        &spec,
        true,
        &[
            "--metrics-addr",
            &metrics_addr,
            "--audit-log",
            &audit_arg,
            "--log-format",
            "json",
        ],
    )?;
    let id = "spiffe://e2e.corral/agent/metrics";
    assert_eq!(
        probe_cmd(&spec, id, "m1", &[&udp(DENIED), &udp(DENIED)])?,
        ["EPERM", "EPERM"]
    );
    let scrape = || -> anyhow::Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&metrics_addr)?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    };
    let body = wait_for(5, "the deny decisions in the metrics", || {
        let b = scrape()?;
        Ok(
            b.contains("corral_decisions_total{verdict=\"deny\",reason=\"rule\"} 2")
                .then_some(b),
        )
    })?;
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(body.contains("\ncorral_policy_revision 1\n"), "{body}");
    assert!(
        body.contains("\ncorral_events_dropped_kernel_total 0\n"),
        "{body}"
    );
    assert!(
        body.contains("\ncorral_policy_apply_errors_total 0\n"),
        "{body}"
    );
    // The audit log has the same decisions, one JSON object per line.
    let lines = wait_for(5, "the audit log", || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let v: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|e: &Value| is_deny_to(e, DENIED) && e["principal"]["identity"] == id)
            .collect();
        Ok((v.len() == 2).then_some(v))
    })?;
    assert_eq!(lines[0]["principal"]["session"], "m1");
    assert_eq!(lines[0]["decision"]["rule_index"], 1);
    // --log-format json: every log line is a JSON object.
    let log = agent.log_text();
    assert!(!log.is_empty());
    for l in log.lines() {
        let v: Value = serde_json::from_str(l).with_context(|| format!("log line {l}"))?;
        assert!(v["level"].is_string(), "{l}");
    }
    Ok(())
}

#[test]
fn explain_over_the_socket_names_the_deciding_rule() -> anyhow::Result<()> {
    use corral_proto::v1 as pb;
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("explain")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let _agent = Agent::start(&spec, true, &[])?;
    let socket = spec.socket.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (deny, bad) = rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_static("http://corral-agent.local")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        let mut c = pb::agent_service_client::AgentServiceClient::new(channel);
        let deny = c
            .explain(pb::ExplainRequest {
                identity: "spiffe://e2e.corral/agent/x".into(),
                call: Some(pb::explain_request::Call::Connect(format!(
                    "127.0.0.1:{DENIED}/udp"
                ))),
            })
            .await?
            .into_inner();
        let bad = c
            .explain(pb::ExplainRequest {
                identity: "spiffe://e2e.corral/agent/x".into(),
                call: Some(pb::explain_request::Call::Connect("nonsense".into())),
            })
            .await;
        anyhow::Ok((deny, bad))
    })?;
    println!("{}", deny.explanation);
    let d = deny.decision.context("decision")?;
    assert_eq!(d.verdict, pb::Verdict::Deny as i32);
    assert_eq!(d.reason, pb::Reason::Rule as i32);
    assert_eq!(d.rule_index, Some(1));
    assert_eq!(d.policy, "e2e");
    assert_eq!(d.revision, 1);
    assert_eq!(deny.zone, "local");
    assert!(
        deny.rule_location
            .starts_with(&format!("{}:", spec.policy.display())),
        "{}",
        deny.rule_location
    );
    let err = bad.err().context("a bad connect value is rejected")?;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The CLI without --policy asks the agent and prints the same explanation.
    let out = Command::new(bin("corral")?)
        .args(["policy", "explain", "--socket"])
        .arg(&spec.socket)
        .args(["--identity", "spiffe://e2e.corral/agent/x", "--connect"])
        .arg(format!("127.0.0.1:{DENIED}/udp"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&deny.explanation), "CLI printed: {text}");
    assert!(
        text.contains("agent policy revision 1"),
        "CLI printed: {text}"
    );
    Ok(())
}

#[test]
fn allow_event_rate_limit_shows_in_events_and_status() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("ratelimit")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let _agent = Agent::start(
        &spec,
        true,
        &["--allow-event-rate", "20", "--allow-event-burst", "2"],
    )?;
    let id = "spiffe://e2e.corral/agent/ratelimit";
    let calls: u64 = 3_000;
    let flood = format!("repeat:{calls}:{}", udp(ALLOWED));
    let lines = probe_cmd(&spec, id, "sess-rl", &[&flood, &udp(DENIED)])?;
    assert_eq!(lines, [format!("ok={calls}"), "EPERM".to_owned()]);

    // The deny after the flood is never limited, and carries what was still suppressed.
    let all = wait_for(5, "the deny event", || {
        let ev = events(&spec, &["--identity", id, "--kind", "connect"])?;
        Ok(ev.iter().any(|e| is_deny_to(e, DENIED)).then_some(ev))
    })?;
    let allow = all
        .iter()
        .filter(|e| e["decision"]["verdict"] == "allow")
        .count() as u64;
    let suppressed: u64 = all.iter().filter_map(|e| e["suppressed"].as_u64()).sum();
    println!("{calls} allowed calls: {allow} allow events, {suppressed} suppressed");
    assert!(allow * 10 < calls, "{allow} allow events for {calls} calls");
    assert_eq!(allow + suppressed, calls, "every allowed call is accounted");
    let s = status(&spec)?;
    assert_eq!(s["events_suppressed"], suppressed, "{s}");
    assert_eq!(s["events_dropped_kernel"], 0, "{s}");
    Ok(())
}
