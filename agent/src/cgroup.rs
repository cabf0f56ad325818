//! cgroup v2 directories: create, move a process in, read the id, remove.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("move pid {pid} into cgroup {path}")]
    Join {
        pid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stat cgroup {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cgroup v2 id of a directory is its inode number on cgroupfs (what
/// `bpf_get_current_cgroup_id` returns).
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Stat {
            path: path.into(),
            source,
        })
}

/// Level below the cgroup v2 root (the root is level 0).
pub fn level(root: &Path, path: &Path) -> Option<u32> {
    let rel = path.strip_prefix(root).ok()?;
    u32::try_from(rel.components().count()).ok()
}

pub fn create(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.into(),
        source,
    })
}

/// Moves `pid` (0 = the caller) into the cgroup.
pub fn join(path: &Path, pid: u32) -> Result<(), CgroupError> {
    std::fs::write(path.join("cgroup.procs"), pid.to_string()).map_err(|source| CgroupError::Join {
        pid,
        path: path.into(),
        source,
    })
}

/// Removes an empty cgroup and its empty sub-cgroups (deepest first).
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    let map = |source| CgroupError::Remove {
        path: path.into(),
        source,
    };
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(map(e)),
    }
}
