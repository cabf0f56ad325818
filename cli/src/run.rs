//! `corral run --identity ID [--session S] [-v] -- CMD ARGS...`: enrol a principal through the
//! local agent, join its cgroup, exec CMD (so CMD's exit status is ours).

use std::{os::unix::process::CommandExt as _, path::Path, process::ExitCode};

use corral_proto::v1 as pb;

use crate::client::{self, SocketArgs};

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

fn enroll(a: &Args) -> Result<pb::EnrollResponse, String> {
    let rt = client::runtime()?;
    rt.block_on(async {
        let mut c = client::connect(&a.socket.socket).await?;
        c.enroll(pb::EnrollRequest {
            identity: a.identity.clone(),
            session: a.session.clone().unwrap_or_default(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| client::status_text(&s))
    })
}

fn run_inner(a: &Args) -> Result<std::convert::Infallible, (String, u8)> {
    let r = enroll(a).map_err(|e| (e, 1))?;
    let cg = Path::new(&r.cgroup_path);
    std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).map_err(|e| {
        (
            format!("cannot join the principal's cgroup {}: {e}", cg.display()),
            1,
        )
    })?;
    if a.verbose {
        let p = r.principal.unwrap_or_default();
        eprintln!(
            "corral: identity {} session {} cgroup {}",
            p.identity, p.session, r.cgroup_path
        );
    }
    let (cmd, args) = a
        .command
        .split_first()
        .ok_or_else(|| ("no command given".to_owned(), 2))?;
    let err = std::process::Command::new(cmd).args(args).exec();
    let code = if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    Err((format!("cannot run {cmd}: {err}"), code))
}

pub fn run(a: &Args) -> ExitCode {
    match run_inner(a) {
        Ok(never) => match never {},
        Err((msg, code)) => {
            eprintln!("corral run: {msg}");
            ExitCode::from(code)
        }
    }
}
