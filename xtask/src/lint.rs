//! rustfmt and clippy, then the kernel-free dependency checks ([`crate::deps`]). The eBPF
//! crate is linted separately, for its own target with nightly.

use crate::cmd;

pub fn run() -> anyhow::Result<()> {
    let root = cmd::root();
    cmd::run(
        cmd::cargo()
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )?;
    cmd::run(cmd::cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::run(
        std::process::Command::new("rustup")
            .current_dir(&root)
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "agent-ebpf",
                "--bins",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
    )?;
    crate::deps::run()
}
