//! `corral`: the command line for people and scripts (run, events, policy, grant, status).
//!
//! Status: not implemented yet (issue 5 and later); exits with an error saying so.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "Corral command line")]
struct Args {
    #[arg(trailing_var_arg = true)]
    rest: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = corral_proto::v1::StatusRequest::default();
    anyhow::bail!("`corral {}` is not implemented yet", args.rest.join(" "))
}
