//! Why a command failed: [`CliError`], one variant per kind of failure, whose `Display` is the
//! one sentence the user sees on stderr (end-to-end tests match these texts: keep them).

use std::{error::Error, path::PathBuf, process::ExitCode, time::Duration};

use corral_policy::{PolicyError, identity::IdentityError};
use corral_runtime::tls::TlsError;

/// Which end of a call refused or failed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The local agent (its unix socket API).
    Agent,
    /// The central corral-server (`--server URL`).
    Server,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The single-threaded tokio runtime could not be built.
    #[error("cannot start the async runtime: {source}")]
    Runtime { source: std::io::Error },

    /// The agent's socket accepted nothing (or no HTTP/2 handshake) within `timeout`.
    #[error(
        "the corral agent at {} did not answer within {} s (is it still starting?)",
        .socket.display(),
        .timeout.as_secs()
    )]
    AgentTimeout { socket: PathBuf, timeout: Duration },

    /// Connecting to the agent's socket failed.
    #[error(
        "cannot reach the corral agent at {}: {} (is `corral-agent` running?)",
        .socket.display(),
        root_cause(.source)
    )]
    AgentUnreachable {
        socket: PathBuf,
        source: tonic::transport::Error,
    },

    /// `--server` is not a URL.
    #[error("bad --server URL {url}: {source}")]
    BadServerUrl {
        url: String,
        source: tonic::transport::Error,
    },

    /// `--server https://...` without the mTLS files.
    #[error("--server {url}: give --tls-cert, --tls-key and --tls-ca for mTLS")]
    TlsMissing { url: String },

    /// The `--tls-*` files could not be read (or not all three were given).
    #[error("cannot load the TLS files: {}", root_cause(.source))]
    TlsFiles { source: TlsError },

    /// tonic refused the TLS configuration.
    #[error("cannot configure TLS: {}", root_cause(.source))]
    TlsConfig { source: tonic::transport::Error },

    /// `--server` named no URL.
    #[error("--server names no server URL")]
    NoServer,

    /// Connecting to the server failed.
    #[error(
        "cannot reach the corral server at {url}: {} (is `corral-server` running?)",
        root_cause(.source)
    )]
    ServerUnreachable {
        url: String,
        source: tonic::transport::Error,
    },

    /// A call (or a stream's item) returned an error status.
    #[error("{}", status_text(.side, .status))]
    Rpc {
        side: Side,
        #[source]
        status: Box<tonic::Status>,
    },

    /// A policy file could not be read, or was rejected.
    #[error("{}", policy_text(.source))]
    Policy {
        #[from]
        source: PolicyError,
    },

    /// `policy apply` waited `timeout_secs` and these connected nodes had not answered.
    #[error(
        "timed out after {timeout_secs} s waiting for nodes to answer revision {revision}: {}",
        .waiting.join(", ")
    )]
    NodesTimedOut {
        timeout_secs: u64,
        revision: u64,
        waiting: Vec<String>,
    },

    /// `grant request --wait` polled a grant the server no longer lists.
    #[error("grant {id} disappeared from the server")]
    GrantVanished { id: String },

    /// Writing the event stream to stdout failed (other than a closed pipe).
    #[error("cannot write events: {source}")]
    WriteEvents { source: std::io::Error },

    /// `corral run` could not move itself into the principal's cgroup.
    #[error("cannot join the principal's cgroup {}: {source}", .cgroup.display())]
    JoinCgroup {
        cgroup: PathBuf,
        source: std::io::Error,
    },

    /// `corral run` could not exec the command (exit status 127 if not found, else 126).
    #[error("cannot run {command}: {source}")]
    Exec {
        command: String,
        source: std::io::Error,
    },

    /// `--user` names no user (exit status 126: CMD is not run).
    #[error("--user {user}: {reason}")]
    BadUser { user: String, reason: String },

    /// `--cap` names no capability (exit status 126).
    #[error("--cap {name}: not a capability; write e.g. net_bind_service or CAP_NET_BIND_SERVICE")]
    BadCap { name: String },

    /// A containment step before exec failed (exit status 126: CMD is not run).
    #[error("cannot contain the command ({step}): {source}")]
    Contain {
        step: &'static str,
        source: std::io::Error,
    },

    /// The seccomp filter could not be built or installed (exit status 126).
    #[error("cannot install the seccomp filter: {source} (--no-seccomp runs without it)")]
    Seccomp { source: seccompiler::Error },

    /// `corral run` without a command (exit status 2).
    #[error("no command given")]
    NoCommand,

    /// `--identity` is not a SPIFFE ID.
    #[error("--identity: {source}")]
    BadIdentity { source: IdentityError },

    /// `--exec PATH`: relative and not resolvable here.
    #[error("--exec {path}: {source}; give an absolute path (it need not exist here)")]
    BadExecPath {
        path: String,
        source: std::io::Error,
    },

    /// A duration argument that does not parse.
    #[error("`{value}` is not a duration like 10m, 1h30m or 45s")]
    BadDuration { value: String },

    /// `corral oci-hook`: the OCI state on stdin is unusable (the container does not start).
    #[error("bad OCI state on stdin: {reason}")]
    OciState { reason: String },

    /// `corral oci-hook --fail-open`: the record that makes an unpoliced start visible could
    /// not be written, so the container does not start either.
    #[error("cannot record the fail-open start in {}: {source}", .path.display())]
    FailOpenRecord {
        path: PathBuf,
        source: std::io::Error,
    },

    /// `corral install-oci-hook`: a file could not be written on the node.
    #[error("cannot install {}: {source}", .path.display())]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Any other bad argument (e.g. a `--connect` address): the message says what to write.
    #[error("{message}")]
    Usage { message: String },
}

impl CliError {
    /// Writing events to stdout failed: a closed pipe (`| head`) ends the command quietly,
    /// other write errors are reported.
    pub fn from_write(e: std::io::Error) -> Result<(), Self> {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Ok(())
        } else {
            Err(Self::WriteEvents { source: e })
        }
    }

    /// A failed call to the local agent.
    pub fn agent(status: tonic::Status) -> Self {
        Self::Rpc {
            side: Side::Agent,
            status: Box::new(status),
        }
    }

    /// A failed call to the central server.
    pub fn server(status: tonic::Status) -> Self {
        Self::Rpc {
            side: Side::Server,
            status: Box::new(status),
        }
    }

    /// A bad argument.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::Usage {
            message: message.into(),
        }
    }

    /// The process exit status for this failure: 1, except for `corral run`'s own (126/127
    /// when CMD cannot be run, like a shell, also when it cannot be contained; 2 without a
    /// command).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Exec { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ExitCode::from(127)
            }
            Self::Exec { .. }
            | Self::BadUser { .. }
            | Self::BadCap { .. }
            | Self::Contain { .. }
            | Self::Seccomp { .. } => ExitCode::from(126),
            Self::NoCommand => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The innermost cause's text (e.g. `No such file or directory (os error 2)`), not tonic's
/// wrappers around it.
pub fn root_cause(e: &dyn Error) -> String {
    let mut cur = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

/// One sentence for a failed call; the agent's multi-line messages are joined with `; `, the
/// server's are kept (policy rejections keep their `file:line:col` lines).
fn status_text(side: &Side, s: &tonic::Status) -> String {
    use tonic::Code;
    match side {
        Side::Agent => {
            let what = match s.code() {
                Code::PermissionDenied => "the agent refused",
                Code::InvalidArgument => "invalid request",
                Code::FailedPrecondition => "the agent cannot do that now",
                Code::Unavailable => "the agent is unavailable",
                _ => "the agent failed",
            };
            format!("{what}: {}", s.message().replace('\n', "; "))
        }
        Side::Server => {
            let what = match s.code() {
                Code::InvalidArgument => "the server rejected it",
                Code::NotFound => "not found",
                Code::FailedPrecondition => "the server cannot do that now",
                Code::PermissionDenied => "not allowed",
                Code::Unavailable => "the server is unavailable",
                _ => "the server failed",
            };
            format!("{what}: {}", s.message())
        }
    }
}

fn policy_text(e: &PolicyError) -> String {
    match e {
        PolicyError::Read { file, source } => format!("cannot read policy file {file}: {source}"),
        PolicyError::Invalid(_) => format!("the policy file is invalid:\n{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_errors_keep_their_one_sentence() {
        let refused = tonic::Status::permission_denied("inside an enrolled principal\nno");
        assert_eq!(
            CliError::agent(refused.clone()).to_string(),
            "the agent refused: inside an enrolled principal; no"
        );
        assert_eq!(
            CliError::server(refused).to_string(),
            "not allowed: inside an enrolled principal\nno"
        );
        assert_eq!(
            CliError::server(tonic::Status::internal("boom")).to_string(),
            "the server failed: boom"
        );
    }

    #[test]
    fn policy_and_run_errors() {
        let read = CliError::from(PolicyError::Read {
            file: "/p.yaml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(
            read.to_string()
                .starts_with("cannot read policy file /p.yaml: "),
            "{read}"
        );
        let missing = CliError::Exec {
            command: "nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(missing.exit_code(), ExitCode::from(127));
        assert_eq!(CliError::NoCommand.exit_code(), ExitCode::from(2));
        assert_eq!(CliError::usage("x").exit_code(), ExitCode::FAILURE);
    }

    #[test]
    fn root_cause_is_the_innermost_error() {
        let e = CliError::TlsFiles {
            source: TlsError::Read {
                path: "/nonexistent/c".into(),
                source: std::io::Error::other("gone"),
            },
        };
        assert_eq!(e.to_string(), "cannot load the TLS files: gone");
        let e = CliError::TlsFiles {
            source: TlsError::Incomplete,
        };
        assert_eq!(
            e.to_string(),
            "cannot load the TLS files: give all of --tls-cert, --tls-key and --tls-ca"
        );
    }
}
