//! `corral`: the command line for people and scripts.
//!
//! Implemented: `run`, `events`, `status` (local agent), `policy check` and `policy explain`
//! (locally with `--policy FILE`, else through the agent), and against the central server
//! (`--server URL`): `policy apply/list/get/delete/status`, `events --server` and
//! `grant request/list/approve/deny/revoke`.
#![forbid(unsafe_code)]

mod client;
mod events;
mod fleet;
mod grant;
mod policy;
mod run;
mod server_client;
mod status;

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
    /// Just-in-time grants on the central server: request, list, approve, deny, revoke.
    #[command(subcommand)]
    Grant(grant::Command),
    /// Enrol a principal through the local agent and run CMD inside it (exit status is CMD's).
    Run(run::Args),
    /// Decisions and process events from the local agent.
    Events(events::Args),
    /// What the local agent enforces: exec mode, hooks, policy revision, principals, counters.
    Status(status::Args),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Policy(c) => policy::run(c),
        Command::Grant(c) => grant::run(c),
        Command::Run(a) => run::run(&a),
        Command::Events(a) => events::run(&a),
        Command::Status(a) => status::run(&a),
    }
}
