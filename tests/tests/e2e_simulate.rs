//! From audit to enforce on a real recording: a scripted agent's calls under an audit
//! policy, decided by the real kernel and recorded by the real agent (`corral events --json`).
//! `corral policy suggest` turns the recording into a policy that `policy check` accepts;
//! `corral policy simulate` replays the recording through it (nothing changes, exit 0) and a
//! recording of the script doing one new thing (exactly that call newly denied, exit 1);
//! enforced, the script runs with every call allowed and the new call alone is denied.

use std::{net::TcpListener, process::Command};

use anyhow::ensure;
use corral_tests::{
    e2e::{bin, wait_for},
    fleet::{Agent, Dir, Node, Server, connected, free_port, text},
    privileged,
};

const ID: &str = "spiffe://e2e.corral/agent/sim";

fn policy(mode: &str, ports: &str, bindir: &str) -> String {
    format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: sim-{mode}
spec:
  identities: [\"spiffe://e2e.corral/agent/**\"]
  mode: {mode}
  defaultAction: deny
  zones:
    local: {{ cidrs: [127.0.0.0/8] }}
  connect:
    - {{ action: allow, zones: [local], ports: [{ports}], protocols: [tcp] }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\"] }}
"
    )
}

fn simulate(
    candidate: &std::path::Path,
    events: &std::path::Path,
) -> anyhow::Result<(bool, String)> {
    let out = Command::new(bin("corral")?)
        .args(["policy", "simulate", "-f"])
        .arg(candidate)
        .arg("--events")
        .arg(events)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn corral(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(bin("corral")?).args(args).output()?)
}

/// The node's recorded events of `ID` (`corral events --json`), once it holds at least
/// `connects` connect events.
fn recording(node: &Node, connects: usize) -> anyhow::Result<String> {
    wait_for(5, "the recorded connects", || {
        let out = node.local(&["events", "--json", "--identity", ID])?;
        ensure!(out.status.success(), "corral events: {}", text(&out));
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        let n = s
            .lines()
            .filter(|l| l.contains("\"kind\":\"connect\""))
            .count();
        Ok((n >= connects).then_some(s))
    })
}

/// `n` loopback TCP listeners, and their ports.
fn listeners(n: usize) -> anyhow::Result<(Vec<TcpListener>, Vec<u16>)> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?;
    Ok((listeners, ports))
}

/// The recorded event lines of `session`.
fn of_session(all: &str, session: &str) -> String {
    let tag = format!("\"session\":\"{session}\"");
    all.lines()
        .filter(|l| l.contains(&tag))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn from_audit_to_enforce_suggest_simulate_and_the_kernel_agree() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (listeners, ports) = listeners(3)?;
    let dir = Dir::new("sim")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    let audit = dir.write("audit.yaml", &policy("audit", "1", &bindir))?;
    let op = |p: u16| format!("tcp:127.0.0.1:{p}");
    let script = [op(ports[0]), op(ports[1])];
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    // The same script doing one new thing.
    let changed = [op(ports[0]), op(ports[1]), op(ports[2])];
    let changed: Vec<&str> = changed.iter().map(String::as_str).collect();

    // 1. Record under audit: everything goes through.
    let all = {
        let _agent = Agent::standalone(&node, &audit, &[])?;
        assert_eq!(node.probe_as(ID, "rec", &script)?, ["ok", "ok"]);
        assert_eq!(node.probe_as(ID, "rec2", &changed)?, ["ok", "ok", "ok"]);
        recording(&node, 5)?
    };
    let rec = dir.write("rec.jsonl", &of_session(&all, "rec"))?;
    let rec2 = dir.write("rec2.jsonl", &of_session(&all, "rec2"))?;

    // 2. Suggest from the first recording: a valid policy.
    let out = corral(&[
        "policy",
        "suggest",
        "--events",
        &rec.display().to_string(),
        "--identity",
        "spiffe://e2e.corral/agent/**",
    ])?;
    ensure!(out.status.success(), "suggest: {}", text(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{yaml}");
    let suggested = dir.write("suggested.yaml", &yaml)?;
    let out = corral(&["policy", "check", &suggested.display().to_string()])?;
    ensure!(out.status.success(), "check: {}\n{yaml}", text(&out));

    // 3. Simulated against its own recording: nothing changes.
    let (ok, out) = simulate(&suggested, &rec)?;
    assert!(ok, "{out}\n{yaml}");
    assert!(out.contains(" 0 would be denied"), "{out}");
    // Against the changed script's recording: exactly the new call would be denied.
    let (ok, out) = simulate(&suggested, &rec2)?;
    assert!(!ok, "{out}");
    assert!(out.contains(" 1 would be denied"), "{out}");
    assert!(
        out.contains(&format!("connect tcp 127.0.0.1:{}", ports[2])),
        "{out}"
    );

    // 4. Enforced: the script runs with every call allowed (its exec included); the changed
    // script's new call, and only it, is denied.
    let _agent = Agent::standalone(&node, &suggested, &[])?;
    assert_eq!(node.probe_as(ID, "enf", &script)?, ["ok", "ok"]);
    assert_eq!(node.probe_as(ID, "enf2", &changed)?, ["ok", "ok", "EPERM"]);
    drop(listeners);
    Ok(())
}

/// The same loop on the fleet's history: a node connected to a real `corral-server` records
/// under an audit policy applied through the server; `suggest --server` gives exactly what
/// `suggest --events` gives from the node's own recording, and `simulate --server` replays the
/// server's history (the new call alone newly denied).
#[test]
fn the_fleets_history_suggests_and_simulates_as_the_nodes_recording_does() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (listeners, ports) = listeners(3)?;
    let dir = Dir::new("sim-fleet")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let server = Server::start(&dir, free_port()?)?;
    let agent = Agent::start(&node, &server.url, &[])?;
    wait_for(15, "the agent to connect", || connected(&node))
        .map_err(|e| anyhow::anyhow!("{e}: {}", agent.log_text()))?;
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    let audit = dir.write("audit.yaml", &policy("audit", "1", &bindir))?;
    let out = server.apply(&audit, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));
    let op = |p: u16| format!("tcp:127.0.0.1:{p}");
    let script = [op(ports[0]), op(ports[1])];
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    assert_eq!(node.probe_as(ID, "rec", &script)?, ["ok", "ok"]);

    // The node's own recording, and the server's once it has the same calls.
    let local = recording(&node, 2)?;
    let rec = dir.write("rec.jsonl", &of_session(&local, "rec"))?;
    let suggest = [
        "policy",
        "suggest",
        "--identity",
        "spiffe://e2e.corral/agent/**",
    ];
    let from_file = {
        let mut a = suggest.to_vec();
        let f = rec.display().to_string();
        a.extend(["--events", f.as_str()]);
        let out = corral(&a)?;
        ensure!(out.status.success(), "suggest --events: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from_server = wait_for(10, "the server's history", || {
        let out = server.cli(&suggest)?;
        let y = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((out.status.success() && y == from_file).then_some(y))
    })
    .map_err(|e| {
        let out = server.cli(&suggest).map(|o| text(&o)).unwrap_or_default();
        anyhow::anyhow!("{e}:\nfrom the file:\n{from_file}\nfrom the server:\n{out}")
    })?;
    println!("{from_server}");
    let suggested = dir.write("suggested.yaml", &from_server)?;

    // The script doing one new thing, recorded on the server; replayed from its history.
    let changed = [op(ports[0]), op(ports[1]), op(ports[2])];
    let changed: Vec<&str> = changed.iter().map(String::as_str).collect();
    assert_eq!(node.probe_as(ID, "rec2", &changed)?, ["ok", "ok", "ok"]);
    let f = suggested.display().to_string();
    let out = wait_for(10, "the new call in the server's history", || {
        let out = server.cli(&["policy", "simulate", "-f", &f])?;
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(t.contains(" 1 would be denied")
            .then_some((out.status.success(), t)))
    })?;
    assert!(
        !out.0,
        "exit 1 when a call would be newly denied: {}",
        out.1
    );
    assert!(
        out.1
            .contains(&format!("connect tcp 127.0.0.1:{}", ports[2])),
        "{}",
        out.1
    );
    let status = server.status()?;
    assert!(status["events_recorded"].as_u64() >= Some(5), "{status}");
    assert_eq!(status["events_not_recorded"], 0, "{status}");
    drop(listeners);
    Ok(())
}

/// `--suggest-chaining` on a real recording, enforced by the real kernel: sessions that
/// reached one zone never reached another afterwards, so the suggestion denies the second
/// after the first; the recording simulates unchanged, and an enforced session doing both is
/// denied the second call only.
#[test]
fn suggested_chaining_is_what_the_kernel_enforces() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("sim-chain")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    let audit = dir.write("audit.yaml", &policy("audit", "1", &bindir))?;
    // UDP connects (no packet) to two documentation addresses, through the default route.
    let (a, b) = ("udp:198.51.100.7:9", "udp:203.0.113.7:9");
    let all = {
        let _agent = Agent::standalone(&node, &audit, &[])?;
        assert_eq!(node.probe_as(ID, "c1", &[a])?, ["ok"]);
        assert_eq!(node.probe_as(ID, "c2", &[a])?, ["ok"]);
        assert_eq!(node.probe_as(ID, "c3", &[b])?, ["ok"]);
        recording(&node, 3)?
    };
    let rec = dir.write("rec.jsonl", &all)?;
    let out = corral(&[
        "policy",
        "suggest",
        "--events",
        &rec.display().to_string(),
        "--identity",
        "spiffe://e2e.corral/agent/**",
        "--suggest-chaining",
    ])?;
    ensure!(out.status.success(), "suggest: {}", text(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{yaml}");
    assert!(
        yaml.contains("- { after: [ip-198-51-100-7], deny: [ip-203-0-113-7] }"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("after: [ip-203-0-113-7]"),
        "one session is no evidence: {yaml}"
    );
    let suggested = dir.write("suggested.yaml", &yaml)?;
    let (ok, out) = simulate(&suggested, &rec)?;
    assert!(ok && out.contains(" 0 would be denied"), "{out}\n{yaml}");

    let _agent = Agent::standalone(&node, &suggested, &[])?;
    assert_eq!(node.probe_as(ID, "e1", &[a, b])?, ["ok", "EPERM"]);
    assert_eq!(node.probe_as(ID, "e2", &[b, a])?, ["ok", "ok"]);
    Ok(())
}
