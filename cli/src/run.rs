//! `corral run --identity ID [--session S] [-v] -- CMD ARGS...`: enrol a principal through the
//! local agent, join its cgroup, exec CMD (so CMD's exit status is ours).

use std::{os::unix::process::CommandExt as _, path::Path, process::ExitCode};

use corral_proto::v1 as pb;

use crate::{
    client::{self, SocketArgs},
    error::CliError,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The principal's SPIFFE ID, e.g. spiffe://demo.corral/agent/quickstart.
    #[arg(long)]
    identity: String,
    /// Session id (one task/run); default: a fresh random id.
    #[arg(long)]
    session: Option<String>,
    /// Print the principal (identity, session, cgroup) on stderr before running CMD.
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    socket: SocketArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Enrols, joins the principal's cgroup and execs CMD: returns only if that fails.
pub async fn run(a: &Args) -> Result<ExitCode, CliError> {
    let r = {
        let mut c = client::connect(&a.socket.socket).await?;
        c.enroll(pb::EnrollRequest {
            identity: a.identity.clone(),
            session: a.session.clone().unwrap_or_default(),
        })
        .await
        .map_err(CliError::agent)?
        .into_inner()
    };
    let cg = Path::new(&r.cgroup_path);
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).map_err(|source| {
        CliError::JoinCgroup {
            cgroup: cg.to_path_buf(),
            source,
        }
    })?;
    if a.verbose {
        let p = r.principal.unwrap_or_default();
        eprintln!(
            "corral: identity {} session {} cgroup {}",
            p.identity, p.session, r.cgroup_path
        );
    }
    let (cmd, args) = a.command.split_first().ok_or(CliError::NoCommand)?;
    // The runtime's descriptors (epoll, the agent's socket) are close-on-exec.
    let source = std::process::Command::new(cmd).args(args).exec();
    Err(CliError::Exec {
        command: cmd.clone(),
        source,
    })
}
