//! The kernel-free crates stay kernel-free. `corral-server`, `corral` and the crates they share
//! with the agent must build on stable Rust alone, without the eBPF toolchain (nightly,
//! rust-src, bpf-linker), so a laptop can build the CLI and the server image needs no
//! toolchain. Two checks, both run by `cargo xtask lint` (and so in CI):
//!
//! 1. [`check_trees`]: no crate that loads programs or watches Kubernetes (aya, aya-obj, kube,
//!    k8s-openapi, the agent itself) in their normal dependency trees.
//! 2. [`build_without_toolchain`]: `corral-server` and `corral` are built with the stable
//!    toolchain and a `bpf-linker` that always fails first on `PATH`: building the kernel
//!    object (which only `corral-agent`'s `build.rs` does) would fail the check.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Crates that must never need the kernel toolchain.
pub const KERNEL_FREE: &[&str] = &[
    "corral-server",
    "corral-cli",
    "corral-policy",
    "corral-runtime",
    "corral-events",
    "corral-proto",
    "agent-common",
];

/// Crates none of them may depend on.
const FORBIDDEN: &[&str] = &[
    "aya",
    "aya-obj",
    "aya-build",
    "aya-log",
    "kube",
    "kube-client",
    "k8s-openapi",
    "corral-agent",
    "agent-ebpf",
];

pub fn run() -> anyhow::Result<()> {
    check_trees()?;
    build_without_toolchain()
}

/// Fails if a [`FORBIDDEN`] crate is in the normal dependency tree of a [`KERNEL_FREE`] one.
pub fn check_trees() -> anyhow::Result<()> {
    let mut found = Vec::new();
    for krate in KERNEL_FREE {
        let tree = cmd::output(cmd::cargo().current_dir(cmd::root()).args([
            "tree",
            "--edges",
            "normal",
            "--package",
            krate,
            "--prefix",
            "none",
            "--format",
            "{p}",
        ]))?;
        let names = crate_names(&tree);
        found.extend(FORBIDDEN.iter().filter(|f| names.contains(f)).map(|f| {
            format!("{krate} depends on {f} (see `cargo tree -e normal -p {krate} -i {f}`)")
        }));
    }
    if !found.is_empty() {
        bail!(
            "kernel-free crates pull in the kernel toolchain's crates:\n  {}",
            found.join("\n  ")
        );
    }
    eprintln!(
        "xtask deps: {} crates checked, none depends on {}",
        KERNEL_FREE.len(),
        FORBIDDEN.join(", ")
    );
    Ok(())
}

/// The crate names in `cargo tree --prefix none --format {p}` output (`name vX.Y.Z (path)`).
fn crate_names(tree: &str) -> Vec<&str> {
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// Builds `corral-server` and `corral` with the stable toolchain and a failing `bpf-linker`
/// ahead on `PATH`, in the shared target dir.
pub fn build_without_toolchain() -> anyhow::Result<()> {
    let shim = shim_dir()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![shim.clone()];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).context("join PATH")?;
    let res = cmd::run(
        Command::new("rustup")
            .current_dir(cmd::root())
            .args([
                "run",
                "stable",
                "cargo",
                "build",
                "--package",
                "corral-server",
                "--package",
                "corral-cli",
                "--bins",
            ])
            .env("PATH", path)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("build corral-server and corral without the eBPF toolchain");
    let _ = std::fs::remove_dir_all(&shim);
    res?;
    eprintln!("xtask deps: corral-server and corral build on stable without bpf-linker");
    Ok(())
}

/// A directory holding a `bpf-linker` that always fails.
fn shim_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("corral-no-bpf-linker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let linker = dir.join("bpf-linker");
    std::fs::write(
        &linker,
        "#!/bin/sh\necho 'bpf-linker is not available in this check' >&2\nexit 1\n",
    )
    .with_context(|| format!("write {}", linker.display()))?;
    let mut perms = std::fs::metadata(&linker)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&linker, perms)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_first_word_of_each_line() {
        let tree = "corral-cli v0.1.0 (/w/cli)\nclap v4.6.7\naya v0.14.0\n";
        assert_eq!(crate_names(tree), ["corral-cli", "clap", "aya"]);
    }
}
