//! The node's dynamic loaders, for the `LOADERS` map: `ld-linux-x86-64.so.2 /usr/bin/curl`
//! runs curl while the kernel sees only the loader exec'd, so executing a loader directly is
//! allowed only by an exec rule naming the loader itself (`agent-ebpf/src/exec.rs`).
//!
//! Loaders are the files named `ld-linux*.so*`, `ld-musl-*.so*` or `ld64.so*` in the library
//! directories (`/lib`, `/lib64`, `/usr/lib`, `/usr/lib64`, `/libx32`, `/lib32` and their
//! multiarch subdirectories such as `/usr/lib/x86_64-linux-gnu`), by the identity the kernel
//! sees. Read at start and every second by the daemon (a glibc upgrade replaces the file).

use std::{collections::BTreeSet, path::PathBuf};

const LIB_DIRS: [&str; 8] = [
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/libx32",
];

/// Whether a file name is a dynamic loader's.
pub fn is_loader_name(name: &str) -> bool {
    (name.starts_with("ld-linux") || name.starts_with("ld-musl-") || name.starts_with("ld64.so"))
        && name.contains(".so")
}

/// Paths of the node's dynamic loaders (symlinks included: their targets count once).
pub fn loader_paths() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = LIB_DIRS.iter().map(PathBuf::from).collect();
    for d in LIB_DIRS {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Multiarch directories: x86_64-linux-gnu, aarch64-linux-musl, ...
                if name.contains("-linux-") && e.path().is_dir() {
                    dirs.push(e.path());
                }
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if is_loader_name(&e.file_name().to_string_lossy()) {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The kernel identities `(dev, inode)` of the node's dynamic loaders.
pub fn loader_identities() -> BTreeSet<(u32, u64)> {
    loader_paths()
        .iter()
        .filter_map(|p| super::exec_rules::identity(p).ok())
        .filter(|(_, _, dir)| !dir)
        .map(|(dev, ino, _)| (dev, ino))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_names() {
        for yes in [
            "ld-linux-x86-64.so.2",
            "ld-linux-aarch64.so.1",
            "ld-linux.so.2",
            "ld-musl-x86_64.so.1",
            "ld64.so.2",
        ] {
            assert!(is_loader_name(yes), "{yes}");
        }
        for no in ["ld.so.cache", "libc.so.6", "ld-linux", "ldconfig"] {
            assert!(!is_loader_name(no), "{no}");
        }
    }

    #[test]
    fn this_node_has_a_loader() {
        assert!(
            !loader_identities().is_empty(),
            "no dynamic loader found in {:?}",
            loader_paths()
        );
    }
}
