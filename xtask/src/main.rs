//! `cargo xtask`: what cargo alone cannot do. Toolchain setup (nightly rust-src, bpf-linker
//! against the nightly libLLVM), privileged test runs, lint of the eBPF crate, running Corral,
//! and benchmarks. Every command runs `setup` first, so a fresh machine needs only rustup.
#![forbid(unsafe_code)]

mod bench;
mod certs;
mod cmd;
mod deps;
mod lint;
mod setup;
mod test;
mod up;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Corral's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build needs (idempotent; quiet when all is present).
    Setup,
    /// Build Corral and run it in the foreground.
    Up(up::Args),
    /// Run every test: unit, privileged integration (real kernel), end-to-end.
    Test(test::Args),
    /// rustfmt check, clippy (workspace, then the eBPF crate for its own target), and `deps`.
    Lint,
    /// Check that the server, the CLI and their shared crates need no eBPF toolchain.
    Deps,
    /// Benchmarks: ratios against a baseline measured in the same run, latencies as p50/p99.
    Bench(bench::Args),
    /// Write a development CA and mTLS certificates (server, clients) as PEM files.
    Certs(certs::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Certificates need no toolchain.
    if !matches!(cli.command, Command::Certs(_)) {
        setup::ensure()?;
    }
    match cli.command {
        Command::Setup => Ok(()),
        Command::Up(a) => up::run(&a),
        Command::Test(a) => test::run(&a),
        Command::Lint => lint::run(),
        Command::Deps => deps::run(),
        Command::Bench(a) => bench::run(&a),
        Command::Certs(a) => certs::run(&a),
    }
}
