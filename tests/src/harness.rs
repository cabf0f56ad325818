//! A real node for latency benchmarks: one `corral-server` (plaintext loopback, temporary
//! database) and one `corral-agent --server` enforcing in the real kernel, run by the fleet
//! harness ([`crate::fleet`]: own socket, state, cgroup and pin directories, every process
//! stopped by pid on drop, also on error paths); gRPC clients for both; and a [`Prober`], a
//! process inside an enrolled principal's cgroup that repeats one operation and reports each
//! change of its outcome with a CLOCK_MONOTONIC timestamp.
//!
//! A scenario is "do something, then wait until the kernel decides differently":
//!
//! ```text
//! let h = Harness::start("apply", &[])?;
//! h.apply("bench.yaml", &allowing)?;
//! let mut p = h.prober("spiffe://bench.corral/p", &format!("tcp:127.0.0.1:{port}"), interval)?;
//! let m = p.measure("EPERM", timeout, || h.apply("bench.yaml", &denying))?;
//! // m.enforced: from just before the call to the prober's first EPERM.
//! ```
//!
//! Other services of the server (grants, ...) take [`Harness::channel`] and run their calls
//! with [`Harness::block_on`] inside the `measure` closure.

use std::{
    io::{BufRead as _, BufReader},
    marker::PhantomData,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_agent::paths;
use corral_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient,
    policy_service_client::PolicyServiceClient,
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::{
    e2e::wait_for,
    fleet::{self, Agent, Dir, Node, Server},
    probe_bin,
};

/// Nanoseconds on CLOCK_MONOTONIC (the clock of `Instant`, comparable across processes).
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(ts.tv_sec).unwrap_or_default();
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or_default();
    secs * 1_000_000_000 + nanos
}

/// Unix time in nanoseconds (the server's clock for ACK times; same host).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Resident set size of a process, in KiB (0 if gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Server + agent + clients. Fields drop in order: the clients' runtime first (closing their
/// connections, so the server does not wait for them to drain), then the agent (which removes
/// its pins: `--uninstall`), the server, the node's leftovers and the directory.
pub struct Harness {
    policy: PolicyServiceClient<Channel>,
    agent_api: AgentServiceClient<Channel>,
    channel: Channel,
    rt: tokio::runtime::Runtime,
    agent: Agent,
    server: Server,
    node: Node,
    dir: Dir,
}

impl Harness {
    /// Starts the server and an agent connected to it (`agent_args` are added to the agent's
    /// command line), and waits until the agent reports the server connected.
    pub fn start(name: &str, agent_args: &[&str]) -> anyhow::Result<Self> {
        let dir = Dir::new(name)?;
        let node = Node::new(&dir, "node")?.context("no bpffs mounted (`cargo xtask setup`)")?;
        let server = Server::start(&dir, fleet::free_port()?)?;
        let agent = Agent::start(&node, &server.url, agent_args)?;
        wait_for(15, "the agent to connect to the server", || {
            fleet::connected(&node)
        })
        .with_context(|| agent.log_text())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = rt
            .block_on(Endpoint::from_shared(server.url.clone())?.connect())
            .context("connect to corral-server")?;
        let socket = node.socket.clone();
        let agent_channel = rt
            .block_on(
                Endpoint::from_static("http://corral-agent.local").connect_with_connector(
                    tower::service_fn(move |_| {
                        let socket = socket.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }),
                ),
            )
            .context("connect to the agent's socket")?;
        Ok(Self {
            policy: PolicyServiceClient::new(channel.clone()),
            agent_api: AgentServiceClient::new(agent_channel),
            channel,
            rt,
            agent,
            server,
            node,
            dir,
        })
    }

    /// Runs a future of a client call on the harness's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The server (its CLI helpers, e.g. [`Server::cli_as`]).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// A channel to the server, for any of its services.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn policy_client(&self) -> PolicyServiceClient<Channel> {
        self.policy.clone()
    }

    pub fn server_url(&self) -> &str {
        &self.server.url
    }

    /// The node's name, as in the server's status.
    pub fn node_name(&self) -> &str {
        &self.node.name
    }

    /// This run's temporary directory (removed on drop).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir.0
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.child.as_ref().map(Child::id)
    }

    pub fn server_pid(&self) -> Option<u32> {
        self.server.child.as_ref().map(Child::id)
    }

    /// The last lines of both daemons' logs, for error messages.
    pub fn logs(&self) -> String {
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        format!(
            "agent log (tail):\n{}\nserver log (tail):\n{}",
            tail(self.agent.log_text()),
            tail(self.server.log_text())
        )
    }

    /// `PolicyService.Apply`.
    pub fn apply(&self, file_name: &str, yaml: &str) -> anyhow::Result<pb::ApplyResponse> {
        let mut c = self.policy.clone();
        let r = self.block_on(c.apply(pb::ApplyRequest {
            file_name: file_name.into(),
            yaml: yaml.into(),
        }))?;
        Ok(r.into_inner())
    }

    /// This node in the server's `Status`.
    pub fn node_status(&self) -> anyhow::Result<pb::NodeStatus> {
        let mut c = self.policy.clone();
        let s = self.block_on(c.status(pb::PolicyStatusRequest {}))?;
        s.into_inner()
            .nodes
            .into_iter()
            .find(|n| n.node == self.node.name)
            .context("this node is not in the server's status")
    }

    /// Waits until the server has this node's ACK of `revision` (or a later one); returns the
    /// node's status then (`acked_unix_nano`: when the server recorded the ACK). A NACK fails.
    pub fn wait_acked(&self, revision: u64, timeout: Duration) -> anyhow::Result<pb::NodeStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.node_status()?;
            if n.acked_revision >= revision {
                return Ok(n);
            }
            if n.nacked_revision >= revision {
                bail!("the node NACKed revision {revision}: {}", n.nack_detail);
            }
            if Instant::now() > deadline {
                bail!(
                    "revision {revision} not ACKed in {timeout:?} (node at {})\n{}",
                    n.acked_revision,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `AgentService.Enroll`: a new principal of `identity` (fresh session).
    pub fn enroll(&self, identity: &str) -> anyhow::Result<pb::EnrollResponse> {
        let mut c = self.agent_api.clone();
        let r = self.block_on(c.enroll(pb::EnrollRequest {
            identity: identity.into(),
            session: String::new(),
            ..Default::default()
        }))?;
        Ok(r.into_inner())
    }

    /// `AgentService.Status`.
    pub fn agent_status(&self) -> anyhow::Result<pb::AgentStatus> {
        let mut c = self.agent_api.clone();
        Ok(self.block_on(c.status(pb::StatusRequest {}))?.into_inner())
    }

    /// Enrols a principal of `identity` and starts `corral-probe watch:US:OP` in its cgroup:
    /// `op` is a probe operation (`tcp:127.0.0.1:PORT`, `udp:...`), repeated every
    /// `interval`. Returns once the probe reported its first outcome.
    pub fn prober(
        &self,
        identity: &str,
        op: &str,
        interval: Duration,
    ) -> anyhow::Result<Prober<'_>> {
        let enrolled = self.enroll(identity)?;
        let cg = enrolled.cgroup_path;
        let log = self
            .dir
            .0
            .join(format!("prober-{}.log", fleet::unique("p")));
        let mut child = Command::new(probe_bin()?)
            .arg("--cgroup")
            .arg(&cg)
            .arg(format!("watch:{}:{op}", interval.as_micros()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn corral-probe")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let parsed = l
                        .split_once(' ')
                        .and_then(|(at, o)| Some((at.parse().ok()?, o.to_owned())));
                    let Some((at_ns, outcome)) = parsed else {
                        continue;
                    };
                    if tx.send(Observation { at_ns, outcome }).is_err() {
                        return;
                    }
                }
            });
        }
        let mut p = Prober {
            child: Some(child),
            stdin,
            rx,
            current: String::new(),
            unexpected: 0,
            principal: enrolled.principal.unwrap_or_default(),
            log,
            _harness: PhantomData,
        };
        let first = p
            .rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow::anyhow!("the probe reported nothing in 10 s: {}", p.log_text()))?;
        p.current = first.outcome;
        Ok(p)
    }
}

/// One change of the prober's outcome.
#[derive(Debug, Clone)]
pub struct Observation {
    /// CLOCK_MONOTONIC ns, right after the operation returned.
    pub at_ns: u64,
    /// `ok` or the errno name (`EPERM`, ...).
    pub outcome: String,
}

/// One timed action.
#[derive(Debug, Clone)]
pub struct Measured<T> {
    /// What the action returned.
    pub value: T,
    /// Unix time just before the action (to compare with server times, e.g. ACKs).
    pub t0_wall_ns: u64,
    /// Until the action returned.
    pub action: Duration,
    /// Until the prober first saw the expected outcome.
    pub enforced: Duration,
}

/// `corral-probe watch` inside a principal's cgroup; it borrows the harness so it stops before
/// the agent and the cgroups go. Dropping it closes the probe's stdin (it exits), then waits
/// for it by pid (SIGKILL after 5 s).
pub struct Prober<'h> {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<Observation>,
    current: String,
    unexpected: u64,
    principal: pb::Principal,
    log: PathBuf,
    _harness: PhantomData<&'h Harness>,
}

impl Prober<'_> {
    /// The principal the probe runs as (identity, session, cgroup id).
    pub fn principal(&self) -> &pb::Principal {
        &self.principal
    }

    /// The outcome the probe reported last.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Changes of outcome that no measured action caused (a flapping decision), so far.
    pub fn unexpected_changes(&self) -> u64 {
        self.unexpected
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Takes the changes reported since the last measurement: none is expected.
    fn settle(&mut self) {
        while let Ok(o) = self.rx.try_recv() {
            self.unexpected += 1;
            self.current = o.outcome;
        }
    }

    /// Waits until the probe reports `outcome` (at once if it is the current one), after an
    /// action of the caller's: changes until then are not counted as unexpected.
    pub fn wait_for(&mut self, outcome: &str, timeout: Duration) -> anyhow::Result<()> {
        while let Ok(o) = self.rx.try_recv() {
            self.current = o.outcome;
        }
        let deadline = Instant::now() + timeout;
        while self.current != outcome {
            let left = deadline.saturating_duration_since(Instant::now());
            let o = self.rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "the probe did not see {outcome} in {timeout:?} (it sees {})",
                    self.current
                )
            })?;
            self.current = o.outcome;
        }
        Ok(())
    }

    /// Runs `action` and waits until the probe sees `expect`, which must differ from what it
    /// sees now. Times both from just before the action.
    pub fn measure<T>(
        &mut self,
        expect: &str,
        timeout: Duration,
        action: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<Measured<T>> {
        self.settle();
        ensure!(
            self.current != expect,
            "the probe already sees {expect}: nothing to measure"
        );
        let t0_wall_ns = wall_ns();
        let t0 = monotonic_ns();
        let value = action()?;
        let action = Duration::from_nanos(monotonic_ns().saturating_sub(t0));
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let o = self.rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "the probe did not see {expect} within {timeout:?} of the action (it sees \
                     {})",
                    self.current
                )
            })?;
            self.current.clone_from(&o.outcome);
            if o.at_ns < t0 {
                // A change from before the action: not caused by it.
                self.unexpected += 1;
            } else if o.outcome == expect {
                return Ok(Measured {
                    value,
                    t0_wall_ns,
                    action,
                    enforced: Duration::from_nanos(o.at_ns - t0),
                });
            }
        }
    }
}

impl Drop for Prober<'_> {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// p50/p99/max of a set of latencies (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Self {
        let mut s = samples.to_vec();
        s.sort();
        let rank = |p: f64| -> Duration {
            if s.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank: the smallest sample with at least p of them at or below it.
            let r = (p * s.len() as f64).ceil() as usize;
            s[r.clamp(1, s.len()) - 1]
        };
        Self {
            n: s.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: s.last().copied().unwrap_or_default(),
        }
    }

    /// `label  p50 ms  p99 ms  max ms  n`, aligned under [`Summary::HEADER`].
    pub fn row(&self, label: &str) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "  {label:<38} {:>9.2} {:>9.2} {:>9.2} {:>5}",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.n
        )
    }

    pub const HEADER: &str =
        "  (ms)                                         p50       p99       max     n";
}

/// The directory of the build's binaries (for exec rules of benchmark policies).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(probe_bin()?
        .parent()
        .context("binary directory")?
        .to_path_buf())
}

/// Whether the bpffs and cgroup v2 this harness needs are there (`None`) or why not.
pub fn unavailable() -> Option<String> {
    if paths::find_mount("bpf").is_err() {
        return Some("no bpffs mounted (`cargo xtask setup` mounts it)".into());
    }
    if let Err(e) = paths::cgroup2_root() {
        return Some(format!("no cgroup v2: {e}"));
    }
    None
}
