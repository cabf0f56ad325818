//! End to end, `corral-agent --kubernetes`: the real agent binary, in the real kernel, against a
//! fake Kubernetes API server (list + watch of pods and namespaces over plain HTTP on
//! loopback, pointed to by a kubeconfig) and a kubelet-style pod cgroup tree
//! (`kubepods/besteffort/pod<uid>`) under the test's own cgroup.
//!
//! What this exercises for real: kube-rs's watcher against the API's list/watch protocol, the
//! startup sync before readiness, pod → identity mapping, locating the pod cgroup, enrolment
//! as an external principal, kernel enforcement for a process in a container cgroup created
//! after enrolment, namespace-label opt-in arriving by watch, and removal on pod deletion.
//! What it does not: a real API server, kubelet or container runtime.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use corral_agent::{cgroup, ebpf::PinDir, paths};
use corral_tests::{
    Listener,
    e2e::{bin, wait_for},
    privileged, probe_in,
};
use serde_json::{Value, json};

const DENIED: u16 = 9;

/// Objects a fake API serves: the list, and the watch events appended later.
#[derive(Default)]
struct Resource {
    items: Vec<Value>,
    events: Vec<Value>,
}

/// A fake API server: `GET /api/v1/{pods,namespaces}` lists, `?watch=true` streams events
/// (chunked JSON lines) as the test adds them.
struct FakeApi {
    addr: String,
    pods: Arc<Mutex<Resource>>,
    namespaces: Arc<Mutex<Resource>>,
    stop: Arc<AtomicBool>,
}

impl FakeApi {
    fn start(pods: Vec<Value>, namespaces: Vec<Value>) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let api = Self {
            addr,
            pods: Arc::new(Mutex::new(Resource {
                items: pods,
                events: Vec::new(),
            })),
            namespaces: Arc::new(Mutex::new(Resource {
                items: namespaces,
                events: Vec::new(),
            })),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (pods, namespaces, stop) = (api.pods.clone(), api.namespaces.clone(), api.stop.clone());
        l.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (p, n, st) = (pods.clone(), namespaces.clone(), stop.clone());
                        std::thread::spawn(move || {
                            let _ = serve(s, &p, &n, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(api)
    }

    fn push(&self, which: &Arc<Mutex<Resource>>, event: Value) {
        which
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .events
            .push(event);
    }

    fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
                 contexts:\n- name: fake\n  context: {{cluster: fake, user: u}}\ncurrent-context: fake\n\
                 users:\n- name: u\n  user: {{token: fake}}\n",
                self.addr
            ),
        )?;
        Ok(p)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut s: TcpStream,
    pods: &Mutex<Resource>,
    namespaces: &Mutex<Resource>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    let mut r = BufReader::new(s.try_clone()?);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
        }
        let (route, query) = path.split_once('?').unwrap_or((&path, ""));
        let (res, list_kind) = match route {
            "/api/v1/pods" => (pods, "PodList"),
            "/api/v1/namespaces" => (namespaces, "NamespaceList"),
            _ => {
                s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
        };
        let lock = |m: &Mutex<Resource>| {
            m.lock()
                .map(|g| (g.items.clone(), g.events.clone()))
                .unwrap_or_default()
        };
        if query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1")
        {
            s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            )?;
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let (_, events) = lock(res);
                for e in &events[sent.min(events.len())..] {
                    let b = format!("{e}\n");
                    write!(s, "{:x}\r\n{b}\r\n", b.len())?;
                }
                sent = events.len();
                s.flush()?;
                std::thread::sleep(Duration::from_millis(50));
            }
            return s.write_all(b"0\r\n\r\n");
        }
        let (items, _) = lock(res);
        let body = json!({"apiVersion": "v1", "kind": list_kind,
                          "metadata": {"resourceVersion": "100"}, "items": items})
        .to_string();
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
}

fn pod(name: &str, ns: &str, uid: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "90",
                     "annotations": annotations},
        "spec": {"nodeName": "node-a", "serviceAccountName": "research",
                 "containers": [{"name": "c", "image": "example"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort"},
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": "101", "labels": labels}})
}

/// The test's directories: state, pins, principals' cgroups, and a kubelet-style tree.
struct Spec {
    dir: PathBuf,
    socket: PathBuf,
    pins: PathBuf,
    cgroups: PathBuf,
    kube_root: PathBuf,
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

fn identities(spec: &Spec) -> anyhow::Result<Vec<(String, String)>> {
    let out = corral(spec, &["status", "--json"])?;
    ensure!(
        out.status.success(),
        "corral status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout)?;
    Ok(s["principals"]
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

/// Polls `f` until it returns true, for at most `secs`.
fn wait_until(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    wait_for(secs, what, || Ok(f()?.then_some(())))
}

#[test]
fn pods_on_the_node_are_enrolled_policed_and_removed() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Ok(bpffs) = paths::find_mount("bpf") else {
        corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
        return Ok(());
    };
    let id = format!("e2e-k8s-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("corral-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let root = paths::cgroup2_root()?;
    let spec = Spec {
        socket: dir.join("agent.sock"),
        pins: bpffs.join(format!("corral-{id}")),
        cgroups: root.join("corral-test").join(&id),
        kube_root: root.join("corral-test").join(format!("{id}-node")),
        dir,
    };
    let pid = std::process::id();
    let uid = |n: u32| format!("{pid:08x}-0000-4000-8000-{n:012x}");
    let (research, labelled, ghost) = (uid(1), uid(2), uid(3));
    let pod_cgroup = |u: &str| spec.kube_root.join(format!("kubepods/besteffort/pod{u}"));
    cgroup::create(&pod_cgroup(&research))?;
    cgroup::create(&pod_cgroup(&labelled))?;

    let api = FakeApi::start(
        vec![
            pod(
                "research",
                "agents",
                &research,
                json!({"corral.dev/enforce": "true"}),
            ),
            pod("labelled", "team", &labelled, json!({})),
            // Opted in, but its cgroup never appears: not enrolled, and not blocking readiness.
            pod(
                "ghost",
                "agents",
                &ghost,
                json!({"corral.dev/enforce": "true"}),
            ),
        ],
        vec![namespace("agents", json!({})), namespace("team", json!({}))],
    )?;
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
        .arg("--uninstall")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawn corral-agent")?;
    let mut agent = Agent(Some(child), log);

    // Ready (the local API answers) only after the pods were synced: the opted-in pod is
    // already enrolled at the first successful status.
    wait_until(30, "agent ready", || {
        if let Some(c) = agent.0.as_mut()
            && let Some(st) = c.try_wait()?
        {
            bail!("corral-agent exited with {st}:\n{}", agent.log());
        }
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

    // The pod is deleted: its principal goes, and its cgroup is no longer policed.
    let mut deleted = pod(
        "research",
        "agents",
        &research,
        json!({"corral.dev/enforce": "true"}),
    );
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
