//! Host paths, discovered rather than hard-coded (the cgroup2 mount differs between hybrid and
//! unified layouts: `/sys/fs/cgroup/unified` vs `/sys/fs/cgroup`).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no {fstype} filesystem is mounted (looked in {path})")]
    NotMounted { fstype: &'static str, path: PathBuf },
    #[error("mount {fstype} at {path}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Mount point of the first filesystem of type `fstype` in `/proc/self/mountinfo`.
pub fn find_mount(fstype: &'static str) -> Result<PathBuf, PathError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| PathError::Read {
        path: MOUNTINFO.into(),
        source,
    })?;
    parse_mountinfo(&text, fstype).ok_or(PathError::NotMounted {
        fstype,
        path: MOUNTINFO.into(),
    })
}

/// Where tracefs is mounted, mounting it at `/sys/kernel/tracing` first if it is nowhere (as
/// root; per-syscall tracepoints are found through it). Kernel 4.1+.
pub fn ensure_tracefs() -> Result<PathBuf, PathError> {
    if let Ok(p) = find_mount("tracefs") {
        return Ok(p);
    }
    let at = PathBuf::from(TRACEFS);
    rustix::mount::mount(
        "nodev",
        &at,
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(|e| PathError::Mount {
        fstype: "tracefs",
        path: at.clone(),
        source: e.into(),
    })?;
    Ok(at)
}

/// Where tracefs is mounted when nothing mounted it.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// `mountinfo` lines: `id parent maj:min root mountpoint opts [optional...] - fstype source sopts`.
fn parse_mountinfo(text: &str, fstype: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fs = post.split_whitespace().next()?;
        if fs != fstype {
            return None;
        }
        let mountpoint = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (three octal digits).
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 root.
pub fn cgroup2_root() -> Result<PathBuf, PathError> {
    find_mount("cgroup2")
}

/// Directory under the cgroup v2 root that holds Corral's local principals.
pub fn principals_cgroup(root: &Path) -> PathBuf {
    root.join("corral")
}

/// Where programs, links and maps are pinned.
pub fn bpffs_pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("corral")
}

pub use corral_runtime::paths::{AGENT_SOCKET, WORKLOAD_SOCKET};
/// Last-known-good policy and other state.
pub const STATE_DIR: &str = "/var/lib/corral";

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
37 35 0:32 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        assert_eq!(
            parse_mountinfo(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_mountinfo(HYBRID, "bpf"), None);
    }

    #[test]
    fn unescapes_octal_escapes_anywhere() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/end\\040"), "/end ");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
        assert_eq!(unescape_mountinfo("/x\\+12"), "/x\\+12");
    }

    #[test]
    fn unescapes_spaces() {
        let line = "40 25 0:40 / /mnt/with\\040space rw - bpf bpf rw\n";
        assert_eq!(
            parse_mountinfo(line, "bpf"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
