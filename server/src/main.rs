//! `corral-server --listen ADDR --db PATH`: the central policy server.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser as _;
use corral_server::config::Config;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    corral_runtime::logging::init(config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(corral_server::run(config))
        .map_err(|e| anyhow::anyhow!(corral_runtime::error_chain(&e)))
}
