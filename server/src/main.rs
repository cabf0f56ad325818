//! `corral-server --listen ADDR --db PATH`: the central policy server.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser as _;
use corral_server::config::{Config, LogFormat};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("CORRAL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(corral_server::run(config))
        .map_err(|e| anyhow::anyhow!(corral_agent::daemon::policy::error_chain(&e)))
}
