//! Where an exec rule's path is looked up: a [`View`] is one mount namespace and root directory,
//! the agent's own or a container's (`/proc/<pid>/root`, with `/proc/<pid>/mountinfo`).
//! `/usr/bin/curl` in a pod's policy means the file a process of that container reaches by that
//! path, on its overlay, so its rules are resolved in the container's view as well as the
//! agent's.
//!
//! A view is named by its [`ViewKey`] (mount namespace inode, root directory identity) and
//! opened afresh for each resolution pass through the `/proc/<pid>` directory of a process
//! that has it: a directory fd of `/proc/<pid>` stays bound to that process, so a pid reused
//! meanwhile is never read in its place, and the key is checked again after opening (a process
//! that moved to another root, or a container that pivoted, no longer has the view). Nothing
//! is held open between passes: a container's mounts are never kept busy by the agent.
//!
//! Paths are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from the view's
//! root, so an absolute symlink inside a container means the container's file, and `..` or a
//! `/proc` magic link cannot leave the view.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use agent_common::kernel_dev;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, StatxFlags};

/// A view's name: (mount namespace inode, root directory's kernel device, root inode).
pub type ViewKey = (u64, u32, u64);

/// A mount namespace and root to resolve exec rule paths in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub key: ViewKey,
    /// The process to look through (`None`: the agent itself).
    pid: Option<i32>,
    /// Where the root is, as that process sees it (`/` unless the container has not pivoted
    /// into its root yet, as during an OCI `createRuntime` hook: then its bundle's rootfs).
    base: PathBuf,
}

/// `(kernel dev, inode, is a directory)` of an open file, its device read as the exec
/// programs read it (the superblock's): through the mount id in `devs` where the kernel gives
/// one, else `stat`'s device (btrfs subvolumes report an anonymous device there).
fn stat_fd(fd: impl AsFd, devs: &HashMap<u64, u32>) -> std::io::Result<(u32, u64, bool)> {
    let st = rustix::fs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::TYPE | StatxFlags::INO | StatxFlags::MNT_ID,
    )?;
    let by_stat = kernel_dev(st.stx_dev_major, st.stx_dev_minor);
    let dev = if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        devs.get(&st.stx_mnt_id).copied().unwrap_or(by_stat)
    } else {
        by_stat
    };
    let dir = FileType::from_raw_mode(u32::from(st.stx_mode)) == FileType::Directory;
    Ok((dev, st.stx_ino, dir))
}

/// `mount id → kernel dev` from mountinfo text (fields 1 and 3: `36 35 98:0 ...`).
pub fn parse_mount_devs(info: &str) -> HashMap<u64, u32> {
    info.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?.parse().ok()?;
            let (major, minor) = f.nth(1)?.split_once(':')?;
            Some((id, kernel_dev(major.parse().ok()?, minor.parse().ok()?)))
        })
        .collect()
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// `path` from `root`, never leaving it.
fn open_in(root: &OwnedFd, path: &Path) -> std::io::Result<OwnedFd> {
    let rel = if path.as_os_str().is_empty() {
        Path::new("/")
    } else {
        path
    };
    Ok(rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    )?)
}

impl View {
    /// The agent's own mount namespace and root.
    pub fn agent() -> std::io::Result<Self> {
        Self::open_proc(None, Path::new("/")).map(|o| o.view)
    }

    /// The view of process `pid` with its root at `base` (as `pid` sees paths).
    pub fn of_process(pid: i32, base: &Path) -> std::io::Result<Self> {
        Self::open_proc(Some(pid), base).map(|o| o.view)
    }

    /// Whether this is the agent's own view (rule paths found there can be held open).
    pub fn is_agent(&self) -> bool {
        self.pid.is_none()
    }

    /// The view opened for one pass; an error if the process is gone or no longer has it.
    pub fn open(&self) -> std::io::Result<Opened> {
        let o = Self::open_proc(self.pid, &self.base)?;
        if o.view.key != self.key {
            return Err(std::io::Error::other(format!(
                "process {} no longer has this mount namespace and root",
                self.pid.unwrap_or(0)
            )));
        }
        Ok(o)
    }

    fn open_proc(pid: Option<i32>, base: &Path) -> std::io::Result<Opened> {
        let dir = match pid {
            None => "/proc/self".to_owned(),
            Some(p) if p > 0 => format!("/proc/{p}"),
            Some(p) => return Err(std::io::Error::other(format!("bad pid {p}"))),
        };
        // Everything below is read through this one fd: bound to the process, not its pid.
        let proc = rustix::fs::open(
            dir.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let ns = rustix::fs::statat(&proc, "ns/mnt", AtFlags::empty())?.st_ino;
        let mountinfo = {
            let fd = rustix::fs::openat(
                &proc,
                "mountinfo",
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            std::io::read_to_string(std::fs::File::from(fd))?
        };
        let proc_root = rustix::fs::openat(
            &proc,
            "root",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let root = if base == Path::new("/") {
            proc_root
        } else {
            open_in(&proc_root, base)?
        };
        let devs = parse_mount_devs(&mountinfo);
        let (dev, ino, is_dir) = stat_fd(&root, &devs)?;
        if !is_dir {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                base.display()
            )));
        }
        Ok(Opened {
            view: View {
                key: (ns, dev, ino),
                pid,
                base: base.to_path_buf(),
            },
            root,
            mountinfo,
            devs,
        })
    }
}

/// A view opened for one resolution pass.
#[derive(Debug)]
pub struct Opened {
    pub view: View,
    root: OwnedFd,
    mountinfo: String,
    devs: HashMap<u64, u32>,
}

impl Opened {
    /// `(kernel dev, inode, is a directory)` of `path` in this view, symlinks followed inside
    /// it.
    pub fn identity(&self, path: &Path) -> std::io::Result<(u32, u64, bool)> {
        stat_fd(open_in(&self.root, path)?, &self.devs)
    }

    /// Paths (in this view) of the filesystems mounted strictly below the directory whose
    /// identity is `dir`: the kernel's ancestor walk stops at a filesystem's root, so a prefix
    /// rule covers them through their mount points' identities. A mount point is below `dir`
    /// when one of its ancestor directories, looked up in this view, is `dir` (symlinks in the
    /// rule's path need no second model of path resolution). `memo` caches identities for one
    /// pass.
    pub fn mounts_below(
        &self,
        dir: (u32, u64),
        memo: &mut HashMap<PathBuf, Option<(u32, u64)>>,
    ) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for m in self.mount_points() {
            let below = m.ancestors().skip(1).any(|a| {
                let id = *memo.entry(a.to_path_buf()).or_insert_with(|| {
                    self.identity(a)
                        .ok()
                        .filter(|(_, _, d)| *d)
                        .map(|(dev, ino, _)| (dev, ino))
                });
                id == Some(dir)
            });
            if below {
                out.push(m);
            }
        }
        out
    }

    /// Mount points of this view, relative to its root (`/` itself left out).
    fn mount_points(&self) -> Vec<PathBuf> {
        let base = &self.view.base;
        self.mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .map(|m| PathBuf::from(crate::paths::unescape_mountinfo(m)))
            .filter_map(|m| {
                let rel = m.strip_prefix(base).ok()?;
                (!rel.as_os_str().is_empty()).then(|| Path::new("/").join(rel))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_devs_are_read_from_mountinfo() {
        let info = "36 35 98:0 / / rw - ext4 /dev/root rw\n\
                    37 36 0:41 / /data rw - btrfs /dev/sdb rw\n";
        let devs = parse_mount_devs(info);
        assert_eq!(devs.get(&36), Some(&kernel_dev(98, 0)));
        assert_eq!(devs.get(&37), Some(&kernel_dev(0, 41)));
    }

    #[test]
    fn the_agent_view_resolves_as_the_host_does() -> std::io::Result<()> {
        let o = View::agent()?.open()?;
        assert!(o.view.is_agent());
        let dir = std::env::temp_dir().join(format!("corral-view-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("f");
        std::fs::write(&file, b"x")?;
        // An absolute symlink and `..` resolve inside the view (here the agent's root).
        std::os::unix::fs::symlink(&file, dir.join("abs"))?;
        let m = std::fs::metadata(&file)?;
        let (_, ino, is_dir) = o.identity(&dir.join("abs"))?;
        assert_eq!(
            (ino, is_dir),
            (std::os::unix::fs::MetadataExt::ino(&m), false)
        );
        let up = Path::new("/..").join(file.strip_prefix("/").unwrap_or(&file));
        assert_eq!(o.identity(&up)?.1, ino);
        assert!(
            o.identity(Path::new("/proc/self/exe")).is_err(),
            "magic links are not followed"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_view_is_only_what_the_process_still_has() -> std::io::Result<()> {
        let agent = View::agent()?;
        let me = View::of_process(
            i32::try_from(std::process::id()).unwrap_or(0),
            Path::new("/"),
        )?;
        assert_eq!(me.key, agent.key);
        assert!(!me.is_agent());
        // The same process, another base: another key.
        let other = View::of_process(me.pid.unwrap_or(0), &std::env::temp_dir())?;
        assert_ne!(other.key, me.key);
        let stale = View {
            key: (me.key.0, me.key.1, me.key.2 ^ 1),
            ..me
        };
        assert!(stale.open().is_err());
        assert!(View::of_process(-1, Path::new("/")).is_err());
        Ok(())
    }
}
