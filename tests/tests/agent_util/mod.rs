//! The end-to-end agent harness shared by `e2e_agent.rs` and `e2e_agent_observe.rs`: each test
//! runs its own agent with its own socket, state directory, policy file, principals' cgroup
//! directory and pin directory (under bpffs), stops it by pid with SIGTERM, and removes its pins
//! (`--uninstall`, and again from the guard if the agent died).

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_agent::{cgroup, ebpf::PinDir, paths};
use corral_tests::{e2e::bin, probe_bin};
use serde_json::Value;

pub const ALLOWED: u16 = 7;
pub const DENIED: u16 = 9;

pub fn bpffs() -> Option<PathBuf> {
    paths::find_mount("bpf").ok()
}

/// The test policy: `allow` and `deny` are UDP/TCP ports on loopback; exec of the build's
/// binaries and of system tools is allowed.
pub fn policy(allow: u16, deny: u16) -> anyhow::Result<String> {
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
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
pub struct Spec {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub policy: PathBuf,
    pub pins: PathBuf,
    pub cgroups: PathBuf,
}

impl Spec {
    pub fn new(name: &str) -> anyhow::Result<Option<Self>> {
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

    pub fn write_policy(&self, text: &str) -> anyhow::Result<()> {
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
pub struct Agent {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(spec: &Spec, uninstall: bool, extra: &[&str]) -> anyhow::Result<Self> {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM by pid and wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> anyhow::Result<bool> {
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

pub fn corral(spec: &Spec, args: &[&str]) -> anyhow::Result<Output> {
    let mut c = Command::new(bin("corral")?);
    let (sub, rest) = args.split_first().context("a subcommand")?;
    c.arg(sub).arg("--socket").arg(&spec.socket).args(rest);
    c.output().context("run corral")
}

/// `corral run --identity ID --session S -- CMD...`.
pub fn run_as(spec: &Spec, identity: &str, session: &str, cmd: &[&str]) -> anyhow::Result<Output> {
    let mut args = vec!["run", "--identity", identity, "--session", session, "--"];
    args.extend_from_slice(cmd);
    corral(spec, &args)
}

pub fn probe_cmd(
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

pub fn status(spec: &Spec) -> anyhow::Result<Value> {
    let out = corral(spec, &["status", "--json"])?;
    ensure!(
        out.status.success(),
        "corral status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn events(spec: &Spec, args: &[&str]) -> anyhow::Result<Vec<Value>> {
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

pub fn is_deny_to(e: &Value, port: u16) -> bool {
    e["connect"]["port"] == port && e["decision"]["verdict"] == "deny"
}
