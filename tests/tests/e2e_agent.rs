//! End to end: the real `corral-agent` and `corral` binaries as processes, talking gRPC over
//! the agent's unix socket, enforcing in the real kernel: `corral run`, enrolment, policy edits
//! and restarts. Observability (events, status, metrics, explain) is in `e2e_agent_observe.rs`.
//!
//! Each test runs its own agent with its own socket, state directory, policy file, principals'
//! cgroup directory and pin directory (under bpffs), stops it by pid with SIGTERM, and removes
//! its pins (`--uninstall`, and again from the guard if the agent died).
//!
//! The binaries are built by `cargo xtask test` before the tests run (cargo builds only this
//! package's binaries for its tests); run `cargo build -p corral-agent -p corral-cli` first
//! when invoking `cargo test -p corral-tests` directly.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use corral_tests::{
    e2e::{Reaped, bin, udp, wait_for},
    privileged, probe_bin,
};
use serde_json::Value;

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod agent_util;

use agent_util::{
    ALLOWED, Agent, DENIED, Spec, corral, events, is_deny_to, policy, probe_cmd, run_as, status,
};

#[test]
fn run_denied_connect_fails_and_events_show_who_what_rule_and_revision() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("run")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let mut agent = Agent::start(&spec, true, &[])?;
    let id = "spiffe://e2e.corral/agent/run";

    let denied = udp(DENIED);
    let allowed = udp(ALLOWED);
    let lines = probe_cmd(&spec, id, "sess-run", &[&denied, &allowed])?;
    assert_eq!(
        lines,
        ["EPERM", "ok"],
        "denied connect fails, allowed one works"
    );

    let deny = wait_for(5, "the deny event", || {
        Ok(events(&spec, &["--identity", id, "--verdict", "deny"])?
            .into_iter()
            .find(|e| is_deny_to(e, DENIED)))
    })?;
    println!("deny event: {deny}");
    assert_eq!(deny["principal"]["identity"], id);
    assert_eq!(deny["principal"]["session"], "sess-run");
    assert_eq!(deny["kind"], "connect");
    assert_eq!(deny["connect"]["destination"], "127.0.0.1");
    assert_eq!(deny["connect"]["zone"], "local");
    assert_eq!(deny["decision"]["reason"], "rule");
    assert_eq!(deny["decision"]["rule_index"], 1, "the explicit deny rule");
    assert_eq!(deny["decision"]["policy"], "e2e");
    assert_eq!(deny["decision"]["revision"], 1);
    let argv: Vec<&str> = deny["process"]["argv"]
        .as_array()
        .context("argv")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        argv.contains(&denied.as_str()),
        "argv of the denied process: {argv:?}"
    );
    assert!(
        deny["process"]["binary"]
            .as_str()
            .is_some_and(|b| b.ends_with("corral-probe")),
        "binary: {}",
        deny["process"]["binary"]
    );
    // Filters: the allow is not in the deny stream, and is in the allow stream.
    // (Allow events reach the agent on its drain timer, possibly after the deny.)
    let allows = wait_for(5, "the allow event", || {
        let a = events(&spec, &["--identity", id, "--verdict", "allow"])?;
        Ok(a.iter()
            .any(|e| e["connect"]["port"] == ALLOWED)
            .then_some(a))
    })?;
    assert!(allows.iter().all(|e| e["decision"]["verdict"] == "allow"));
    // Human output: one line per event with identity, call, verdict and rule.
    let out = corral(&spec, &["events", "--identity", id, "--verdict", "deny"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains(id)
            && l.contains(&format!("127.0.0.1:{DENIED}"))
            && l.contains("deny e2e#1 rev 1")),
        "human events:\n{text}"
    );

    // CMD's exit status is passed through.
    let out = run_as(&spec, id, "sess-exit", &["/bin/sh", "-c", "exit 7"])?;
    assert_eq!(out.status.code(), Some(7));

    // The principals are removed, with their cgroups, once their processes are gone.
    wait_for(5, "principals removed after exit", || {
        let s = status(&spec)?;
        Ok(s["principals"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(()))
    })?;
    let left: Vec<_> = std::fs::read_dir(&spec.cgroups)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .collect();
    assert!(left.is_empty(), "principal cgroups left: {left:?}");
    assert!(agent.stop()?, "agent exits cleanly:\n{}", agent.log_text());
    assert!(!spec.pins.exists(), "--uninstall removed the pins");
    Ok(())
}

#[test]
fn a_process_inside_a_principal_may_not_enrol() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("nested")? else {
        return Ok(());
    };
    // Under default deny the kernel itself refuses the agent's socket to a principal (the
    // unix hooks, kernel 6.7+); allow it here so that the API's own refusal is what is tested.
    let socket = spec.socket.display().to_string();
    let text = policy(ALLOWED, DENIED)?
        .replace(
            "  connect:\n",
            "  connect:\n    - { action: allow, zones: [agent] }\n",
        )
        .replace(
            "  zones:\n",
            &format!("  zones:\n    agent: {{ unix: [\"{socket}\"] }}\n"),
        );
    spec.write_policy(&text)?;
    let _agent = Agent::start(&spec, true, &[])?;
    let corral_bin = bin("corral")?.display().to_string();
    let out = run_as(
        &spec,
        "spiffe://e2e.corral/agent/outer",
        "outer",
        &[
            &corral_bin,
            "run",
            "--socket",
            &socket,
            "--identity",
            "spiffe://e2e.corral/agent/inner",
            "--",
            "/bin/true",
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    println!("inner enrol: {} {err}", out.status);
    assert!(!out.status.success(), "the nested enrol must fail");
    assert!(
        err.contains("the agent refused") && err.contains("inside an enrolled principal"),
        "PermissionDenied with a reason: {err}"
    );
    // Events are every principal's decisions: refused from inside.
    let out = run_as(
        &spec,
        "spiffe://e2e.corral/agent/outer",
        "outer3",
        &[&corral_bin, "events", "--socket", &socket],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "events from inside a principal must fail"
    );
    assert!(
        err.contains("inside an enrolled principal") && err.contains("may not watch events"),
        "PermissionDenied with a reason: {err}"
    );
    // Status works from inside, showing the caller's own principal only.
    let out = run_as(
        &spec,
        "spiffe://e2e.corral/agent/outer",
        "outer2",
        &[&corral_bin, "status", "--json", "--socket", &socket],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inside: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sessions: Vec<&str> = inside["principals"]
        .as_array()
        .context("principals")?
        .iter()
        .filter_map(|p| p["session"].as_str())
        .collect();
    assert_eq!(sessions, ["outer2"], "{inside}");
    // Explaining (reading the policies) is refused from inside.
    let out = run_as(
        &spec,
        "spiffe://e2e.corral/agent/outer",
        "outer4",
        &[
            &corral_bin,
            "policy",
            "explain",
            "--socket",
            &socket,
            "--identity",
            "spiffe://e2e.corral/agent/other",
            "--connect",
            "127.0.0.1:80",
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("may not explain policies"),
        "explain from inside a principal: {} {err}",
        out.status
    );
    let s = status(&spec)?;
    let ids: Vec<&str> = s["principals"]
        .as_array()
        .context("principals")?
        .iter()
        .filter_map(|p| p["identity"].as_str())
        .collect();
    assert!(!ids.contains(&"spiffe://e2e.corral/agent/inner"), "{ids:?}");
    Ok(())
}

#[test]
fn invalid_edit_keeps_the_old_policy_and_a_valid_edit_applies_within_a_second() -> anyhow::Result<()>
{
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("reload")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let _agent = Agent::start(&spec, true, &[])?;
    let id = "spiffe://e2e.corral/agent/reload";
    let (a, d) = (udp(ALLOWED), udp(DENIED));
    assert_eq!(probe_cmd(&spec, id, "r1", &[&a, &d])?, ["ok", "EPERM"]);

    // Invalid: an unknown field. Rejected whole; the error is in status; old policy enforced.
    let bad =
        policy(ALLOWED, DENIED)?.replace("  mode: enforce\n", "  mode: enforce\n  bogus: 1\n");
    spec.write_policy(&bad)?;
    let s = wait_for(5, "status to show the rejection", || {
        let s = status(&spec)?;
        Ok((s["last_error"].as_str().is_some_and(|e| !e.is_empty())).then_some(s))
    })?;
    let err = s["last_error"].as_str().unwrap_or_default();
    println!("rejected: {err}");
    assert!(
        err.contains(&format!("{}:", spec.policy.display())) && err.contains("bogus"),
        "file:line:col diagnostic naming the field: {err}"
    );
    assert_eq!(s["policy_revision"], 1, "still the old revision");
    assert_eq!(probe_cmd(&spec, id, "r2", &[&a, &d])?, ["ok", "EPERM"]);

    // Valid: the ports swap roles. Enforced within 1 s of the write.
    spec.write_policy(&policy(DENIED, ALLOWED)?)?;
    let t0 = Instant::now();
    let mut n = 0;
    let elapsed = wait_for(5, "the new policy", || {
        n += 1;
        let r = probe_cmd(&spec, id, &format!("r3-{n}"), &[&d, &a])?;
        Ok((r == ["ok", "EPERM"]).then(|| t0.elapsed()))
    })?;
    println!("new policy enforced {elapsed:?} after the write");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    let s = status(&spec)?;
    assert_eq!(s["policy_revision"], 2);
    assert_eq!(s["last_error"], "");
    Ok(())
}

#[test]
fn restarted_agent_keeps_policing_and_knows_the_principal() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(spec) = Spec::new("restart")? else {
        return Ok(());
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let mut first = Agent::start(&spec, false, &[])?;
    let id = "spiffe://e2e.corral/agent/restart";
    let stop = spec.dir.join("stop");
    let probe = probe_bin()?.display().to_string();
    // A principal that keeps trying the denied port across the restart (a new probe process
    // every 20 ms, so exec and connect are both policed throughout).
    let script = format!(
        "while [ ! -e {stop} ]; do {probe} {op}; sleep 0.02; done",
        stop = stop.display(),
        op = udp(DENIED)
    );
    let child = Command::new(bin("corral")?)
        .args(["run", "--socket"])
        .arg(&spec.socket)
        .args([
            "--identity",
            id,
            "--session",
            "sess-restart",
            "--",
            "/bin/sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut looper = Reaped(Some(child));
    wait_for(5, "the principal to run", || {
        let s = status(&spec)?;
        Ok(s["principals"]
            .as_array()
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p["identity"] == id && p["processes"].as_u64() >= Some(1))
            })
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        first.stop()?,
        "first agent stops cleanly:\n{}",
        first.log_text()
    );
    assert!(spec.pins.exists(), "pins stay without --uninstall");
    // No agent at all for a moment: the pins enforce.
    std::thread::sleep(Duration::from_millis(300));
    let second = Agent::start(&spec, true, &[])?;
    let s = status(&spec)?;
    let p = s["principals"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["identity"] == id).cloned())
        .with_context(|| format!("restarted agent must know the principal: {s}"))?;
    assert_eq!(p["session"], "sess-restart");
    assert!(p["processes"].as_u64() >= Some(1), "{p}");
    // Events of the running principal carry its identity in the new agent.
    let e = wait_for(5, "an event attributed by the new agent", || {
        Ok(events(&spec, &["--identity", id])?
            .into_iter()
            .find(|e| is_deny_to(e, DENIED)))
    })?;
    assert_eq!(e["principal"]["session"], "sess-restart");
    std::thread::sleep(Duration::from_millis(300));

    std::fs::write(&stop, b"")?;
    let out = looper.0.take().context("looper")?.wait_with_output()?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    println!(
        "{} connects across the restart: {:?}",
        lines.len(),
        lines.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        lines.len() >= 10,
        "the loop ran across the restart: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| l == "EPERM"),
        "every connect across the restart is denied: {lines:?}"
    );
    drop(second);
    Ok(())
}
