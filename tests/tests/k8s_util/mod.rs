//! A fake Kubernetes API server for the end-to-end tests: `GET /api/v1/{pods,namespaces}`
//! lists, `?watch=true` streams events (chunked JSON lines) as the test adds them; lists can be
//! withheld (an API server that does not answer).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// Objects a fake API serves: the list, and the watch events appended later.
#[derive(Default)]
pub struct Resource {
    items: Vec<Value>,
    events: Vec<Value>,
    /// When each event was first written to a watch stream.
    sent: Vec<Option<Instant>>,
}

/// What the fake API's handlers share.
#[derive(Default)]
pub struct Control {
    stop: AtomicBool,
    /// While set, list requests get no answer (an API server that does not respond).
    hold_lists: AtomicBool,
    pub lists_requested: AtomicUsize,
}

/// A fake API server: `GET /api/v1/{pods,namespaces}` lists, `?watch=true` streams events
/// (chunked JSON lines) as the test adds them.
pub struct FakeApi {
    addr: String,
    pub pods: Arc<Mutex<Resource>>,
    pub namespaces: Arc<Mutex<Resource>>,
    pub ctl: Arc<Control>,
}

fn locked(m: &Mutex<Resource>) -> std::sync::MutexGuard<'_, Resource> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeApi {
    pub fn start(
        pods: Vec<Value>,
        namespaces: Vec<Value>,
        hold_lists: bool,
    ) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let resource = |items| {
            Arc::new(Mutex::new(Resource {
                items,
                ..Resource::default()
            }))
        };
        let api = Self {
            addr,
            pods: resource(pods),
            namespaces: resource(namespaces),
            ctl: Arc::new(Control {
                hold_lists: AtomicBool::new(hold_lists),
                ..Control::default()
            }),
        };
        let (pods, namespaces, ctl) = (api.pods.clone(), api.namespaces.clone(), api.ctl.clone());
        l.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !ctl.stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (p, n, c) = (pods.clone(), namespaces.clone(), ctl.clone());
                        std::thread::spawn(move || {
                            let _ = serve(s, &p, &n, &c);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(api)
    }

    /// Appends a watch event; returns its index (for [`FakeApi::sent_at`]).
    pub fn push(&self, which: &Arc<Mutex<Resource>>, event: Value) -> usize {
        let mut r = locked(which);
        r.events.push(event);
        r.sent.push(None);
        r.events.len() - 1
    }

    /// When the event was first written to a watch stream.
    pub fn sent_at(&self, which: &Arc<Mutex<Resource>>, index: usize) -> Option<Instant> {
        locked(which).sent.get(index).copied().flatten()
    }

    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
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
        self.ctl.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    mut s: TcpStream,
    pods: &Mutex<Resource>,
    namespaces: &Mutex<Resource>,
    ctl: &Control,
) -> std::io::Result<()> {
    let stop = &ctl.stop;
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
            let g = locked(m);
            (g.items.clone(), g.events.clone())
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
                s.flush()?;
                let now = Instant::now();
                for t in &mut locked(res).sent[sent.min(events.len())..events.len()] {
                    t.get_or_insert(now);
                }
                sent = events.len();
                std::thread::sleep(Duration::from_millis(50));
            }
            return s.write_all(b"0\r\n\r\n");
        }
        ctl.lists_requested.fetch_add(1, Ordering::Relaxed);
        while ctl.hold_lists.load(Ordering::Relaxed) {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
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

pub fn pod(name: &str, ns: &str, uid: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "90",
                     "annotations": annotations},
        "spec": {"nodeName": "node-a", "serviceAccountName": "research",
                 "containers": [{"name": "c", "image": "example"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort"},
    })
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "resourceVersion": "101", "labels": labels}})
}
