//! `corral-agent`: the node daemon.
use anyhow::Context as _;
use clap::Parser;

/// Corral node agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Standalone mode: enforce the policies in this file.
    #[arg(long, env = "CORRAL_POLICY")]
    policy: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().init();
    let root = corral_agent::paths::cgroup2_root().context("find the cgroup v2 mount")?;
    tracing::info!(cgroup2 = %root.display(), policy = ?args.policy, "corral-agent starting");
    anyhow::bail!("the agent daemon is not implemented yet (issue 5)")
}
