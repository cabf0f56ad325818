//! The fleet harness of the end-to-end tests: a real `corral-server`, real `corral-agent
//! --server` nodes and the real `corral` CLI as processes.
//!
//! Each test has its own server port and database, and each agent its own socket, state
//! directory, principals' cgroup directory and pin directory; every process is stopped by pid
//! from a Drop guard (SIGTERM, then SIGKILL), so a failing test leaves nothing running. Agents
//! run with `--uninstall`, so a restarted agent starts from nothing but its state directory.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_agent::{cgroup, ebpf::PinDir, paths};
use serde_json::Value;

use crate::{
    Outcome,
    e2e::{Reaped, bin, wait_for},
    probe_bin, probe_in,
};

pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("srv-{name}-{}-{nanos}", std::process::id())
}

/// A port nobody listens on now (the kernel's pick).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `ready` every 50 ms until it holds; fails with the log if `child` exits first or
/// `secs` pass. On failure the caller's guard still owns (and stops) the child.
fn wait_ready(
    child: &mut Option<Child>,
    log: &std::path::Path,
    what: &str,
    secs: u64,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(c) = child.as_mut()
            && let Some(st) = c.try_wait()?
        {
            bail!("{what} exited with {st}:\n{}", log_text());
        }
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} not ready in {secs} s:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a child by pid: SIGTERM, then SIGKILL after 15 s. Returns whether it exited 0.
pub fn stop_child(child: &mut Child) -> anyhow::Result<bool> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test's directory (database, logs, policy files, agent state), removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let d = std::env::temp_dir().join(format!("corral-{}", unique(name)));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }

    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.0.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `corral-server`; stopped by pid on drop.
pub struct Server {
    pub child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
    /// Added to every CLI call to this server (mTLS files).
    pub cli_args: Vec<String>,
}

impl Server {
    pub fn start(dir: &Dir, port: u16) -> anyhow::Result<Self> {
        Self::start_with(dir, port, None)
    }

    /// `tls`: the PKI directory `xtask certs` wrote; the CLI uses its `admin` certificate.
    pub fn start_with(dir: &Dir, port: u16, tls: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Self::start_args(dir, port, tls, &[])
    }

    /// [`Server::start_with`] with `extra` server arguments (e.g. `--policy-admin NAME`).
    pub fn start_args(
        dir: &Dir,
        port: u16,
        tls: Option<&std::path::Path>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let db = dir.0.join("server.db").display().to_string();
        Self::start_db(dir, port, &db, tls, extra)
    }

    /// A server on the database `db` (a SQLite path or a PostgreSQL URL).
    pub fn start_db(
        dir: &Dir,
        port: u16,
        db: &str,
        tls: Option<&std::path::Path>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log = dir.0.join(format!("server-{}.log", unique("log")));
        let mut c = Command::new(bin("corral-server")?);
        c.args(extra)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(db);
        let (url, cli_args) = match tls {
            None => {
                c.arg("--plaintext");
                (format!("http://127.0.0.1:{port}"), Vec::new())
            }
            Some(pki) => {
                c.args(tls_args(pki, "server"));
                (format!("https://localhost:{port}"), tls_args(pki, "admin"))
            }
        };
        let child = c
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn corral-server")?;
        let mut s = Self {
            child: Some(child),
            url,
            log,
            cli_args,
        };
        let mut child = s.child.take();
        let ready = wait_ready(&mut child, &s.log, "corral-server", 20, || {
            Ok(s.cli(&["policy", "list"])?.status.success())
        });
        s.child = child;
        ready.map(|()| s)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) -> anyhow::Result<bool> {
        match self.child.take() {
            Some(mut c) => stop_child(&mut c),
            None => Ok(true),
        }
    }

    /// `corral ARGS --server URL [mTLS files]`.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--server", self.url.as_str()]);
        a.extend(self.cli_args.iter().map(String::as_str));
        cli(&a)
    }

    /// [`Server::cli`] run as `uid` (gid the same): a plaintext server names the caller by
    /// the uid owning its socket, so this is how tests are different users.
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> anyhow::Result<Output> {
        use std::os::unix::process::CommandExt as _;
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--server", self.url.as_str()]);
        a.extend(self.cli_args.iter().map(String::as_str));
        Command::new(bin("corral")?)
            .args(&a)
            .uid(uid)
            .gid(uid)
            .env("HOME", "/")
            .output()
            .context("run corral")
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        let out = self.cli(&["policy", "status", "--json"])?;
        ensure!(
            out.status.success(),
            "corral policy status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn node(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let s = self.status()?;
        Ok(s["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == name).cloned()))
    }

    /// `corral grant ARGS --json` as `user`; the grant object it printed last.
    pub fn grant(&self, user: u32, args: &[&str]) -> anyhow::Result<Value> {
        let mut a = vec!["grant"];
        a.extend_from_slice(args);
        a.push("--json");
        let out = self.cli_as(user, &a)?;
        ensure!(
            out.status.success(),
            "corral grant {args:?}: {}",
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().context("a grant printed")?;
        Ok(serde_json::from_str(last)?)
    }

    /// `corral grant request ...` once this server knows the session: requests are checked
    /// against the sessions its nodes reported (one refused as unknown is tried again).
    pub fn request_when_known(&self, user: u32, args: &[&str]) -> anyhow::Result<Value> {
        wait_for(10, "the server to know the session", || {
            let mut a = vec!["grant"];
            a.extend_from_slice(args);
            a.push("--json");
            let out = self.cli_as(user, &a)?;
            if out.status.success() {
                let stdout = String::from_utf8_lossy(&out.stdout);
                let last = stdout.lines().last().context("a grant printed")?;
                return Ok(Some(serde_json::from_str(last)?));
            }
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(err.contains("session"), "grant request: {}", text(&out));
            Ok(None)
        })
    }

    /// `corral policy apply -f FILE --server URL [args]`.
    pub fn apply(&self, file: &std::path::Path, args: &[&str]) -> anyhow::Result<Output> {
        let f = file.display().to_string();
        let mut a = vec!["policy", "apply", "-f", &f];
        a.extend_from_slice(args);
        self.cli(&a)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// `--tls-cert DIR/NAME.pem --tls-key DIR/NAME-key.pem --tls-ca DIR/ca.pem`.
pub fn tls_args(pki: &std::path::Path, name: &str) -> Vec<String> {
    let f = |n: String| pki.join(n).display().to_string();
    vec![
        "--tls-cert".into(),
        f(format!("{name}.pem")),
        "--tls-key".into(),
        f(format!("{name}-key.pem")),
        "--tls-ca".into(),
        f("ca.pem".into()),
    ]
}

/// A development PKI from the real generator (`cargo xtask certs`, whose binary cargo built
/// into the same target directory).
pub fn pki(dir: &Dir, name: &str, clients: &[&str]) -> anyhow::Result<PathBuf> {
    let xtask = bin("xtask")?;
    let out = dir.0.join(name);
    let mut c = Command::new(xtask);
    c.arg("certs").arg("--out").arg(&out);
    for cl in clients {
        c.args(["--client", cl]);
    }
    let o = c.output().context("run xtask certs")?;
    ensure!(o.status.success(), "xtask certs: {}", text(&o));
    Ok(out)
}

pub fn cli(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(bin("corral")?)
        .args(args)
        .output()
        .context("run corral")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A principal kept alive by [`Node::hold`]; its cgroup directory.
pub struct Held {
    _sleep: Reaped,
    pub cgroup: PathBuf,
}

/// Runs the probe inside `cgroup` (no agent involved); one result per operation (`ok`,
/// `EPERM`, ...).
pub fn probe_cgroup(cgroup: &Path, ops: &[&str]) -> anyhow::Result<Vec<String>> {
    Ok(probe_in(cgroup, ops)?
        .into_iter()
        .map(|o| match o {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Errno(e) => e,
        })
        .collect())
}

/// Probes `op` in `cgroup` until it gives `want`; the time it took.
pub fn until(cgroup: &Path, op: &str, want: &str, secs: u64) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    wait_for(secs, &format!("{op} to give {want}"), || {
        Ok((probe_cgroup(cgroup, &[op])?.first().map(String::as_str) == Some(want)).then_some(()))
    })?;
    Ok(t0.elapsed())
}

/// One node: its agent's paths (shared by the agents of a restart). Pins and cgroups are
/// removed on drop whatever the agents left.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The agent's SPIFFE Workload API socket.
    pub workload: PathBuf,
    pub pins: PathBuf,
    pub cgroups: PathBuf,
}

impl Node {
    pub fn new(test: &Dir, name: &str) -> anyhow::Result<Option<Self>> {
        let Ok(bpffs) = paths::find_mount("bpf") else {
            crate::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
            return Ok(None);
        };
        let id = unique(name);
        let dir = test.0.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Some(Self {
            name: id.clone(),
            socket: dir.join("agent.sock"),
            workload: dir.join("workload.sock"),
            pins: bpffs.join(format!("corral-{id}")),
            cgroups: paths::cgroup2_root()?.join("corral-test").join(&id),
            dir,
        }))
    }

    pub fn local(&self, args: &[&str]) -> anyhow::Result<Output> {
        let (sub, rest) = args.split_first().context("a subcommand")?;
        Command::new(bin("corral")?)
            .arg(sub)
            .arg("--socket")
            .arg(&self.socket)
            .args(rest)
            .output()
            .context("run corral")
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        let out = self.local(&["status", "--json"])?;
        ensure!(out.status.success(), "corral status: {}", text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// A principal (`identity`, `session`) kept alive by `corral run ... -- sleep` until the
    /// result is dropped.
    pub fn hold(&self, identity: &str, session: &str) -> anyhow::Result<Held> {
        let child = Command::new(bin("corral")?)
            .args(["run", "--socket"])
            .arg(&self.socket)
            .args(["--identity", identity, "--session", session])
            .args(["--", "sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("corral run sleep")?;
        let sleep = Reaped(Some(child));
        let prefix = format!("{session}-");
        let cgroup = wait_for(10, "the principal's cgroup", || {
            Ok(std::fs::read_dir(&self.cgroups)
                .ok()
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                        && std::fs::read_to_string(p.join("cgroup.procs"))
                            .is_ok_and(|s| !s.trim().is_empty())
                }))
        })?;
        Ok(Held {
            _sleep: sleep,
            cgroup,
        })
    }

    /// Runs the probe as a principal of `spiffe://e2e.corral/agent/srv`; one line per
    /// operation (`ok`, `EPERM`, ...).
    pub fn probe(&self, session: &str, ops: &[&str]) -> anyhow::Result<Vec<String>> {
        self.probe_as("spiffe://e2e.corral/agent/srv", session, ops)
    }

    /// Runs the probe as principal (`identity`, `session`) through `corral run`.
    pub fn probe_as(
        &self,
        identity: &str,
        session: &str,
        ops: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let probe = probe_bin()?.display().to_string();
        let mut args = vec![
            "run",
            "--identity",
            identity,
            "--session",
            session,
            "--",
            probe.as_str(),
        ];
        args.extend_from_slice(ops);
        let out = self.local(&args)?;
        ensure!(out.status.success(), "corral run probe: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.pins.exists() {
            let _ = PinDir::new(&self.pins).uninstall();
        }
        let _ = cgroup::remove(&self.cgroups);
    }
}

/// A running `corral-agent --server URL`; stopped by pid on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// `corral-agent --server URL` (managed).
    pub fn start(node: &Node, url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_mode(node, &["--server", url], extra)
    }

    /// `corral-agent --policy FILE` (standalone).
    pub fn standalone(
        node: &Node,
        policy: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let policy = policy.display().to_string();
        Self::start_mode(node, &["--policy", &policy], extra)
    }

    fn start_mode(node: &Node, mode: &[&str], extra: &[&str]) -> anyhow::Result<Self> {
        let log = node.dir.join(format!("agent-{}.log", unique("log")));
        let child = Command::new(bin("corral-agent")?)
            .args(mode)
            .arg("--node-name")
            .arg(&node.name)
            .arg("--socket")
            .arg(&node.socket)
            .arg("--workload-socket")
            .arg(&node.workload)
            .arg("--pin-dir")
            .arg(&node.pins)
            .arg("--state-dir")
            .arg(node.dir.join("state"))
            .arg("--cgroup-dir")
            .arg(&node.cgroups)
            .arg("--uninstall")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn corral-agent")?;
        let mut a = Self {
            child: Some(child),
            log,
        };
        let mut child = a.child.take();
        let ready = wait_ready(&mut child, &a.log, "corral-agent", 30, || {
            Ok(node.socket.exists() && node.local(&["status"])?.status.success())
        });
        a.child = child;
        ready.map(|()| a)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) -> anyhow::Result<bool> {
        match self.child.take() {
            Some(mut c) => stop_child(&mut c),
            None => Ok(true),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

pub fn connected(node: &Node) -> anyhow::Result<Option<()>> {
    Ok((node.status()?["server_state"] == "connected").then_some(()))
}

/// `corral events --server URL --json --follow`, read on a thread; stopped on drop.
pub struct Follower {
    _child: crate::e2e::Reaped,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every event received so far, in order.
    seen: std::cell::RefCell<Vec<Value>>,
}

impl Follower {
    pub fn start(server: &Server) -> anyhow::Result<Self> {
        Self::start_url(&server.url, &server.cli_args)
    }

    /// `corral events --server URLS`: one URL, or a comma-separated list of replicas.
    pub fn start_url(urls: &str, cli_args: &[String]) -> anyhow::Result<Self> {
        let mut args = vec![
            "events".to_owned(),
            "--server".into(),
            urls.to_owned(),
            "--json".into(),
            "--follow".into(),
        ];
        args.extend(cli_args.iter().cloned());
        let mut child = Command::new(bin("corral")?)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn corral events --follow")?;
        let stdout = child.stdout.take().context("follower stdout")?;
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            _child: crate::e2e::Reaped(Some(child)),
            lines,
            seen: std::cell::RefCell::new(Vec::new()),
        })
    }

    /// The first event (JSON) so far for which `pred` holds, waiting up to `secs` for it.
    pub fn find(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        if let Some(e) = self.seen.borrow().iter().find(|e| pred(e)) {
            return Ok(e.clone());
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("{what} on the fleet event stream within {secs} s"))?;
            let e: Value = serde_json::from_str(&l)?;
            self.seen.borrow_mut().push(e.clone());
            if pred(&e) {
                return Ok(e);
            }
        }
    }
}

/// A policy for `identities` (an identity pattern) that lets its principals reach the SPIFFE
/// Workload API at `workload` and nothing else, and run the workspace's binaries and the
/// system's: what a workload asking for its credentials needs.
pub fn workload_api_policy(identities: &str, workload: &std::path::Path) -> anyhow::Result<String> {
    let bindir = crate::harness::bin_dir()?.display().to_string();
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: spiffe
spec:
  identities: [\"{identities}\"]
  mode: enforce
  defaultAction: deny
  zones:
    workload-api: {{ unix: [\"{}\"] }}
  connect:
    - {{ action: allow, zones: [workload-api] }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
",
        workload.display()
    ))
}
