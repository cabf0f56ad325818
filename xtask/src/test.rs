//! Runs every test: unit tests of all crates, then the privileged integration tests (real
//! programs in the real kernel) and end-to-end tests in `tests/`, as root. One cargo
//! invocation, one target dir: nothing is built twice.
//!
//! Not root: the test binaries are run through `sudo -E` (cargo's target runner).
//!
//! The agent and CLI binaries are built first: the end-to-end tests run them as processes.

use crate::cmd;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments for the test harness (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    harness: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    build_binaries()?;
    let mut c = cmd::cargo();
    c.current_dir(cmd::root())
        .args(["test", "--workspace", "--exclude", "agent-ebpf"]);
    sudo_runner_if_needed(&mut c);
    // Show what passing privileged tests printed (what they loaded and ran, case counts), so
    // the log proves they ran rather than skipped.
    c.arg("--").arg("--show-output").args(&args.harness);
    cmd::run(&mut c)
}

/// The end-to-end tests (`tests/tests/e2e_agent.rs`, `e2e_server.rs`) run the real
/// `corral-agent`, `corral` and `corral-server` binaries; cargo builds only the tested package's own binaries for its tests, so build these
/// first, into the same target dir.
pub fn build_binaries() -> anyhow::Result<()> {
    cmd::run(cmd::cargo().current_dir(cmd::root()).args([
        "build",
        "--package",
        "corral-agent",
        "--package",
        "corral-cli",
        "--package",
        "corral-server",
    ]))
}

/// Privileged tests need root: when we are not root, run test binaries through `sudo -E`.
pub fn sudo_runner_if_needed(c: &mut std::process::Command) {
    if !cmd::is_root() {
        c.args([
            "--config",
            "target.'cfg(target_os = \"linux\")'.runner = ['sudo', '-E']",
        ]);
    }
}
