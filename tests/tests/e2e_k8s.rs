//! End to end, `corral-agent --kubernetes`: the real agent binary, in the real kernel, against a
//! fake Kubernetes API server (list + watch of pods and namespaces over plain HTTP on
//! loopback, pointed to by a kubeconfig) and a kubelet-style pod cgroup tree
//! (`kubepods/besteffort/pod<uid>`) under the test's own cgroup.
//!
//! What this exercises for real: kube-rs's watcher against the API's list/watch protocol, the
//! startup sync before readiness, pod → identity mapping, locating the pod cgroup, enrolment
//! as an external principal, kernel enforcement for a process in a container cgroup created
//! after enrolment, namespace-label opt-in arriving by watch, and removal on pod deletion; an
//! opted-in pod without a cgroup reported as not enrolled (status, CLI, metrics) until it is
//! enrolled or deleted; a running container of an enrolled pod that no OCI hook enrolled,
//! reported as missed; a SIGTERM while the API server withholds the first list.
//! What it does not: a real API server, kubelet or container runtime.

mod k8s_util;

use std::{
    io::Write as _,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_agent::{cgroup, ebpf::PinDir, paths};
use corral_tests::{
    Listener,
    e2e::{bin, wait_for},
    privileged, probe_in,
};
use k8s_util::{FakeApi, namespace, pod};
use serde_json::{Value, json};

const DENIED: u16 = 9;

/// The test's directories: state, pins, principals' cgroups, and a kubelet-style tree.
struct Spec {
    dir: PathBuf,
    socket: PathBuf,
    pins: PathBuf,
    cgroups: PathBuf,
    kube_root: PathBuf,
}

impl Spec {
    /// Fresh directories for one test (`name` keeps the tests of this file apart).
    fn new(name: &str, bpffs: &Path) -> anyhow::Result<Self> {
        let id = format!("e2e-k8s-{name}-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("corral-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let root = paths::cgroup2_root()?;
        Ok(Self {
            socket: dir.join("agent.sock"),
            pins: bpffs.join(format!("corral-{id}")),
            cgroups: root.join("corral-test").join(&id),
            kube_root: root.join("corral-test").join(format!("{id}-node")),
            dir,
        })
    }

    /// The kubelet's (cgroupfs driver) cgroup of a BestEffort pod.
    fn pod_cgroup(&self, uid: &str) -> PathBuf {
        self.kube_root.join(format!("kubepods/besteffort/pod{uid}"))
    }
}

impl Drop for Spec {
    fn drop(&mut self) {
        if self.pins.exists() {
            let _ = PinDir::new(&self.pins).uninstall();
        }
        let _ = cgroup::remove(&self.cgroups);
        let _ = cgroup::remove(&self.kube_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Agent(Option<Child>, PathBuf);

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// Fails if the agent has exited.
    fn running(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.0.as_mut()
            && let Some(st) = c.try_wait()?
        {
            bail!("corral-agent exited with {st}:\n{}", self.log());
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `corral-agent --kubernetes` (node `node-a`, trust domain `corral.test`) against
/// `api`, enforcing a policy that denies pods' connects to local port [`DENIED`].
fn start_agent(spec: &Spec, api: &FakeApi, extra: &[&str]) -> anyhow::Result<Agent> {
    let policy = spec.dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: pods\nspec:\n  \
             identities: [\"spiffe://corral.test/ns/**\"]\n  mode: enforce\n  defaultAction: allow\n  \
             zones:\n    local: {{ cidrs: [127.0.0.0/8] }}\n  connect:\n    \
             - {{ action: deny, zones: [local], ports: [{DENIED}] }}\n"
        ),
    )?;
    let log = spec.dir.join("agent.log");
    let child = Command::new(bin("corral-agent")?)
        .env("KUBECONFIG", api.kubeconfig(&spec.dir)?)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args([
            "--kubernetes",
            "--trust-domain",
            "corral.test",
            "--node-name",
            "node-a",
        ])
        .arg("--policy")
        .arg(&policy)
        .arg("--socket")
        .arg(&spec.socket)
        .arg("--pin-dir")
        .arg(&spec.pins)
        .arg("--state-dir")
        .arg(spec.dir.join("state"))
        .arg("--cgroup-dir")
        .arg(&spec.cgroups)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawn corral-agent")?;
    Ok(Agent(Some(child), log))
}

fn corral(spec: &Spec, args: &[&str]) -> anyhow::Result<Output> {
    let (sub, rest) = args.split_first().context("a subcommand")?;
    Command::new(bin("corral")?)
        .arg(sub)
        .arg("--socket")
        .arg(&spec.socket)
        .args(rest)
        .output()
        .context("run corral")
}

fn status_json(spec: &Spec) -> anyhow::Result<Value> {
    let out = corral(spec, &["status", "--json"])?;
    ensure!(
        out.status.success(),
        "corral status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn identities(spec: &Spec) -> anyhow::Result<Vec<(String, String)>> {
    Ok(status_json(spec)?["principals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let f = |k: &str| p[k].as_str().unwrap_or("").to_owned();
                    (f("identity"), f("session"))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// `corral status --json`'s `unenrolled_pods`, by pod name.
fn unenrolled(spec: &Spec) -> anyhow::Result<Vec<(String, Value)>> {
    Ok(status_json(spec)?["unenrolled_pods"]
        .as_array()
        .context("unenrolled_pods in status")?
        .iter()
        .map(|p| (p["name"].as_str().unwrap_or("").to_owned(), p.clone()))
        .collect())
}

/// The agent's metrics text (`--metrics-addr 127.0.0.1:0`: the address is read from its log).
fn metrics(agent: &Agent) -> anyhow::Result<String> {
    let log = agent.log();
    let addr = log
        .lines()
        .filter(|l| l.contains("metrics listening"))
        .flat_map(str::split_whitespace)
        .find_map(|w| w.strip_prefix("addr="))
        .context("metrics address in the agent log")?;
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body)?;
    Ok(body)
}

/// Polls `f` until it returns true, for at most `secs`.
fn wait_until(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    wait_for(secs, what, || Ok(f()?.then_some(())))
}

/// Polls `f` as fast as a `corral status` runs, for at most `secs`; returns when it first held.
fn time_until(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f()? {
            return Ok(Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn bpffs() -> Option<PathBuf> {
    match paths::find_mount("bpf") {
        Ok(p) => Some(p),
        Err(_) => {
            corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
            None
        }
    }
}

#[test]
fn pods_on_the_node_are_enrolled_policed_and_removed() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(bpffs) = bpffs() else {
        return Ok(());
    };
    let spec = Spec::new("pods", &bpffs)?;
    let pid = std::process::id();
    let uid = |n: u32| format!("{pid:08x}-0000-4000-8000-{n:012x}");
    let (research, labelled, ghost, late, phantom) = (uid(1), uid(2), uid(3), uid(4), uid(5));
    let pod_cgroup = |u: &str| spec.pod_cgroup(u);
    cgroup::create(&pod_cgroup(&research))?;
    cgroup::create(&pod_cgroup(&labelled))?;
    let enforce = || json!({"corral.dev/enforce": "true"});

    let api = FakeApi::start(
        vec![
            pod("research", "agents", &research, enforce()),
            pod("labelled", "team", &labelled, json!({})),
            // Opted in, but its cgroup does not exist (yet): not enrolled, reported, and not
            // blocking readiness.
            pod("ghost", "agents", &ghost, enforce()),
        ],
        vec![namespace("agents", json!({})), namespace("team", json!({}))],
        false,
    )?;
    let mut agent = start_agent(
        &spec,
        &api,
        &[
            "--uninstall",
            "--pod-cgroup-grace-secs",
            "1",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    )?;

    // Ready (the local API answers) only after the pods were synced: the opted-in pod is
    // already enrolled at the first successful status.
    wait_until(30, "agent ready", || {
        agent.running()?;
        Ok(spec.socket.exists() && corral(&spec, &["status"])?.status.success())
    })
    .with_context(|| agent.log())?;
    let research_id = (
        "spiffe://corral.test/ns/agents/sa/research".to_owned(),
        research.clone(),
    );
    assert_eq!(
        identities(&spec)?,
        vec![research_id.clone()],
        "{}",
        agent.log()
    );

    // The opted-in pod without a cgroup is reported as not enrolled, with its reason; past the
    // (1 s) grace period as failed, in status, the CLI's human output and the metrics.
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let listed = unenrolled(&spec)?;
    assert_eq!(
        listed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["ghost"],
        "{listed:?}"
    );
    let g = &listed[0].1;
    assert_eq!(
        (g["namespace"].as_str(), g["uid"].as_str()),
        (Some("agents"), Some(ghost.as_str()))
    );
    let reason = g["reason"].as_str().unwrap_or("");
    assert!(reason.contains("no cgroup for pod"), "{reason}");
    let since = u128::from(g["since_unix_nano"].as_u64().unwrap_or(0));
    assert!(
        since > 0 && since <= now_ns && now_ns - since < 60_000_000_000,
        "since {since}, now {now_ns}"
    );
    wait_until(10, "the cgroup-less pod counts as failed", || {
        Ok(unenrolled(&spec)?
            .iter()
            .any(|(n, p)| n == "ghost" && p["state"] == "failed"))
    })
    .with_context(|| agent.log())?;
    let human = corral(&spec, &["status"])?;
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("NOT ENFORCED: 1 pod(s) opted in and not enrolled:")
            && human.contains("agents/ghost (failed, since "),
        "{human}"
    );
    let m = metrics(&agent)?;
    assert!(
        m.contains("corral_k8s_pods_not_enrolled{state=\"failed\"} 1\n")
            && m.contains("corral_k8s_pods_not_enrolled{state=\"pending\"} 0\n"),
        "{m}"
    );

    // Its cgroup appears (the kubelet started the sandbox): enrolled at the next retry, and
    // gone from the list.
    cgroup::create(&pod_cgroup(&ghost))?;
    let created = Instant::now();
    let ghost_id = (
        "spiffe://corral.test/ns/agents/sa/research".to_owned(),
        ghost.clone(),
    );
    let enrolled = time_until(10, "the pod enrolled once its cgroup exists", || {
        Ok(identities(&spec)?.contains(&ghost_id))
    })
    .with_context(|| agent.log())?;
    assert!(unenrolled(&spec)?.is_empty());
    assert!(metrics(&agent)?.contains("corral_k8s_pods_not_enrolled{state=\"failed\"} 0\n"));
    println!(
        "enrol latency, pod cgroup created -> enrolled: {} ms (retry period 2 s)",
        enrolled.duration_since(created).as_millis()
    );

    // A pod that appears in the watch with its cgroup already there (the common order when the
    // watch event is late): the window between the pod being visible and enforced.
    cgroup::create(&pod_cgroup(&late))?;
    let ev = api.push(
        &api.pods,
        json!({"type": "ADDED", "object": pod("late", "agents", &late, enforce())}),
    );
    let late_id = (
        "spiffe://corral.test/ns/agents/sa/research".to_owned(),
        late.clone(),
    );
    let enrolled = time_until(10, "the added pod enrolled", || {
        Ok(identities(&spec)?.contains(&late_id))
    })
    .with_context(|| agent.log())?;
    let visible = api
        .sent_at(&api.pods, ev)
        .context("the ADDED event was sent")?;
    println!(
        "enrol latency, pod visible in the watch -> enrolled (seen in status): {} ms",
        enrolled.saturating_duration_since(visible).as_millis()
    );

    // An opted-in pod without a cgroup that is deleted: reported, then gone from the list.
    api.push(
        &api.pods,
        json!({"type": "ADDED", "object": pod("phantom", "agents", &phantom, enforce())}),
    );
    wait_until(10, "the cgroup-less added pod reported", || {
        Ok(unenrolled(&spec)?.iter().any(|(n, _)| n == "phantom"))
    })
    .with_context(|| agent.log())?;
    let mut gone = pod("phantom", "agents", &phantom, enforce());
    gone["metadata"]["resourceVersion"] = json!("95");
    api.push(&api.pods, json!({"type": "DELETED", "object": gone}));
    wait_until(10, "the deleted pod no longer reported", || {
        Ok(unenrolled(&spec)?.is_empty())
    })
    .with_context(|| agent.log())?;

    // A container cgroup created after enrolment is policed through the ancestor walk.
    let ctr = pod_cgroup(&research).join("ctr-1");
    cgroup::create(&ctr)?;
    let allowed = Listener::tcp("127.0.0.1:0")?;
    let ops = [
        format!("tcp:127.0.0.1:{}", allowed.port),
        format!("udp:127.0.0.1:{DENIED}"),
    ];
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let got = probe_in(&ctr, &ops)?;
    assert_eq!(
        got,
        [
            corral_tests::Outcome::Ok,
            corral_tests::Outcome::Errno("EPERM".into())
        ]
    );
    // So is the pod enrolled once its cgroup appeared.
    assert_eq!(
        probe_in(&pod_cgroup(&ghost), &ops[1..])?,
        [corral_tests::Outcome::Errno("EPERM".into())]
    );
    // The labelled namespace's pod is not policed yet.
    assert_eq!(
        probe_in(&pod_cgroup(&labelled), &ops[1..])?,
        [corral_tests::Outcome::Ok]
    );

    // The namespace opts in through the watch: its pod is enrolled and policed.
    api.push(
        &api.namespaces,
        json!({"type": "MODIFIED", "object": namespace("team", json!({"corral.dev/enforce": "true"}))}),
    );
    let labelled_id = (
        "spiffe://corral.test/ns/team/sa/research".to_owned(),
        labelled.clone(),
    );
    wait_until(10, "namespace opt-in enrols the pod", || {
        Ok(identities(&spec)?.contains(&labelled_id))
    })
    .with_context(|| agent.log())?;
    assert_eq!(
        probe_in(&pod_cgroup(&labelled), &ops[1..])?,
        [corral_tests::Outcome::Errno("EPERM".into())]
    );

    // A container of the enrolled pod is running, and no OCI hook enrolled it (none runs
    // here): reported once as missed (status, metrics, a `container` event), however often
    // the pod is seen again.
    let mut running = pod("research", "agents", &research, enforce());
    running["metadata"]["resourceVersion"] = json!("100");
    running["status"]["containerStatuses"] = json!([{
        "name": "c", "image": "example", "imageID": "", "ready": true, "restartCount": 0,
        "containerID": "containerd://0123abcd", "state": {"running": {}},
    }]);
    for _ in 0..2 {
        api.push(
            &api.pods,
            json!({"type": "MODIFIED", "object": running.clone()}),
        );
    }
    wait_until(10, "the missed container reported", || {
        Ok(status_json(&spec)?["containers_missed"] == 1)
    })
    .with_context(|| agent.log())?;
    let out = corral(&spec, &["events", "--json"])?;
    let missed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "container" && e["container"]["action"] == "missed")
        .collect();
    assert_eq!(missed.len(), 1, "{missed:#?}");
    assert_eq!(missed[0]["container"]["id"], "0123abcd");
    assert_eq!(missed[0]["principal"]["identity"], research_id.0.as_str());
    assert!(
        metrics(&agent)?.contains("corral_containers_missed_total 1"),
        "{}",
        metrics(&agent)?
    );

    // The pod is deleted: its principal goes, and its cgroup is no longer policed.
    let mut deleted = pod("research", "agents", &research, enforce());
    deleted["metadata"]["resourceVersion"] = json!("102");
    api.push(&api.pods, json!({"type": "DELETED", "object": deleted}));
    wait_until(10, "deleted pod's principal removed", || {
        Ok(!identities(&spec)?.contains(&research_id))
    })
    .with_context(|| agent.log())?;
    assert_eq!(probe_in(&ctr, &ops[1..])?, [corral_tests::Outcome::Ok]);
    // The pod cgroups are the kubelet's: the agent removed none of them.
    assert!(ctr.exists() && pod_cgroup(&labelled).exists());
    let log = agent.log();
    assert!(
        log.contains("pods on this node synced enrolled=1 not_enrolled=1"),
        "{log}"
    );
    drop(agent);
    let _ = cgroup::remove(&ctr);
    Ok(())
}

/// A SIGTERM while the first pod sync waits on an API server that does not answer: the agent
/// shuts down cleanly (exit 0, socket removed, pins left in place) instead of dying by signal.
#[test]
fn sigterm_during_the_first_pod_sync_shuts_down_cleanly() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(bpffs) = bpffs() else {
        return Ok(());
    };
    let spec = Spec::new("sigterm", &bpffs)?;
    let api = FakeApi::start(Vec::new(), Vec::new(), true)?;
    let mut agent = start_agent(&spec, &api, &[])?;
    wait_until(30, "the agent waiting for the first pod list", || {
        agent.running()?;
        Ok(api.ctl.lists_requested.load(Ordering::Relaxed) > 0)
    })
    .with_context(|| agent.log())?;
    // Still syncing: the socket is bound, but not served (a `corral status` would wait).
    std::thread::sleep(Duration::from_millis(300));
    agent.running()?;
    assert!(spec.socket.exists());
    assert!(!agent.log().contains("corral-agent ready"));

    let mut child = agent.0.take().context("agent process")?;
    let sent = Instant::now();
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    ensure!(kill.success(), "kill -TERM");
    let deadline = sent + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no exit 10 s after SIGTERM:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = sent.elapsed();
    println!(
        "SIGTERM during the first pod sync -> exit: {} ms",
        took.as_millis()
    );
    let log = agent.log();
    assert_eq!(status.code(), Some(0), "{status}:\n{log}");
    assert!(took < Duration::from_secs(5), "{took:?}:\n{log}");
    assert!(!spec.socket.exists(), "socket removed");
    assert!(
        std::fs::read_dir(&spec.pins)?.next().is_some(),
        "pins left in place"
    );
    assert!(
        log.contains("signal before the pods on this node were synced")
            && log.contains("enforcement stays in force through the pins"),
        "{log}"
    );
    Ok(())
}
