//! `cargo xtask up`: builds Corral and runs it in the foreground.
//!
//! Until the node agent daemon lands (issue 5) this runs the enforcement demo: the real
//! programs attached at the cgroup v2 root, a real process in an enrolled cgroup whose
//! connect() to a denied loopback port fails with EPERM.

use crate::cmd;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    let mut c = cmd::cargo();
    c.current_dir(cmd::root())
        .args(["test", "--package", "corral-tests", "--test", "connect"]);
    crate::test::sudo_runner_if_needed(&mut c);
    c.args(["--", "--nocapture"]);
    cmd::run(&mut c)
}
