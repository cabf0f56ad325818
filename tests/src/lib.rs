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

impl Outcome {
    /// The outcome of a call Corral refused.
    pub fn eperm() -> Self {
        Self::Errno("EPERM".into())
    }
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

/// `corral-probe session` in a cgroup: commands in, one line out each (see
/// `src/bin/probe/session.rs`), so a test holds sockets open across a change it makes.
pub struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    pub fn start(cgroup: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(probe_bin()?)
            .arg("--cgroup")
            .arg(cgroup)
            .arg("session")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("start corral-probe session")?;
        let stdin = child.stdin.take().context("probe stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("probe stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// The probe's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs one command; its outcome line (`ok`, `EPERM`, `EAGAIN`, ...).
    pub fn cmd(&mut self, line: &str) -> anyhow::Result<String> {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("the probe session is gone at `{line}`"))?;
        let mut out = String::new();
        self.stdout.read_line(&mut out)?;
        anyhow::ensure!(!out.is_empty(), "the probe session ended at `{line}`");
        Ok(out.trim().to_owned())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP or UDP server that counts what it receives and can answer its peers.
pub struct Sink {
    pub port: u16,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tcp_peers: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    udp: Option<(
        std::net::UdpSocket,
        std::sync::Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    )>,
}

impl Sink {
    pub fn tcp(addr: &str) -> anyhow::Result<Self> {
        use std::io::Read as _;
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        let port = l.local_addr()?.port();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tcp_peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, peers) = (received.clone(), tcp_peers.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let Ok(mut reader) = s.try_clone() else {
                    continue;
                };
                if let Ok(mut p) = peers.lock() {
                    p.push(s);
                }
                let count = count.clone();
                std::thread::spawn(move || {
                    let mut b = [0u8; 256];
                    while let Ok(n) = reader.read(&mut b) {
                        if n == 0 {
                            break;
                        }
                        count.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        Ok(Self {
            port,
            received,
            tcp_peers,
            udp: None,
        })
    }

    pub fn udp(addr: &str) -> anyhow::Result<Self> {
        let sock = std::net::UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
        let port = sock.local_addr()?.port();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, seen, reader) = (received.clone(), peers.clone(), sock.try_clone()?);
        std::thread::spawn(move || {
            let mut b = [0u8; 256];
            while let Ok((n, from)) = reader.recv_from(&mut b) {
                count.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                if let Ok(mut p) = seen.lock()
                    && !p.contains(&from)
                {
                    p.push(from);
                }
            }
        });
        Ok(Self {
            port,
            received,
            tcp_peers: std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
            udp: Some((sock, peers)),
        })
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits up to `timeout` for at least `n` bytes in all; the count then.
    pub fn wait_for(&self, n: usize, timeout: std::time::Duration) -> usize {
        let t0 = std::time::Instant::now();
        while self.received() < n && t0.elapsed() < timeout {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.received()
    }

    /// Sends one byte to every peer seen.
    pub fn answer(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        if let Some((sock, peers)) = &self.udp {
            for p in peers
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .iter()
            {
                sock.send_to(b"y", p)?;
            }
        }
        for mut s in self
            .tcp_peers
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
        {
            s.write_all(b"y")?;
        }
        Ok(())
    }
}

pub mod dnsmasq;
pub mod e2e;
pub mod fleet;
/// A real node (server + agent) and a prober in a principal, for latency benchmarks.
pub mod harness;
pub mod netns;
pub mod postgres;

/// Builds compiled policies for tests, without YAML.
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

        /// A zone by host name (no addresses of its own: DNS answers put them in it).
        pub fn hosts_zone(mut self, name: &str, hosts: &[&str]) -> Self {
            let zone = u32::try_from(self.0.zones.len()).expect("few zones");
            self.0.zones.push(Zone {
                name: name.into(),
                nets: Vec::new(),
            });
            for h in hosts {
                self.0.hosts.push(corral_policy::compiled::HostZone {
                    zone,
                    pattern: corral_policy::hosts::HostPattern::parse(h).expect("valid host"),
                });
            }
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
