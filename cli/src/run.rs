//! `corral run --identity ID [--session S] [--user U] [--cap C]... [--no-seccomp] [-v] -- CMD
//! ARGS...`: enrol a principal through the local agent, join its cgroup, contain this process
//! (`contain`), exec CMD (so CMD's exit status is ours).

use std::{os::unix::process::CommandExt as _, path::Path, process::ExitCode};

use corral_proto::v1 as pb;

use crate::{
    client::{self, SocketArgs},
    contain::{Cap, Containment, User},
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
    /// Opt-out: run CMD as this user (name from /etc/passwd, or a uid) instead of root.
    /// Shown in `corral status`.
    #[arg(long, value_name = "USER|UID")]
    user: Option<String>,
    /// Opt-out: keep this capability (e.g. net_bind_service or CAP_NET_BIND_SERVICE; repeat
    /// for more). By default CMD has none: bounding, permitted, effective, inheritable and
    /// ambient sets are emptied. Shown in `corral status`.
    #[arg(long = "cap", value_name = "CAP")]
    caps: Vec<String>,
    /// Opt-out: no seccomp filter. By default ptrace and its kin, bpf, perf_event_open, kernel
    /// modules, kexec, setns, mount and new user/mount namespaces fail with EPERM (clone3 with
    /// ENOSYS). Shown in `corral status`. `no_new_privs` is set either way.
    #[arg(long)]
    no_seccomp: bool,
    #[command(flatten)]
    socket: SocketArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Enrols, joins the principal's cgroup and execs CMD: returns only if that fails.
pub async fn run(a: &Args) -> Result<ExitCode, CliError> {
    // Bad --user/--cap fail before anything is enrolled.
    let contain = Containment {
        user: a.user.as_deref().map(User::resolve).transpose()?,
        caps: a
            .caps
            .iter()
            .map(|c| Cap::parse(c))
            .collect::<Result<_, _>>()?,
        seccomp: !a.no_seccomp,
    };
    let r = {
        let mut c = client::connect(&a.socket.socket).await?;
        c.enroll(pb::EnrollRequest {
            identity: a.identity.clone(),
            session: a.session.clone().unwrap_or_default(),
            user: contain
                .user
                .as_ref()
                .map(|u| u.uid.to_string())
                .unwrap_or_default(),
            caps: contain.caps.iter().map(|c| c.name().to_owned()).collect(),
            no_seccomp: a.no_seccomp,
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
    contain.apply()?;
    let mut command = std::process::Command::new(cmd);
    command.args(args);
    // The principal's credentials: the agent's SPIFFE Workload API.
    if !r.workload_endpoint.is_empty() {
        command.env("SPIFFE_ENDPOINT_SOCKET", &r.workload_endpoint);
    }
    // The runtime's descriptors (epoll, the agent's socket) are close-on-exec.
    let source = command.exec();
    Err(CliError::Exec {
        command: cmd.clone(),
        source,
    })
}
