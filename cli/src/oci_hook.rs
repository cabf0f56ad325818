//! `corral oci-hook [--socket S] [--fail-open]`, also run as `corral-oci-hook` (a symlink): an
//! OCI runtime hook (`createRuntime`, or `createContainer`). The runtime runs it with the
//! container's state on stdin while the container's init process waits for `start`, so the
//! container is enrolled before its first instruction.
//!
//! - A container without the `corral.dev/identity` annotation: the agent is asked (for at most
//!   two seconds) whether its cgroup is inside a principal already (a pod enrolled by its
//!   sandbox's hook or by the pod watch); if so it is recorded as that principal's, so its
//!   exec rules are resolved in its files. Exit 0 whatever the answer, agent down included.
//! - An opted-in container: the agent enrols its cgroup (the pod's on Kubernetes) and answers
//!   once the kernel maps hold it; exit 0. Any refusal (a bad identity, no such process): exit
//!   1, and the runtime does not start the container.
//! - The agent unreachable: exit 1 (fail closed), unless `--fail-open`: then exit 0, the
//!   container starts unpoliced, and a record next to the agent's socket
//!   (`fail-open/<id>.json`) makes the agent count it and publish a `failed-open` event when it
//!   runs again. If that record cannot be written, the container does not start either.

use std::{collections::HashMap, io::Read as _, process::ExitCode};

use corral_proto::v1 as pb;
use corral_runtime::oci::{FailOpenRecord, IDENTITY_ANNOTATION, fail_open_dir, file_name};

use crate::{
    client::{self, SocketArgs},
    error::CliError,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// When the agent cannot be reached, let an opted-in container start UNPOLICED (recorded
    /// for the agent's events and metrics) instead of refusing it.
    #[arg(long)]
    fail_open: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

/// The OCI state (runtime-spec `state`), the fields the hook needs.
#[derive(Debug, serde::Deserialize)]
struct State {
    id: String,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    bundle: Option<std::path::PathBuf>,
}

/// The bundle's `config.json`, the field the hook needs.
#[derive(Debug, serde::Deserialize)]
struct Config {
    root: Root,
}

#[derive(Debug, serde::Deserialize)]
struct Root {
    path: std::path::PathBuf,
}

/// The container's root filesystem (`root.path` of the bundle's config, relative to the
/// bundle unless absolute): where the agent resolves its exec rules before it pivots.
fn rootfs(bundle: &std::path::Path) -> Result<std::path::PathBuf, CliError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| CliError::OciState {
        reason: format!("read {}: {e}", path.display()),
    })?;
    let c: Config = serde_json::from_str(&text).map_err(|e| CliError::OciState {
        reason: format!("{}: {e}", path.display()),
    })?;
    Ok(bundle.join(c.root.path))
}

fn state(text: &str) -> Result<State, CliError> {
    let s: State = serde_json::from_str(text).map_err(|e| CliError::OciState {
        reason: e.to_string(),
    })?;
    if s.id.is_empty() {
        return Err(CliError::OciState {
            reason: "empty container id".into(),
        });
    }
    Ok(s)
}

/// How long a container that did not opt in waits for the agent's answer.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn run(a: &Args) -> Result<ExitCode, CliError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| CliError::OciState {
            reason: e.to_string(),
        })?;
    let s = state(&text)?;
    let rootfs = match &s.bundle {
        Some(b) if b.is_absolute() => rootfs(b)?.display().to_string(),
        _ => String::new(),
    };
    let request = |pid: u32| pb::EnrollContainerRequest {
        container_id: s.id.clone(),
        pid,
        annotations: s.annotations.clone(),
        rootfs: rootfs.clone(),
    };
    let Some(identity) = s.annotations.get(IDENTITY_ANNOTATION).cloned() else {
        // Not opted in: the agent is only asked whether the container is inside a principal
        // already (a pod enrolled by its sandbox's hook or the pod watch), so its exec rules
        // are resolved in its files. This never stops a container.
        if let Some(pid) = s.pid.filter(|p| *p > 0) {
            let asked = tokio::time::timeout(JOIN_TIMEOUT, async {
                let mut c = client::connect(&a.socket.socket).await?;
                c.enroll_container(request(pid))
                    .await
                    .map_err(CliError::agent)
            })
            .await;
            match asked {
                Ok(Ok(r)) if r.get_ref().enrolled => eprintln!(
                    "corral oci-hook: container {} joins principal {}",
                    s.id,
                    r.get_ref()
                        .principal
                        .as_ref()
                        .map_or("", |p| p.identity.as_str())
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => eprintln!("corral oci-hook: container {} not checked: {e}", s.id),
                Err(_) => eprintln!(
                    "corral oci-hook: container {} not checked: no answer in {JOIN_TIMEOUT:?}",
                    s.id
                ),
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    let pid = s.pid.filter(|p| *p > 0).ok_or_else(|| CliError::OciState {
        reason: format!(
            "container {} has no pid: run the hook as createRuntime or createContainer",
            s.id
        ),
    })?;
    let enrolled = async {
        let mut c = client::connect(&a.socket.socket).await?;
        c.enroll_container(request(pid))
            .await
            .map_err(CliError::agent)
    }
    .await;
    match enrolled {
        Ok(r) => {
            let r = r.into_inner();
            eprintln!(
                "corral oci-hook: container {} enrolled as {} (cgroup {})",
                s.id,
                r.principal.as_ref().map_or("", |p| p.identity.as_str()),
                r.cgroup_path
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if a.fail_open && unreachable(&e) => {
            let dir = fail_open_dir(&a.socket.socket);
            let path = dir.join(file_name(&s.id));
            let record = FailOpenRecord {
                container_id: s.id.clone(),
                pid,
                identity,
                reason: corral_runtime::error_chain(&e),
                time_unix_nano: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            };
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                std::fs::write(
                    &path,
                    serde_json::to_vec(&record).map_err(std::io::Error::other)?,
                )
            });
            written.map_err(|source| CliError::FailOpenRecord {
                path: path.clone(),
                source,
            })?;
            eprintln!(
                "corral oci-hook: WARNING: container {} starts UNPOLICED (--fail-open): {}",
                s.id, record.reason
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e),
    }
}

/// The agent is down (not a refusal): the only case `--fail-open` covers.
fn unreachable(e: &CliError) -> bool {
    match e {
        CliError::AgentUnreachable { .. } | CliError::AgentTimeout { .. } => true,
        CliError::Rpc { status, .. } => status.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oci_state_is_read_as_the_runtime_spec_writes_it() {
        let s = state(
            r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":42,"bundle":"/b",
                "annotations":{"corral.dev/identity":"spiffe://t/a"}}"#,
        )
        .expect("valid");
        assert_eq!((s.id.as_str(), s.pid), ("c1", Some(42)));
        assert_eq!(s.annotations[IDENTITY_ANNOTATION], "spiffe://t/a");
        assert_eq!(s.bundle.as_deref(), Some(std::path::Path::new("/b")));
        let bare = state(r#"{"ociVersion":"1.0.2","id":"c2","status":"creating"}"#).expect("ok");
        assert!(bare.annotations.is_empty() && bare.pid.is_none());
        assert!(state("{}").is_err());
        assert!(state(r#"{"id":""}"#).is_err());
    }

    #[test]
    fn the_rootfs_is_the_bundles_root_path() -> Result<(), CliError> {
        let dir = std::env::temp_dir().join(format!("corral-hook-rootfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| CliError::OciState {
            reason: e.to_string(),
        })?;
        let write = |text: &str| {
            std::fs::write(dir.join("config.json"), text).map_err(|e| CliError::OciState {
                reason: e.to_string(),
            })
        };
        write(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs","readonly":true}}"#)?;
        assert_eq!(rootfs(&dir)?, dir.join("rootfs"));
        write(r#"{"root":{"path":"/srv/c1/root"}}"#)?;
        assert_eq!(rootfs(&dir)?, std::path::Path::new("/srv/c1/root"));
        write("{}")?;
        assert!(rootfs(&dir).is_err(), "no root: the hook refuses");
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
