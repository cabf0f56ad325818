//! `corral`: the command line for people and scripts.
//!
//! Implemented so far: `corral policy check FILE` and `corral policy explain`. The other
//! commands of DESIGN.md (run, events, status, grant, policy apply/list/get/delete) arrive with
//! the agent API and the server.
#![forbid(unsafe_code)]

mod policy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Corral command line")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and explain policies.
    #[command(subcommand)]
    Policy(policy::Command),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Policy(c) => policy::run(c),
    }
}
