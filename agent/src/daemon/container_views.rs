//! The views (mount namespace and root) of the containers the OCI hook enrolled: where a pod's
//! exec rules are resolved besides the agent's own view (see `crate::ebpf::exec_view`).
//!
//! Only a view the hook recorded counts, taken from the container's init process while the
//! runtime holds it before `start`: the namespace the runtime built, before anything in the
//! container ran. A view is never taken from whatever process happens to be in a principal's
//! cgroup: a process there can make a mount namespace of its own (an unprivileged user
//! namespace) or `chroot` into a directory of its choosing, and a view taken from it would let
//! it name which file an allowed path means. So each view is matched by its key (namespace
//! inode and root identity) to a process of the container that still has exactly it; when no
//! process has it (the container is gone), the view goes.
//!
//! Recorded views are kept in the state directory, so an agent restart keeps resolving a
//! running container's rules in it.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::registry::write_atomic;
use crate::ebpf::exec::{View, ViewKey};

/// One recorded view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// The runtime's id of the container.
    #[serde(default)]
    container_id: String,
    identity: String,
    /// The cgroup enrolled for the container (the pod's on Kubernetes): where its processes
    /// are looked for.
    cgroup: PathBuf,
    key: ViewKey,
    /// The process last seen with the view, and where its root was (its bundle's rootfs
    /// before the container pivots into it, then `/`).
    pid: i32,
    base: PathBuf,
}

/// Recorded container views, persisted in `container-views.json` in the state directory.
#[derive(Debug)]
pub struct ContainerViews {
    path: PathBuf,
    entries: Mutex<Vec<Entry>>,
}

/// Processes in `cgroup` and its descendants.
fn pids_below(cgroup: &Path, out: &mut Vec<i32>) {
    if let Ok(s) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for e in std::fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            pids_below(&e.path(), out);
        }
    }
}

impl Entry {
    /// The view through a process that has it now: the one last seen, else any process in
    /// the cgroup. `None`: the container is gone.
    fn find(&mut self) -> Option<View> {
        let has = |pid: i32, base: &Path| {
            View::of_process(pid, base)
                .ok()
                .filter(|v| v.key == self.key)
        };
        if let Some(v) = has(self.pid, &self.base) {
            return Some(v);
        }
        // Pivoted into its root: the same process, its root now `/`.
        let mut candidates = vec![self.pid];
        pids_below(&self.cgroup, &mut candidates);
        let root = Path::new("/");
        for pid in candidates {
            if let Some(v) = has(pid, root) {
                self.pid = pid;
                self.base = root.to_path_buf();
                return Some(v);
            }
        }
        None
    }
}

impl ContainerViews {
    /// The views recorded in `state_dir` (none if there is no file or it cannot be read; the
    /// containers are then resolved in the agent's view only, and say so in the log).
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("container-views.json");
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "unreadable container views: containers enrolled before this start resolve exec rules in the agent's view only");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Self {
            path,
            entries: Mutex::new(entries),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn store(&self, entries: &[Entry]) {
        let written = serde_json::to_vec(entries)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomic(&self.path, &b));
        if let Err(e) = written {
            warn!(path = %self.path.display(), error = %e, "persist the container views");
        }
    }

    /// Records the view of a container just enrolled: its init process `pid`, whose root is
    /// `rootfs` (as the process sees it) until it pivots, or already `/` where that path is
    /// not a directory there (a runtime that runs the hook after the pivot).
    pub fn record(
        &self,
        container_id: &str,
        identity: &str,
        cgroup: &Path,
        pid: i32,
        rootfs: Option<&Path>,
    ) -> std::io::Result<View> {
        let root = Path::new("/");
        let (view, base) = match rootfs.filter(|r| r.is_absolute() && *r != root) {
            Some(r) => match View::of_process(pid, r) {
                Ok(v) => (v, r.to_path_buf()),
                Err(_) => (View::of_process(pid, root)?, root.to_path_buf()),
            },
            None => (View::of_process(pid, root)?, root.to_path_buf()),
        };
        // (A container sharing the agent's namespace and root is recorded too, for its id:
        // its view adds nothing, `ExecMaps::views_for` leaves it out.)
        let mut entries = self.entries();
        entries.retain(|e| e.container_id != container_id);
        entries.push(Entry {
            container_id: container_id.to_owned(),
            identity: identity.to_owned(),
            cgroup: cgroup.to_path_buf(),
            key: view.key,
            pid,
            base,
        });
        self.store(&entries);
        Ok(view)
    }

    /// The views of the containers still running, each with its principal's identity; those
    /// no process has any more are dropped (and the file rewritten).
    pub fn live(&self) -> Vec<(String, View)> {
        let mut entries = self.entries();
        let before = entries.clone();
        let mut out = Vec::new();
        entries.retain_mut(|e| match e.find() {
            Some(v) => {
                out.push((e.identity.clone(), v));
                true
            }
            None => {
                info!(identity = %e.identity, cgroup = %e.cgroup.display(), "container gone: its exec rule view dropped");
                false
            }
        });
        if *entries != before {
            self.store(&entries);
        }
        out
    }

    /// The ids of the running containers the hook recorded.
    pub fn container_ids(&self) -> std::collections::HashSet<String> {
        self.entries()
            .iter()
            .map(|e| e.container_id.clone())
            .collect()
    }
}
