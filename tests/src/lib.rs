//! Helpers for Corral's privileged integration tests: real programs in the real kernel, real
//! processes in real cgroups.
//!
//! A test that cannot run because the kernel lacks a feature prints `SKIP: <reason>` and
//! returns; under `CI=true` a skip is a failure unless the feature is listed as absent on the
//! CI machine kind (see [`skip`]).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use corral_agent::{cgroup, paths};

/// Features CI machines are known to lack (BPF LSM / trampolines: EPERM on the CI VM).
pub const ABSENT_IN_CI: &[&str] = &["bpf-lsm", "fentry"];

/// Skips the current test with a reason, or fails it when running in CI and `feature` is one
/// this machine kind has.
pub fn skip(feature: &str, reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci && !ABSENT_IN_CI.contains(&feature) {
        panic!("CI=true: refusing to skip `{feature}`, which CI machines support: {reason}");
    }
    println!("SKIP: {feature}: {reason}");
}

/// `true` if privileged tests can run here; otherwise prints the skip (or fails under CI).
pub fn privileged() -> bool {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_default();
    if euid != "0" {
        skip(
            "root",
            "privileged tests need root (run them with `cargo xtask test`)",
        );
        return false;
    }
    true
}

/// A cgroup v2 directory of the test's own, removed on drop (after its processes are gone).
pub struct TestCgroup {
    pub path: PathBuf,
    pub root: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/corral-test/<name>-<pid>`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = paths::cgroup2_root()?;
        let path = root
            .join("corral-test")
            .join(format!("{name}-{}", std::process::id()));
        cgroup::create(&path)?;
        Ok(Self { path, root })
    }

    pub fn id(&self) -> anyhow::Result<u64> {
        Ok(cgroup::id(&self.path)?)
    }

    pub fn level(&self) -> u32 {
        cgroup::level(&self.root, &self.path).unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes started by the tests have exited (they are waited for); remove the dirs.
        let _ = cgroup::remove(&self.path);
    }
}

/// What the probe printed for one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Errno(String),
}

/// Path of the `corral-probe` helper binary, beside the running executable: cargo puts test
/// executables in `target/<profile>/deps/` and binaries in `target/<profile>/`.
pub fn probe_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("executable {} has no parent", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.join("corral-probe"))
}

/// Runs `corral-probe` inside `cgroup` (it joins the cgroup itself before acting) and returns
/// the outcome of each operation.
pub fn probe_in(cgroup: &Path, ops: &[&str]) -> anyhow::Result<Vec<Outcome>> {
    run_probe(Some(cgroup), ops)
}

/// Runs `corral-probe` where the test runs, outside every principal.
pub fn probe_outside(ops: &[&str]) -> anyhow::Result<Vec<Outcome>> {
    run_probe(None, ops)
}

fn run_probe(cgroup: Option<&Path>, ops: &[&str]) -> anyhow::Result<Vec<Outcome>> {
    let mut cmd = Command::new(probe_bin()?);
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    let out = cmd.args(ops).output().context("run corral-probe")?;
    anyhow::ensure!(
        out.status.success(),
        "corral-probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| match l.trim() {
            "ok" => Outcome::Ok,
            other => Outcome::Errno(other.to_owned()),
        })
        .collect())
}

/// A loopback TCP listener that accepts in the background; its port is ephemeral.
pub struct Listener {
    pub port: u16,
    _thread: std::thread::JoinHandle<()>,
}

impl Listener {
    pub fn tcp(addr: &str) -> anyhow::Result<Self> {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        let port = l.local_addr()?.port();
        let thread = std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
        Ok(Self {
            port,
            _thread: thread,
        })
    }
}

/// Builds compiled policies for tests, without YAML.
pub mod e2e;
pub mod fleet;
/// A real node (server + agent) and a prober in a principal, for latency benchmarks.
pub mod harness;

pub mod build {
    use std::net::IpAddr;

    use corral_policy::{
        compiled::{
            Action, ChainRule, CompiledPolicy, CompiledSet, ConnectRule, ExecRule, Mode, Net, Zone,
        },
        identity::IdentityPattern,
    };

    pub struct PolicyBuilder(CompiledPolicy);

    /// A policy governing `spiffe://test.corral/**` with default deny, enforce mode.
    pub fn policy(name: &str) -> PolicyBuilder {
        PolicyBuilder(CompiledPolicy {
            name: name.into(),
            identities: vec![
                IdentityPattern::parse("spiffe://test.corral/**").expect("valid test pattern"),
            ],
            mode: Mode::Enforce,
            default_action: Action::Deny,
            ..CompiledPolicy::default()
        })
    }

    fn net(cidr: &str) -> Net {
        let (a, b) = cidr.split_once('/').expect("cidr has a /");
        let addr: IpAddr = a.parse().expect("cidr address");
        Net::new(addr, b.parse().expect("cidr bits")).expect("valid cidr")
    }

    impl PolicyBuilder {
        pub fn zone(mut self, name: &str, cidrs: &[&str]) -> Self {
            self.0.zones.push(Zone {
                name: name.into(),
                nets: cidrs.iter().map(|c| net(c)).collect(),
            });
            self
        }

        fn zone_index(&self, name: &str) -> u32 {
            self.0
                .zones
                .iter()
                .position(|z| z.name == name)
                .and_then(|i| u32::try_from(i).ok())
                .unwrap_or_else(|| panic!("test policy has no zone {name}"))
        }

        fn rule(mut self, action: Action, zones: &[&str], ports: &[u16], protos: &[u8]) -> Self {
            let index = u32::try_from(self.0.connect.len()).expect("few rules");
            let zones = zones.iter().map(|z| self.zone_index(z)).collect();
            self.0.connect.push(ConnectRule {
                index,
                action,
                zones,
                ports: ports.to_vec(),
                protocols: protos.to_vec(),
            });
            self
        }

        pub fn allow(self, zones: &[&str], ports: &[u16], protos: &[u8]) -> Self {
            self.rule(Action::Allow, zones, ports, protos)
        }

        pub fn deny(self, zones: &[&str], ports: &[u16], protos: &[u8]) -> Self {
            self.rule(Action::Deny, zones, ports, protos)
        }

        pub fn chain(mut self, after: &[&str], deny: &[&str]) -> Self {
            let after = after.iter().map(|z| self.zone_index(z)).collect();
            let deny = deny.iter().map(|z| self.zone_index(z)).collect();
            self.0.chaining.push(ChainRule { after, deny });
            self
        }

        /// Adds exec rules (in order; their indices are taken as given).
        pub fn exec(mut self, rules: Vec<ExecRule>) -> Self {
            self.0.exec.extend(rules);
            self
        }

        /// Allows every exec (see [`crate::exec_rules::allow_all`]).
        pub fn allow_all_exec(self) -> Self {
            self.exec(crate::exec_rules::allow_all())
        }

        pub fn audit(mut self) -> Self {
            self.0.mode = Mode::Audit;
            self
        }

        pub fn default_allow(mut self) -> Self {
            self.0.default_action = Action::Allow;
            self
        }

        pub fn build(self) -> CompiledPolicy {
            self.0
        }
    }

    pub fn set(revision: u64, policies: Vec<CompiledPolicy>) -> CompiledSet {
        CompiledSet { revision, policies }
    }
}

/// Exec rules for tests that are not about exec: under default deny, an enrolled process may
/// exec nothing that no rule allows (e.g. `setsid` or a helper binary).
pub mod exec_rules {
    use corral_policy::compiled::{Action, ExecRule};

    /// Exec rules allowing every exec: the prefix `/` (the agent adds every filesystem mounted
    /// below it). See `build::PolicyBuilder::allow_all_exec`.
    pub fn allow_all() -> Vec<ExecRule> {
        vec![ExecRule {
            index: 0,
            action: Action::Allow,
            exact: vec![],
            prefixes: vec!["/".into()],
        }]
    }
}
