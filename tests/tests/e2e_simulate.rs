//! `corral policy simulate` on a real recording: a scripted agent's calls under an audit
//! policy, decided by the real kernel and recorded by the real agent (`corral events --json`),
//! replayed through candidate policies. A candidate that allows everything the script did
//! changes nothing (exit 0); one that forgets a call reports exactly that call as newly denied
//! (exit 1); enforcing the good candidate, the same script runs with every call allowed.

use std::{net::TcpListener, process::Command};

use anyhow::ensure;
use corral_tests::{
    e2e::{bin, wait_for},
    fleet::{Agent, Dir, Node, text},
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

#[test]
fn a_recording_replayed_through_candidates_gates_the_change() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (a, b) = (
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    );
    let (pa, pb) = (a.local_addr()?.port(), b.local_addr()?.port());
    let dir = Dir::new("sim")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    let audit = dir.write("audit.yaml", &policy("audit", "1", &bindir))?;
    let script = [format!("tcp:127.0.0.1:{pa}"), format!("tcp:127.0.0.1:{pb}")];
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    let events = {
        let _agent = Agent::standalone(&node, &audit, &[])?;
        // Audit mode: both calls go through (and are recorded as audit-deny).
        assert_eq!(node.probe_as(ID, "rec", &script)?, ["ok", "ok"]);
        let recorded = wait_for(5, "the recorded connects", || {
            let out = node.local(&["events", "--json", "--identity", ID])?;
            ensure!(out.status.success(), "corral events: {}", text(&out));
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            let n = s
                .lines()
                .filter(|l| l.contains("\"kind\":\"connect\""))
                .count();
            Ok((n >= 2).then_some(s))
        })?;
        dir.write("events.jsonl", &recorded)?
    };

    let good = dir.write(
        "good.yaml",
        &policy("enforce", &format!("{pa}, {pb}"), &bindir),
    )?;
    let (ok, out) = simulate(&good, &events)?;
    assert!(ok, "nothing newly denied: {out}");
    assert!(out.contains(" 0 would be denied"), "{out}");

    let forgets = dir.write("forgets.yaml", &policy("enforce", &pa.to_string(), &bindir))?;
    let (ok, out) = simulate(&forgets, &events)?;
    assert!(!ok, "a newly denied call fails the gate: {out}");
    assert!(out.contains(" 1 would be denied"), "{out}");
    assert!(
        out.contains(&format!("connect tcp 127.0.0.1:{pb}")),
        "{out}"
    );
    assert!(!out.contains(&format!("127.0.0.1:{pa} ")), "{out}");

    // Enforcing the good candidate, the same script runs with every call allowed; the one
    // the other candidate forgot is denied by it.
    let _agent = Agent::standalone(&node, &good, &[])?;
    assert_eq!(node.probe_as(ID, "enf", &script)?, ["ok", "ok"]);
    drop(_agent);
    let _agent = Agent::standalone(&node, &forgets, &[])?;
    assert_eq!(node.probe_as(ID, "enf2", &script)?, ["ok", "EPERM"]);
    Ok(())
}
