//! Toolchain setup, idempotent and quiet when everything is present:
//! 1. the `nightly` toolchain (rustup) with its `rust-src` component: the eBPF crate is built
//!    with `-Z build-std=core`. If rustup cannot download it (offline machine), the tarball
//!    named by `CORRAL_RUST_SRC_TARBALL` is unpacked into the nightly sysroot instead.
//! 2. `bpf-linker`, built against the nightly toolchain's own libLLVM (no LLVM package is new
//!    enough on Debian bookworm; a plain `cargo install bpf-linker` fails with `-lLLVM`).
//! 3. bpffs mounted at /sys/fs/bpf when running as root (for pins).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

const NIGHTLY: &str = "nightly";
const RUST_SRC_ENV: &str = "CORRAL_RUST_SRC_TARBALL";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs();
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn ensure_nightly() -> anyhow::Result<()> {
    if cmd::succeeds(rustup().args(["run", NIGHTLY, "rustc", "--version"])) {
        return Ok(());
    }
    eprintln!("xtask setup: installing the {NIGHTLY} toolchain");
    cmd::run(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

fn sysroot() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(cmd::output(
        rustup().args(["run", NIGHTLY, "rustc", "--print", "sysroot"]),
    )?))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let src = sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if src.exists() {
        return Ok(());
    }
    eprintln!("xtask setup: adding rust-src to {NIGHTLY}");
    if cmd::run(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY])).is_ok()
        && src.exists()
    {
        return Ok(());
    }
    let Some(tarball) = std::env::var_os(RUST_SRC_ENV) else {
        bail!(
            "rustup could not add rust-src for {NIGHTLY}; on an offline machine set \
             {RUST_SRC_ENV} to a rust-src tarball (see README)"
        );
    };
    let dest = sysroot()?.join("lib/rustlib");
    eprintln!(
        "xtask setup: unpacking {} into {}",
        PathBuf::from(&tarball).display(),
        dest.display()
    );
    cmd::run(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dest)
            .arg("src"),
    )
    .context("unpack the rust-src tarball")?;
    if !src.exists() {
        bail!("{} does not exist after unpacking", src.display());
    }
    Ok(())
}

/// The nightly toolchain's libLLVM, e.g. `LLVM-22-rust-1.97.0-nightly`, and its major version.
fn nightly_llvm() -> anyhow::Result<(PathBuf, String, String)> {
    let lib = sysroot()?.join("lib");
    for e in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        // libLLVM-22-rust-1.97.0-nightly.so
        if let Some(stem) = name
            .strip_prefix("lib")
            .and_then(|n| n.strip_suffix(".so"))
            .filter(|n| n.starts_with("LLVM-"))
        {
            let major = stem
                .trim_start_matches("LLVM-")
                .split('-')
                .next()
                .unwrap_or_default()
                .to_owned();
            return Ok((lib, stem.to_owned(), major));
        }
    }
    bail!("no libLLVM-*.so in {}", lib.display())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let (lib, llvm, major) = nightly_llvm()?;
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about a minute)"
    );
    let rustflags = format!(
        "-L {dir} -l dylib={llvm} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib.display()
    );
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
    .context("install bpf-linker")
}

/// Pins need bpffs; mount it if we can and it is not there. Not fatal: unprivileged builds
/// work without it.
fn ensure_bpffs() {
    if !cmd::is_root() {
        return;
    }
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.contains(" - bpf ")))
        .unwrap_or(false);
    if !mounted {
        let _ = std::fs::create_dir_all("/sys/fs/bpf");
        if !cmd::succeeds(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
            eprintln!("xtask setup: could not mount bpffs at /sys/fs/bpf (pinning will fail)");
        }
    }
}
