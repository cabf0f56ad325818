//! Principals in network namespaces of their own (a pod, a container with its own network):
//! the kernel sends their DNS to `127.64.0.0/10` + index *in their namespace*, so the proxy
//! must listen there too. A [`Worker`] is a thread that entered one such namespace (by a
//! pidfd of a process in it, so a reused pid never leads elsewhere) and creates sockets there
//! on request: the proxy's listeners, and the upstream sockets that ask the namespace's own
//! resolver (from the `resolv.conf` its processes see), exactly as its processes would have.
//! A socket keeps the namespace it was created in, so the tokio tasks serving it run as
//! usual. The worker ends when the last handle to it is dropped.
//!
//! [`members`] lists the namespaces a principal's processes are in, for the proxy's scan.

use std::{
    collections::HashMap,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use rustix::thread::{ThreadNameSpaceType, move_into_thread_name_spaces};

/// A network namespace, as `stat` names it (the nsfs inode; its device for good measure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

fn id_of(path: &Path) -> std::io::Result<NetnsId> {
    let m = std::fs::metadata(path)?;
    Ok(NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The agent's own network namespace.
pub fn own() -> std::io::Result<NetnsId> {
    id_of(Path::new("/proc/self/ns/net"))
}

/// The network namespace of process `pid`.
pub fn of_pid(pid: i32) -> std::io::Result<NetnsId> {
    id_of(Path::new(&format!("/proc/{pid}/ns/net")))
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside one network namespace, creating sockets there.
#[derive(Debug)]
pub struct Worker {
    pub id: NetnsId,
    /// A process in the namespace (the one it was entered by, then the latest the scan
    /// found): the `resolv.conf` it sees names the namespace's resolver.
    pid: AtomicI32,
    /// That resolver as last read, and when.
    resolver: std::sync::Mutex<Option<(Instant, Option<std::net::SocketAddr>)>>,
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
}

/// How long a namespace's resolver, once read, is used before it is read again.
const RESOLVER_FRESH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("process {0} is gone")]
    NoProcess(i32),
    #[error("enter the network namespace of process {pid}: {source}")]
    Enter {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("the network namespace worker ended")]
    Ended,
}

impl Worker {
    /// Starts a thread in the network namespace of process `pid`.
    pub fn enter(pid: i32) -> Result<Self, NetnsError> {
        let pidfd = super::super::peer::pidfd_open(pid).ok_or(NetnsError::NoProcess(pid))?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready, entered) = mpsc::sync_channel::<std::io::Result<NetnsId>>(1);
        std::thread::Builder::new()
            .name(format!("corral-netns-{pid}"))
            .spawn(move || {
                let r = move_into_thread_name_spaces(pidfd.as_fd(), ThreadNameSpaceType::NETWORK)
                    .map_err(std::io::Error::from)
                    .and_then(|()| id_of(Path::new("/proc/thread-self/ns/net")));
                drop(pidfd);
                let ok = r.is_ok();
                let _ = ready.send(r);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Enter { pid, source })?;
        let id = entered
            .recv()
            .map_err(|_| NetnsError::Ended)?
            .map_err(|source| NetnsError::Enter { pid, source })?;
        Ok(Self {
            id,
            pid: AtomicI32::new(pid),
            resolver: std::sync::Mutex::new(None),
            jobs: std::sync::Mutex::new(jobs),
        })
    }

    fn submit(&self, job: Job) -> Result<(), NetnsError> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(job)
            .map_err(|_| NetnsError::Ended)
    }

    /// Runs `f` in the namespace and waits for it: socket creation only, so it is brief even
    /// on a runtime thread.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))
        .map_err(std::io::Error::other)?;
        rx.recv()
            .map_err(|_| std::io::Error::other(NetnsError::Ended))?
    }

    /// Runs `f` in the namespace, awaited.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))
        .map_err(std::io::Error::other)?;
        rx.await
            .map_err(|_| std::io::Error::other(NetnsError::Ended))?
    }

    /// Process `pid` is in the namespace now.
    pub fn seen(&self, pid: i32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// The first nameserver of the `resolv.conf` the namespace's processes see, if one of
    /// them is still there and it names one. Read when asked, not when the namespace is
    /// entered: a container's hook runs before its root is in place.
    pub fn resolver(&self) -> Option<std::net::SocketAddr> {
        let mut cached = self
            .resolver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, r)) = *cached
            && at.elapsed() < RESOLVER_FRESH
        {
            return r;
        }
        let pid = self.pid.load(Ordering::Relaxed);
        let r = std::fs::read_to_string(format!("/proc/{pid}/root/etc/resolv.conf"))
            .ok()
            .and_then(|t| super::upstream::from_resolv_conf(&t));
        *cached = Some((Instant::now(), r));
        r
    }
}

/// For each network namespace other than `own` that processes of the cgroup tree `cgroup`
/// are in: one of those processes. Unreadable entries (a process gone meanwhile) are skipped.
pub fn members(cgroup: &Path, own: NetnsId) -> HashMap<NetnsId, i32> {
    let mut found = HashMap::new();
    let mut dirs: Vec<PathBuf> = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if let Ok(id) = of_pid(pid)
                    && id != own
                {
                    found.entry(id).or_insert(pid);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            dirs.extend(
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_entered_by_the_own_pid_is_in_the_own_namespace() {
        // Entering a namespace takes CAP_SYS_ADMIN (the agent runs as root; so do the tests
        // under `cargo xtask test`).
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1)
            != 0
        {
            return;
        }
        let me = i32::try_from(std::process::id()).expect("pid");
        let w = Worker::enter(me).expect("enter own netns");
        assert_eq!(w.id, own().expect("own"));
        let port = w
            .run(|| {
                Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port())
            })
            .expect("bind in the worker");
        assert_ne!(port, 0);
    }

    #[test]
    fn a_gone_process_is_no_namespace() {
        assert!(matches!(Worker::enter(-1), Err(NetnsError::NoProcess(-1))));
    }
}
