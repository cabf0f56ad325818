//! `corral`: the command line for people and scripts.
//!
//! Implemented: `run`, `events`, `status` (local agent), `policy check` and `policy explain`
//! (locally with `--policy FILE`, else through the agent), and against the central server
//! (`--server URL`): `policy apply/list/get/delete/status`, `events --server` and
//! `grant request/list/approve/deny/revoke`.
//!
//! Modules, one job each:
//!
//! - `main`: parses the arguments and runs the chosen command through `exec::block_on`.
//! - `exec`: runs one command: the single-threaded runtime, the error line on stderr, the exit
//!   status.
//! - `error`: `error::CliError`, every way a command fails, and the one sentence shown for it.
//! - `client`: connects to the local agent over its unix socket (`--socket`).
//! - `server_client`: connects to the central server (`--server`, mTLS). The server names
//!   the caller itself (certificate, or the uid owning the loopback socket); the CLI sends no
//!   name.
//! - `policy`: `policy check` and `policy explain`; hands the server's `policy` subcommands
//!   to `fleet`.
//! - `fleet`: `policy apply|list|get|delete|status` and `events --server` on the server.
//! - `grant`: `grant request|list|approve|deny|revoke` on the server.
//! - `run`: `corral run`: enrol through the agent, join the principal's cgroup, exec CMD.
//! - `contain`: what `corral run` does to itself before exec: `--user`, capabilities,
//!   `no_new_privs`, the seccomp filter.
//! - `events`: `corral events`: the local agent's event stream (or the fleet's with
//!   `--server`).
//! - `status`: `corral status`: what the local agent enforces.
//! - `oci_hook`: `corral oci-hook` (`corral-oci-hook`): the OCI runtime hook that enrols an
//!   annotated container before it starts.
//! - `hook_install`: `corral install-oci-hook`: puts the hook and its CRI-O/Podman config on a
//!   node (the DaemonSet's init container).
//!
//! Every command is an `async fn` returning `Result<ExitCode, CliError>`; `exec::block_on`
//! prints an error as `corral run: `, `corral events: ` or `corral status: ` and the message,
//! or (for `policy` and `grant`) the message alone.
#![forbid(unsafe_code)]

mod client;
mod contain;
mod error;
mod events;
mod exec;
mod fleet;
mod grant;
mod hook_install;
mod oci_hook;
mod policy;
mod run;
mod server_client;
mod simulate;
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
    /// Enrol a principal through the local agent and run CMD inside it, contained: no
    /// capabilities, no_new_privs, a seccomp filter (exit status is CMD's).
    Run(run::Args),
    /// Decisions and process events from the local agent.
    Events(events::Args),
    /// What the local agent enforces: exec mode, hooks, policy revision, principals, counters.
    Status(status::Args),
    /// OCI runtime hook (createRuntime): enrol an annotated container before its first
    /// instruction; reads the OCI state on stdin. Also runs as `corral-oci-hook`.
    OciHook(oci_hook::Args),
    /// Install the OCI hook on this node: `corral` and the `corral-oci-hook` link in
    /// --bin-dir, the CRI-O/Podman hook config in --hooks-dir (idempotent).
    InstallOciHook(hook_install::Args),
}

fn main() -> ExitCode {
    // Installed as `corral-oci-hook` (a symlink), the binary is the hook.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "corral-oci-hook")
    {
        argv.insert(1, "oci-hook".into());
    }
    let args = Args::parse_from(argv);
    match args.command {
        Command::Policy(c) => exec::block_on("", policy::run(c)),
        Command::Grant(c) => exec::block_on("", grant::run(c)),
        Command::Run(a) => exec::block_on("corral run: ", run::run(&a)),
        Command::Events(a) => exec::block_on("corral events: ", events::run(&a)),
        Command::Status(a) => exec::block_on("corral status: ", status::run(&a)),
        Command::OciHook(a) => exec::block_on("corral oci-hook: ", oci_hook::run(&a)),
        Command::InstallOciHook(a) => {
            exec::block_on("corral install-oci-hook: ", hook_install::run(&a))
        }
    }
}
