//! Runs every test: unit tests of all crates, then the privileged integration tests (real
//! programs in the real kernel) and end-to-end tests in `tests/`, as root. One cargo
//! invocation, one target dir: nothing is built twice.
//!
//! Not root: the test binaries are run through `sudo -E` (cargo's target runner).

use crate::cmd;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments for the test harness (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    harness: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut c = cmd::cargo();
    c.current_dir(cmd::root())
        .args(["test", "--workspace", "--exclude", "agent-ebpf"]);
    sudo_runner_if_needed(&mut c);
    // Show what passing privileged tests printed (what they loaded and ran, case counts), so
    // the log proves they ran rather than skipped.
    c.arg("--").arg("--show-output").args(&args.harness);
    cmd::run(&mut c)
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
