//! `corral-agent`: the node daemon (standalone: `--policy FILE`).
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser as _;
use corral_agent::daemon::{self, config::Config};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    corral_runtime::logging::init(config.log_format);
    let resolved = config.resolve().context("resolve the configuration")?;
    tracing::info!(config = ?resolved.config, cgroup2 = %resolved.cgroup_root.display(), "corral-agent starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(daemon::run(resolved))
        .map_err(|e| anyhow::anyhow!(corral_runtime::error_chain(&e)))
}
