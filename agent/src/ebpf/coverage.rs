//! The cgroup_skb programs (`agent-ebpf/src/egress.rs`) attached at each principal's cgroup
//! instead of the cgroup v2 root, so only principals' sockets run them: every packet of the
//! node's own sockets used to pay for two programs that left at once (see
//! `agent-ebpf/src/scope.rs` for what keeps a principal on its own sockets).
//!
//! [`Coverage::cover`] links both programs to a principal's cgroup before the principal is
//! written to `PRINCIPALS` (a socket the hooks see as covered always runs them), by cgroup id
//! (opened with `open_by_handle_at`, or found by inode number where that is refused:
//! [`open_cgroup`]). When the principal is removed they stay attached for as
//! long as its cgroup exists ([`Coverage::uncover`]), so its connections still end at their
//! next packet (`redecide` in egress.rs: the principal has ended, so has its connection); they
//! are detached once the cgroup is gone (checked at every later cover and uncover). With pins, each link is pinned as `egress-cg<ID>` / `ingress-cg<ID>`, so the
//! programs stay attached while no agent runs; a new agent links its own next to them and
//! replaces each pin only then ([`Coverage::adopt`]), as for the root links.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use aya_obj::generated::bpf_attach_type;
use tracing::{debug, info, warn};

use super::pins::PinDir;

/// The packet programs and where they attach.
pub const PROGRAMS: [(&str, bpf_attach_type); 2] = [
    ("egress", bpf_attach_type::BPF_CGROUP_INET_EGRESS),
    ("ingress", bpf_attach_type::BPF_CGROUP_INET_INGRESS),
];

#[derive(Debug, thiserror::Error)]
pub enum CoverageError {
    #[error("open cgroup {id} by its id")]
    Open {
        id: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("link {program} to cgroup {id}")]
    Link {
        program: &'static str,
        id: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pin the {program} link of cgroup {id}")]
    Pin {
        program: &'static str,
        id: u64,
        #[source]
        source: Box<super::pins::PinError>,
    },
}

/// The packet programs' fds and their links, by principal cgroup id.
pub struct Coverage {
    programs: Vec<(&'static str, u32, OwnedFd)>,
    /// A directory of the cgroup v2 mount, to open cgroups by id through.
    mount: File,
    pins: Option<PinDir>,
    links: HashMap<u64, Vec<OwnedFd>>,
    /// Links of removed principals whose cgroup still existed.
    retired: HashMap<u64, Vec<OwnedFd>>,
}

impl std::fmt::Debug for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coverage")
            .field("covered", &self.links.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Pin name of `program`'s link at cgroup `id`.
fn pin_name(program: &str, id: u64) -> String {
    format!("{program}-cg{id}")
}

/// The cgroup id in a pin name made by [`pin_name`].
fn pinned_id(name: &str) -> Option<u64> {
    PROGRAMS
        .iter()
        .find_map(|(p, _)| name.strip_prefix(p)?.strip_prefix("-cg")?.parse().ok())
}

impl Coverage {
    /// `programs`: each packet program's name, attach type and loaded fd; `mount`: the cgroup
    /// v2 root the agent attaches to.
    pub fn new(
        programs: Vec<(&'static str, u32, OwnedFd)>,
        mount: &Path,
        pins: Option<PinDir>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            programs,
            mount: File::open(mount)?,
            pins,
            links: HashMap::new(),
            retired: HashMap::new(),
        })
    }

    /// Attaches the packet programs to cgroup `id` (nothing if they are).
    pub fn cover(&mut self, id: u64) -> Result<(), CoverageError> {
        self.release_gone();
        if self.links.contains_key(&id) {
            return Ok(());
        }
        if let Some(links) = self.retired.remove(&id) {
            self.links.insert(id, links);
            return Ok(());
        }
        let cg = match open_cgroup(&self.mount, id) {
            Ok(Some(cg)) => cg,
            // No such cgroup (ids are never reused): no socket can ever be created in it.
            Ok(None) => {
                debug!(cgroup_id = id, "no such cgroup: nothing to attach to");
                return Ok(());
            }
            Err(source) => return Err(CoverageError::Open { id, source }),
        };
        let mut links = Vec::with_capacity(self.programs.len());
        for (program, attach_type, fd) in &self.programs {
            let program = *program;
            let linked = super::raw::link_cgroup(fd, &cg, *attach_type)
                .map_err(|source| CoverageError::Link {
                    program,
                    id,
                    source,
                })
                .and_then(|link| match &self.pins {
                    Some(p) => p
                        .install_link_fd(&pin_name(program, id), link.as_fd())
                        .map(|()| link)
                        .map_err(|source| CoverageError::Pin {
                            program,
                            id,
                            source: Box::new(source),
                        }),
                    None => Ok(link),
                });
            match linked {
                Ok(link) => links.push(link),
                Err(e) => {
                    // None of this cgroup's links stay half made.
                    self.remove_pins(id);
                    return Err(e);
                }
            }
        }
        debug!(cgroup_id = id, "packet programs attached");
        self.links.insert(id, links);
        Ok(())
    }

    fn remove_pins(&self, id: u64) {
        if let Some(p) = &self.pins {
            for (program, ..) in &self.programs {
                if let Err(e) = p.remove_link(&pin_name(program, id)) {
                    warn!(cgroup_id = id, error = %e, "remove a packet program's pin");
                }
            }
        }
    }

    /// Cgroup `id` is no longer a principal's: its links are kept while the cgroup exists
    /// (see the module docs), then detached.
    pub fn uncover(&mut self, id: u64) {
        if let Some(links) = self.links.remove(&id) {
            self.retired.insert(id, links);
        }
        self.release_gone();
    }

    /// Detaches the links of removed principals whose cgroup is gone.
    fn release_gone(&mut self) {
        let gone: Vec<u64> = self
            .retired
            .keys()
            .copied()
            // Only a cgroup known to be gone: any other error keeps the links (closed).
            .filter(|id| matches!(open_cgroup(&self.mount, *id), Ok(None)))
            .collect();
        for id in gone {
            self.retired.remove(&id);
            self.remove_pins(id);
            debug!(cgroup_id = id, "packet programs detached");
        }
    }

    /// Cgroup ids of removed principals whose links are kept while the cgroup exists.
    pub fn retired(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.retired.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The cgroup ids covered.
    pub fn covered(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.links.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// At start, with the principals already enrolled (`ids`, from the pinned maps): covers
    /// each (replacing the previous agent's pinned link only once the new one is attached),
    /// then removes pins of cgroups no longer enrolled and the root links an earlier version
    /// pinned under the programs' own names. Returns how many were covered.
    pub fn adopt(&mut self, ids: &[u64]) -> usize {
        let mut covered = 0;
        for id in ids {
            // One cgroup that cannot be linked (reported) does not stop the others.
            match self.cover(*id) {
                Ok(()) => covered += 1,
                Err(e) => warn!(cgroup_id = id, error = %e, "packet programs not attached"),
            }
        }
        if let Some(p) = &self.pins {
            for name in p.link_names() {
                let stale = match pinned_id(&name) {
                    Some(id) => !self.links.contains_key(&id),
                    // The root links of an earlier version, and staged pins left by an
                    // interrupted start.
                    None => PROGRAMS.iter().any(|(prog, _)| {
                        name == *prog
                            || name
                                .strip_prefix(prog)
                                .is_some_and(|r| r.starts_with("-cg"))
                    }),
                };
                if stale {
                    match p.remove_link(&name) {
                        Ok(()) => info!(pin = %name, "removed a stale packet program link"),
                        Err(e) => warn!(pin = %name, error = %e, "remove a stale link"),
                    }
                }
            }
        }
        covered
    }
}

/// Opens cgroup `id` through the mount `mount`: by handle (`open_by_handle_at`, which needs
/// CAP_DAC_READ_SEARCH), else, where that is refused (the DaemonSet does not add that
/// capability), by finding the directory whose inode number is the id (cgroup v2 directories
/// have their kernfs id as inode number). `None`: no such cgroup.
pub fn open_cgroup(mount: &File, id: u64) -> std::io::Result<Option<File>> {
    match super::raw::open_cgroup_by_id(mount, id) {
        Ok(cg) => Ok(Some(cg)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => find_cgroup_by_id(mount, id)
            .map(|found| found.map(File::open).transpose())
            .and_then(|r| r),
        Err(e) => Err(e),
    }
}

/// The directory under the cgroup v2 mount `mount` whose inode number is `id` (breadth
/// first, at most [`agent_common::MAX_CGROUP_LEVEL`] levels down).
pub fn find_cgroup_by_id(mount: &File, id: u64) -> std::io::Result<Option<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt as _;
    let root = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(mount)
    ))?;
    let mut level = vec![root];
    for _ in 0..=agent_common::MAX_CGROUP_LEVEL {
        let mut next = Vec::new();
        for dir in level {
            if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
                return Ok(Some(dir));
            }
            // A cgroup removed meanwhile, or unreadable: skipped.
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            next.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_carry_the_cgroup_id() {
        assert_eq!(pin_name("egress", 42), "egress-cg42");
        assert_eq!(pinned_id("egress-cg42"), Some(42));
        assert_eq!(pinned_id("ingress-cg7"), Some(7));
        assert_eq!(pinned_id("egress"), None);
        assert_eq!(pinned_id("egress-cg42-new"), None);
        assert_eq!(pinned_id("connect4"), None);
    }
}
