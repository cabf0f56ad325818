//! `cargo xtask up`: builds Corral and runs the node agent in the foreground, standalone, with
//! `examples/quickstart.yaml` (edit it while the agent runs: it reloads on change).
//!
//! In another terminal, the `corral` command line talks to it (see README.md). Ctrl-C stops the
//! agent and, since this is a demo, removes its programs (`--uninstall`); without
//! `--uninstall`, enforcement would stay pinned for the next agent to adopt.

use std::path::PathBuf;

use crate::cmd;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Policy file to enforce.
    #[arg(long, default_value = "examples/quickstart.yaml")]
    policy: PathBuf,
    /// Keep enforcement pinned when the agent stops (default for this demo: remove it).
    #[arg(long)]
    keep_pins: bool,
    /// More arguments for `corral-agent` (see `corral-agent --help`).
    #[arg(trailing_var_arg = true)]
    agent_args: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let root = cmd::root();
    crate::test::build_binaries()?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let agent = target.join("debug").join("corral-agent");
    let policy = if args.policy.is_absolute() {
        args.policy.clone()
    } else {
        root.join(&args.policy)
    };
    let mut c = if cmd::is_root() {
        std::process::Command::new(&agent)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.arg("-E").arg(&agent);
        c
    };
    c.arg("--policy").arg(&policy);
    if !args.keep_pins {
        c.arg("--uninstall");
    }
    c.args(&args.agent_args);
    eprintln!(
        "corral-agent enforcing {} (Ctrl-C to stop); in another terminal: \
         {}/corral status",
        policy.display(),
        target.join("debug").display()
    );
    cmd::run(&mut c)
}
