//! End to end: the real `corral-agent` and `corral` binaries as processes, talking gRPC over
//! the agent's unix socket, enforcing in the real kernel.
//!
//! Each test runs its own agent with its own socket, state directory, policy file, principals'
//! cgroup directory and pin directory (under bpffs), stops it by pid with SIGTERM, and removes
//! its pins (`--uninstall`, and again from the guard if the agent died).
//!
//! The binaries are built by `cargo xtask test` before the tests run (cargo builds only this
//! package's binaries for its tests); run `cargo build -p corral-agent -p corral-cli` first
//! when invoking `cargo test -p corral-tests` directly.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_agent::{cgroup, ebpf::PinDir, paths};
use corral_tests::{
    e2e::{Reaped, bin, udp, wait_for},
    privileged, probe_bin,
};
use serde_json::Value;

const ALLOWED: u16 = 7;
const DENIED: u16 = 9;

fn bpffs() -> Option<PathBuf> {
    paths::find_mount("bpf").ok()
}

/// The test policy: `allow` and `deny` are UDP/TCP ports on loopback; exec of the build's
/// binaries and of system tools is allowed.
fn policy(allow: u16, deny: u16) -> anyhow::Result<String> {
    let bindir = probe_bin()?
        .parent()
        .context("binary dir")?
        .display()
        .to_string();
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e
spec:
  identities:
    - spiffe://e2e.corral/**
  mode: enforce
  defaultAction: deny
  zones:
    local: {{ cidrs: [127.0.0.0/8] }}
  connect:
    - {{ action: allow, zones: [local], ports: [{allow}] }}
    - {{ action: deny,  zones: [local], ports: [{deny}] }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
    ))
}

/// Paths of one test's agent (shared by the agents of a restart).
struct Spec {
    dir: PathBuf,
    socket: PathBuf,
    policy: PathBuf,
    pins: PathBuf,
    cgroups: PathBuf,
}

impl Spec {
    fn new(name: &str) -> anyhow::Result<Option<Self>> {
        let Some(bpffs) = bpffs() else {
            corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
            return Ok(None);
        };
        let id = format!("e2e-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("corral-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let root = paths::cgroup2_root()?;
        Ok(Some(Self {
            socket: dir.join("agent.sock"),
            policy: dir.join("policy.yaml"),
            pins: bpffs.join(format!("corral-{id}")),
            cgroups: root.join("corral-test").join(id),
            dir,
        }))
    }

    fn write_policy(&self, text: &str) -> anyhow::Result<()> {
        std::fs::write(&self.policy, text).context("write the policy file")
    }
}

impl Drop for Spec {
    fn drop(&mut self) {
        // Whatever the agents left: pins (enforcement), principals' cgroups, files.
        if self.pins.exists() {
            let _ = PinDir::new(&self.pins).uninstall();
        }
        let _ = cgroup::remove(&self.cgroups);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running agent; SIGTERM on drop (then SIGKILL if it does not stop).
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(spec: &Spec, uninstall: bool, extra: &[&str]) -> anyhow::Result<Self> {
        let log = spec.dir.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let mut c = Command::new(bin("corral-agent")?);
        c.arg("--policy")
            .arg(&spec.policy)
            .arg("--socket")
            .arg(&spec.socket)
            .arg("--pin-dir")
            .arg(&spec.pins)
            .arg("--state-dir")
            .arg(spec.dir.join("state"))
            .arg("--cgroup-dir")
            .arg(&spec.cgroups)
            .arg("--policy-poll-ms")
            .arg("100")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if uninstall {
            c.arg("--uninstall");
        }
        let child = c.spawn().context("spawn corral-agent")?;
        let mut a = Self {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(ch) = a.child.as_mut()
                && let Some(st) = ch.try_wait()?
            {
                bail!("corral-agent exited with {st}:\n{}", a.log_text());
            }
            if spec.socket.exists() && corral(spec, &["status"])?.status.success() {
                return Ok(a);
            }
            if Instant::now() > deadline {
                bail!("corral-agent not ready in 30 s:\n{}", a.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM by pid and wait; returns whether it exited successfully.
    fn stop(&mut self) -> anyhow::Result<bool> {
        match self.child.take() {
            Some(mut c) => corral_tests::fleet::stop_child(&mut c),
            None => Ok(true),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn corral(spec: &Spec, args: &[&str]) -> anyhow::Result<Output> {
    let mut c = Command::new(bin("corral")?);
    let (sub, rest) = args.split_first().context("a subcommand")?;
    c.arg(sub).arg("--socket").arg(&spec.socket).args(rest);
    c.output().context("run corral")
}

/// `corral run --identity ID --session S -- CMD...`.
fn run_as(spec: &Spec, identity: &str, session: &str, cmd: &[&str]) -> anyhow::Result<Output> {
    let mut args = vec!["run", "--identity", identity, "--session", session, "--"];
    args.extend_from_slice(cmd);
    corral(spec, &args)
}

fn probe_cmd(
    spec: &Spec,
    identity: &str,
    session: &str,
    ops: &[&str],
) -> anyhow::Result<Vec<String>> {
    let probe = probe_bin()?.display().to_string();
    let mut cmd = vec![probe.as_str()];
    cmd.extend_from_slice(ops);
    let out = run_as(spec, identity, session, &cmd)?;
    ensure!(
        out.status.success(),
        "corral run probe failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

fn status(spec: &Spec) -> anyhow::Result<Value> {
    let out = corral(spec, &["status", "--json"])?;
    ensure!(
        out.status.success(),
        "corral status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn events(spec: &Spec, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut a = vec!["events", "--json"];
    a.extend_from_slice(args);
    let out = corral(spec, &a)?;
    ensure!(
        out.status.success(),
        "corral events: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l}")))
        .collect()
}

fn is_deny_to(e: &Value, port: u16) -> bool {
    e["connect"]["port"] == port && e["decision"]["verdict"] == "deny"
}

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
    let allows = events(&spec, &["--identity", id, "--verdict", "allow"])?;
    assert!(allows.iter().any(|e| e["connect"]["port"] == ALLOWED));
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
    // Reading is not changing: status works from inside.
    let out = run_as(
        &spec,
        "spiffe://e2e.corral/agent/outer",
        "outer2",
        &[&corral_bin, "status", "--socket", &socket],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
        hooks[..4],
        ["connect4", "connect6", "sendmsg4", "sendmsg6"],
        "{s}"
    );
    // The unix hooks are listed where the kernel has them (6.7+; this CI machine does).
    assert!(
        hooks.len() == 4 || hooks[4..] == ["connect_unix", "sendmsg_unix"],
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
