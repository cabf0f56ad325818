//! `corral-agent`: the node daemon (standalone: `--policy FILE`).
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser as _;
use corral_agent::daemon::{self, config::Config, config::LogFormat};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // aya and other `log` users go through tracing (tracing-subscriber's `tracing-log`).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Plain => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr))
            .init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
    }
}

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logs(config.log_format);
    let resolved = config.resolve().context("resolve the configuration")?;
    tracing::info!(config = ?resolved.config, cgroup2 = %resolved.cgroup_root.display(), "corral-agent starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(daemon::run(resolved))
        .map_err(|e| anyhow::anyhow!(daemon::policy::error_chain(&e)))
}
