//! End to end with the central server: real `corral-server`, real `corral-agent --server`
//! processes enforcing in the real kernel, the real `corral` CLI, and `corral-simnode` (the
//! simulated-node test tool) for fleet size.
//!
//! Each test has its own server port and database, and its agent its own socket, state
//! directory, principals' cgroup directory and pin directory; every process is stopped by pid
//! from a Drop guard (SIGTERM, then SIGKILL), so a failing test leaves nothing running. Agents
//! run with `--uninstall`, so a restarted agent starts from nothing but its state directory.
//!
//! The binaries are built by `cargo xtask test`; run `cargo build -p corral-agent -p corral-cli
//! -p corral-server -p corral-tests` first when invoking `cargo test -p corral-tests` directly.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
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

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("srv-{name}-{}-{nanos}", std::process::id())
}

/// A port nobody listens on now (the kernel's pick).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The test policy: `allow` and `deny` are ports on loopback; execs of the build's binaries
/// and of system tools are allowed. `extra` more connect rules (for the node-limit test).
fn policy(allow: u16, deny: u16, extra: usize) -> anyhow::Result<String> {
    let bindir = probe_bin()?
        .parent()
        .context("binary dir")?
        .display()
        .to_string();
    let mut more = String::new();
    for i in 0..extra {
        more.push_str(&format!(
            "    - {{ action: deny, zones: [local], ports: [{}] }}\n",
            20000 + i
        ));
    }
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-server
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
{more}  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
    ))
}

/// Stops a child by pid: SIGTERM, then SIGKILL after 15 s. Returns whether it exited 0.
fn stop_child(child: &mut Child) -> anyhow::Result<bool> {
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
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let d = std::env::temp_dir().join(format!("corral-{}", unique(name)));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
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
struct Server {
    child: Option<Child>,
    url: String,
    log: PathBuf,
    /// Added to every CLI call to this server (mTLS files).
    cli_args: Vec<String>,
}

impl Server {
    fn start(dir: &Dir, port: u16) -> anyhow::Result<Self> {
        Self::start_with(dir, port, None)
    }

    /// `tls`: the PKI directory `xtask certs` wrote; the CLI uses its `admin` certificate.
    fn start_with(dir: &Dir, port: u16, tls: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let log = dir.0.join(format!("server-{}.log", unique("log")));
        let mut c = Command::new(bin("corral-server")?);
        c.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(dir.0.join("server.db"));
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
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = s.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("corral-server exited with {st}:\n{}", s.log_text());
            }
            if s.cli(&["policy", "list"])?.status.success() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("corral-server not ready in 20 s:\n{}", s.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) -> anyhow::Result<bool> {
        match self.child.take() {
            Some(mut c) => stop_child(&mut c),
            None => Ok(true),
        }
    }

    /// `corral ARGS --server URL [mTLS files]`.
    fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--server", self.url.as_str()]);
        a.extend(self.cli_args.iter().map(String::as_str));
        cli(&a)
    }

    fn status(&self) -> anyhow::Result<Value> {
        let out = self.cli(&["policy", "status", "--json"])?;
        ensure!(
            out.status.success(),
            "corral policy status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn node(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let s = self.status()?;
        Ok(s["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == name).cloned()))
    }

    /// `corral policy apply -f FILE --server URL [args]`.
    fn apply(&self, file: &std::path::Path, args: &[&str]) -> anyhow::Result<Output> {
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
fn tls_args(pki: &std::path::Path, name: &str) -> Vec<String> {
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
fn pki(dir: &Dir, name: &str, clients: &[&str]) -> anyhow::Result<PathBuf> {
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

fn cli(args: &[&str]) -> anyhow::Result<Output> {
    Command::new(bin("corral")?)
        .args(args)
        .output()
        .context("run corral")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One node: its agent's paths (shared by the agents of a restart). Pins and cgroups are
/// removed on drop whatever the agents left.
struct Node {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    pins: PathBuf,
    cgroups: PathBuf,
}

impl Node {
    fn new(test: &Dir, name: &str) -> anyhow::Result<Option<Self>> {
        let Ok(bpffs) = paths::find_mount("bpf") else {
            corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
            return Ok(None);
        };
        let id = unique(name);
        let dir = test.0.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Some(Self {
            name: id.clone(),
            socket: dir.join("agent.sock"),
            pins: bpffs.join(format!("corral-{id}")),
            cgroups: paths::cgroup2_root()?.join("corral-test").join(&id),
            dir,
        }))
    }

    fn local(&self, args: &[&str]) -> anyhow::Result<Output> {
        let (sub, rest) = args.split_first().context("a subcommand")?;
        Command::new(bin("corral")?)
            .arg(sub)
            .arg("--socket")
            .arg(&self.socket)
            .args(rest)
            .output()
            .context("run corral")
    }

    fn status(&self) -> anyhow::Result<Value> {
        let out = self.local(&["status", "--json"])?;
        ensure!(out.status.success(), "corral status: {}", text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Runs the probe as a fresh principal; one line per operation (`ok`, `EPERM`, ...).
    fn probe(&self, session: &str, ops: &[&str]) -> anyhow::Result<Vec<String>> {
        let probe = probe_bin()?.display().to_string();
        let mut args = vec![
            "run",
            "--identity",
            "spiffe://e2e.corral/agent/srv",
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
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn start(node: &Node, url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let log = node.dir.join(format!("agent-{}.log", unique("log")));
        let child = Command::new(bin("corral-agent")?)
            .arg("--server")
            .arg(url)
            .arg("--node-name")
            .arg(&node.name)
            .arg("--socket")
            .arg(&node.socket)
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
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = a.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("corral-agent exited with {st}:\n{}", a.log_text());
            }
            if node.socket.exists() && node.local(&["status"])?.status.success() {
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

    fn stop(&mut self) -> anyhow::Result<bool> {
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

fn connected(node: &Node) -> anyhow::Result<Option<()>> {
    Ok((node.status()?["server_state"] == "connected").then_some(()))
}

#[test]
fn apply_is_enforced_within_a_second_a_change_holds_and_events_reach_the_fleet_stream()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("apply")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let server = Server::start(&dir, free_port()?)?;
    let agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 0, "no policy yet: {s}");

    // Follow the fleet's events from before the first decision.
    let mut follower = Command::new(bin("corral")?)
        .args(["events", "--server", &server.url, "--json", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = follower.stdout.take().context("follower stdout")?;
    let _follower = Reaped(Some(follower));
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });

    let file = dir.write("p1.yaml", &policy(ALLOWED, DENIED, 0)?)?;
    let out = server.apply(&file, &[])?;
    let returned = Instant::now();
    let t = text(&out);
    println!("apply:\n{t}");
    ensure!(
        out.status.success(),
        "apply failed: {t}\n{}",
        agent.log_text()
    );
    assert!(t.contains("revision 1: applied e2e-server"), "{t}");
    assert!(
        t.contains(&format!("{}: ACK revision 1 in ", node.name)),
        "the node's ACK and its time: {t}"
    );
    let (a, d) = (udp(ALLOWED), udp(DENIED));
    assert_eq!(node.probe("s1", &[&d, &a])?, ["EPERM", "ok"]);
    let within = returned.elapsed();
    println!("denied {within:?} after apply returned");
    assert!(
        within < Duration::from_secs(1),
        "denied within 1 s: {within:?}"
    );
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 1);
    assert_eq!(s["server_state"], "connected");

    // The deny reached the fleet stream with this node's name.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = rx
            .recv_timeout(left)
            .context("the deny event on the fleet stream within 10 s")?;
        let e: Value = serde_json::from_str(&l)?;
        if e["connect"]["port"] == DENIED && e["decision"]["verdict"] == "deny" {
            break e;
        }
    };
    println!("fleet event: {ev}");
    assert_eq!(ev["node"], node.name.as_str());
    assert_eq!(ev["principal"]["identity"], "spiffe://e2e.corral/agent/srv");
    assert_eq!(ev["decision"]["revision"], 1);

    // A change: the ports swap roles; the new rule holds at once.
    let file = dir.write("p2.yaml", &policy(DENIED, ALLOWED, 0)?)?;
    let out = server.apply(&file, &[])?;
    ensure!(out.status.success(), "apply failed: {}", text(&out));
    assert!(text(&out).contains(&format!("{}: ACK revision 2", node.name)));
    assert_eq!(node.probe("s2", &[&d, &a])?, ["ok", "EPERM"]);
    assert_eq!(node.status()?["policy_revision"], 2);
    let n = server.node(&node.name)?.context("node in status")?;
    assert_eq!(n["connected"], true);
    assert_eq!(n["acked_revision"], 2);
    Ok(())
}

#[test]
fn invalid_policy_is_rejected_and_a_node_limit_violation_is_nacked_keeping_the_old_revision()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("nack")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let server = Server::start(&dir, free_port()?)?;
    // The node limit is exactly the rules of the first policy (as `policy check` counts
    // them); two more connect rules are over it.
    let file = dir.write("ok.yaml", &policy(ALLOWED, DENIED, 0)?)?;
    let f = file.display().to_string();
    let check = cli(&["policy", "check", &f])?;
    ensure!(check.status.success(), "check: {}", text(&check));
    let words: Vec<String> = text(&check).split_whitespace().map(str::to_owned).collect();
    let count = |what: &str| -> anyhow::Result<usize> {
        let i = words.iter().position(|w| w == what).context("rule count")?;
        Ok(words[i - 1].parse()?)
    };
    let limit = count("connect")? + count("exec")?;
    let limit_arg = limit.to_string();
    let _agent = Agent::start(&node, &server.url, &["--max-rules", &limit_arg])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let out = server.apply(&file, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));

    // Invalid for the server: rejected with file:line:col; nothing changes.
    let bad = dir.write(
        "bad.yaml",
        &policy(ALLOWED, DENIED, 0)?.replace("127.0.0.0/8", "127.0.0.0/33"),
    )?;
    let out = server.apply(&bad, &[])?;
    let t = text(&out);
    println!("invalid:\n{t}");
    assert!(!out.status.success());
    assert!(
        t.contains(&format!("{}:11:", bad.display())) && t.contains("127.0.0.0/33"),
        "file:line:col diagnostic: {t}"
    );
    assert_eq!(server.status()?["revision"], 1, "no new revision");

    // Valid for the server, over this node's limit: NACKed; the node keeps revision 1.
    let big = dir.write("big.yaml", &policy(ALLOWED, DENIED, 2)?)?;
    let out = server.apply(&big, &[])?;
    let t = text(&out);
    println!("over the node limit:\n{t}");
    assert!(!out.status.success(), "a NACK fails the apply command");
    assert!(t.contains("revision 2: applied"), "{t}");
    assert!(
        t.contains(&format!("{}: NACK revision 2", node.name)) && t.contains("--max-rules"),
        "{t}"
    );
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 1, "old revision kept: {s}");
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("node limit exceeded")),
        "{s}"
    );
    let n = server.node(&node.name)?.context("node in status")?;
    println!("server status of the node: {n}");
    assert_eq!(n["acked_revision"], 1);
    assert_eq!(n["nacked_revision"], 2);
    assert!(
        n["nack_detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("at most {limit}"))),
        "{n}"
    );
    // Still enforcing revision 1.
    assert_eq!(
        node.probe("s1", &[&udp(DENIED), &udp(ALLOWED)])?,
        ["EPERM", "ok"]
    );
    Ok(())
}

#[test]
fn server_down_keeps_enforcement_lkg_applies_at_boot_and_the_node_resyncs() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("lkg")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let port = free_port()?;
    let mut server = Server::start(&dir, port)?;
    let mut agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let out = server.apply(&dir.write("p1.yaml", &policy(ALLOWED, DENIED, 0)?)?, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));
    let (a, d) = (udp(ALLOWED), udp(DENIED));

    // Server gone: enforcement unchanged, status says so.
    assert!(
        server.stop()?,
        "server exits cleanly:\n{}",
        server.log_text()
    );
    let s = wait_for(10, "status to show the lost server", || {
        let s = node.status()?;
        Ok((s["server_state"] != "connected").then_some(s))
    })?;
    assert_eq!(
        s["server_state"],
        "disconnected (enforcing last-known-good revision 1)"
    );
    assert_eq!(node.probe("s1", &[&d, &a])?, ["EPERM", "ok"]);

    // A new agent, fresh pins (the old one uninstalled its), server still down: the
    // last-known-good policy is enforced from boot.
    assert!(agent.stop()?, "agent exits cleanly:\n{}", agent.log_text());
    assert!(!node.pins.exists(), "--uninstall removed the pins");
    let agent2 = Agent::start(&node, &server.url, &[])?;
    assert_eq!(node.probe("s2", &[&d, &a])?, ["EPERM", "ok"]);
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 1);
    assert_eq!(
        s["server_state"],
        "disconnected (enforcing last-known-good revision 1)"
    );

    // Server back with a newer revision applied before the node reconnects: it resyncs.
    let server = Server::start(&dir, port)?;
    let out = server.apply(
        &dir.write("p2.yaml", &policy(DENIED, ALLOWED, 0)?)?,
        &["--no-wait"],
    )?;
    ensure!(out.status.success(), "apply: {}", text(&out));
    assert!(text(&out).contains("revision 2: applied"), "{}", text(&out));
    wait_for(30, "the node to resync to revision 2", || {
        let s = node.status()?;
        Ok((s["policy_revision"] == 2 && s["server_state"] == "connected").then_some(()))
    })
    .with_context(|| agent2.log_text())?;
    assert_eq!(node.probe("s3", &[&d, &a])?, ["ok", "EPERM"]);
    let n = server.node(&node.name)?.context("node in status")?;
    assert_eq!(n["acked_revision"], 2);
    Ok(())
}

/// Runs without root: simulated nodes load nothing into the kernel.
#[test]
fn a_hundred_simulated_nodes_ack_each_revision() -> anyhow::Result<()> {
    const NODES: usize = 100;
    let dir = Dir::new("sim")?;
    let server = Server::start(&dir, free_port()?)?;
    let sim = Command::new(bin("corral-simnode")?)
        .args(["--server", &server.url, "--nodes", &NODES.to_string()])
        .args(["--prefix", "sim"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn corral-simnode")?;
    // SIGTERM by pid, then SIGKILL; reaped either way.
    struct Sim(Child);
    impl Drop for Sim {
        fn drop(&mut self) {
            let _ = stop_child(&mut self.0);
        }
    }
    let _sim = Sim(sim);
    wait_for(30, "100 connected nodes", || {
        let s = server.status()?;
        let n = s["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["connected"] == true).count());
        Ok((n == NODES).then_some(()))
    })?;
    for (rev, (allow, deny)) in [(1u64, (ALLOWED, DENIED)), (2, (DENIED, ALLOWED))] {
        let file = dir.write(&format!("p{rev}.yaml"), &policy(allow, deny, 0)?)?;
        let t0 = Instant::now();
        let out = server.apply(&file, &[])?;
        let took = t0.elapsed();
        let t = text(&out);
        ensure!(out.status.success(), "apply: {t}");
        let acks = t
            .lines()
            .filter(|l| l.starts_with("sim-") && l.contains(&format!(": ACK revision {rev}")))
            .count();
        println!(
            "revision {rev}: {acks} ACKs, apply → all ACKed {took:?}; {}",
            t.lines().last().unwrap_or("")
        );
        assert_eq!(acks, NODES, "{t}");
        assert!(t.contains(&format!("{NODES} ACK, 0 NACK")), "{t}");
        let s = server.status()?;
        let all = s["nodes"].as_array().context("nodes")?;
        assert_eq!(all.len(), NODES);
        assert!(all.iter().all(|n| n["acked_revision"] == rev), "{s}");
    }
    Ok(())
}

#[test]
fn mtls_agent_and_cli_sync_and_enforce_and_strangers_are_refused() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("mtls")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    // The node's certificate carries its node name; the server checks it.
    let certs = pki(&dir, "pki", &["admin", &node.name])?;
    let server = Server::start_with(&dir, free_port()?, Some(&certs))?;
    let node_tls = tls_args(&certs, &node.name);
    let node_tls: Vec<&str> = node_tls.iter().map(String::as_str).collect();
    let agent = Agent::start(&node, &server.url, &node_tls)?;
    wait_for(10, "the agent to connect over mTLS", || connected(&node))
        .with_context(|| agent.log_text())?;
    let out = server.apply(&dir.write("p1.yaml", &policy(ALLOWED, DENIED, 0)?)?, &[])?;
    let t = text(&out);
    ensure!(out.status.success(), "apply over mTLS: {t}");
    assert!(t.contains(&format!("{}: ACK revision 1", node.name)), "{t}");
    assert_eq!(
        node.probe("s1", &[&udp(DENIED), &udp(ALLOWED)])?,
        ["EPERM", "ok"]
    );

    // A client certificate from another CA, and plaintext, are refused; nothing changes.
    let other = pki(&dir, "other", &["admin"])?;
    let p2 = dir.write("p2.yaml", &policy(DENIED, ALLOWED, 0)?)?;
    let p2s = p2.display().to_string();
    let mut args = vec![
        "policy",
        "apply",
        "-f",
        p2s.as_str(),
        "--server",
        &server.url,
    ];
    // The stranger trusts the real server (its CA) but presents a foreign client certificate.
    let mut stranger: Vec<String> = tls_args(&other, "admin")[..4].to_vec();
    stranger.extend([
        "--tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
    ]);
    args.extend(stranger.iter().map(String::as_str));
    let out = cli(&args)?;
    println!("foreign client certificate: {}", text(&out));
    assert!(
        !out.status.success(),
        "a foreign client certificate is refused"
    );
    let plain = server.url.replace("https://", "http://");
    let out = cli(&["policy", "apply", "-f", &p2s, "--server", &plain])?;
    assert!(!out.status.success(), "plaintext to the mTLS server fails");
    assert_eq!(server.status()?["revision"], 1);

    // A valid certificate issued to another name cannot sync as this node.
    drop(agent);
    let admin_tls = tls_args(&certs, "admin");
    let admin_tls: Vec<&str> = admin_tls.iter().map(String::as_str).collect();
    let impostor = Agent::start(&node, &server.url, &admin_tls)?;
    let log = wait_for(10, "the refusal in the agent's log", || {
        let l = impostor.log_text();
        Ok(l.contains("not issued to node").then_some(l))
    })?;
    println!(
        "impostor refused: {}",
        log.lines().find(|l| l.contains("not issued")).unwrap_or("")
    );
    assert_ne!(node.status()?["server_state"], "connected");
    let n = server.node(&node.name)?.context("node in status")?;
    assert_eq!(n["connected"], false, "{n}");
    Ok(())
}
