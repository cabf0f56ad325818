//! Containers enrolled synchronously by the OCI hook (`corral oci-hook`, run by the runtime as
//! a createRuntime hook while the container's init process waits for `start`):
//! - [`who`]: the identity and session a container's OCI annotations give, if it opted in;
//! - [`cgroup_to_enrol`]: the pod's cgroup on Kubernetes (so every container of the pod, and
//!   the pod watch, share one principal), else the container's own, read from its init
//!   process while a pidfd proves that process is still the one the runtime named;
//! - [`take_fail_open`]: the records a hook left when it let a container start unpoliced.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use corral_policy::identity;
use corral_runtime::oci::{
    FailOpenRecord, IDENTITY_ANNOTATION, POD_NAMESPACE_ANNOTATIONS, POD_UID_ANNOTATIONS,
    SESSION_ANNOTATION,
};
use tracing::warn;

use super::peer::{pidfd_alive as alive, pidfd_open};
use crate::k8s::pods::{AnnotationScope, MappingConfig};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("annotation {IDENTITY_ANNOTATION} `{0}` is not a valid SPIFFE ID")]
    Identity(String),
    #[error(
        "annotation {IDENTITY_ANNOTATION} `{identity}` is outside what pods of namespace \
         `{namespace}` may claim (`{allowed}...`)"
    )]
    Scope {
        identity: String,
        namespace: String,
        allowed: String,
    },
    #[error("no usable session id: `{0}` (1 to 64 letters, digits, `-`, `_` or `.`)")]
    Session(String),
    #[error("container pid {0} is not a process (exited, or never was)")]
    NoProcess(i32),
    #[error("the cgroup of container pid {pid} cannot be read: {reason}")]
    Cgroup { pid: i32, reason: String },
    #[error("the files of container pid {pid} cannot be read to resolve its exec rules: {reason}")]
    Files { pid: i32, reason: String },
    #[error("write the container's exec rules into the kernel maps: {0}")]
    ExecMaps(String),
}

/// Containers the OCI hook enrolled, and those a hook let start unpoliced (status, metrics).
#[derive(Debug, Default)]
pub struct Tally {
    pub enrolled: std::sync::atomic::AtomicU64,
    pub failed_open: std::sync::atomic::AtomicU64,
    /// Running containers of enrolled pods no hook enrolled (reported by the pod watch).
    pub missed: std::sync::atomic::AtomicU64,
}

/// Who a container is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub identity: String,
    pub session: String,
    /// Kubernetes: the pod's uid (its cgroup is the one enrolled).
    pub pod_uid: Option<String>,
}

fn first<'a>(a: &'a HashMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| a.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The identity and session of a container from its OCI annotations; `None` if it did not
/// opt in (no `corral.dev/identity`). On a Kubernetes node (`mapping`), an identity claimed by
/// a pod must lie in its namespace (as for the pod watch's annotation rule), and the session is
/// the pod uid, so the hook and the pod watch enrol the same principal.
pub fn who(
    container_id: &str,
    annotations: &HashMap<String, String>,
    mapping: Option<&MappingConfig>,
) -> Result<Option<Who>, ContainerError> {
    let Some(id) = first(annotations, &[IDENTITY_ANNOTATION]) else {
        return Ok(None);
    };
    identity::validate_id(id).map_err(|_| ContainerError::Identity(id.to_owned()))?;
    if let (Some(m), Some(ns)) = (mapping, first(annotations, &POD_NAMESPACE_ANNOTATIONS)) {
        let td = &m.trust_domain;
        let allowed = match m.annotation_scope {
            AnnotationScope::Namespace => format!("spiffe://{td}/ns/{ns}/"),
            AnnotationScope::TrustDomain => format!("spiffe://{td}/"),
        };
        if !id.starts_with(&allowed) {
            return Err(ContainerError::Scope {
                identity: id.to_owned(),
                namespace: ns.to_owned(),
                allowed,
            });
        }
    }
    let pod_uid = first(annotations, &POD_UID_ANNOTATIONS).map(str::to_owned);
    let session = pod_uid
        .clone()
        .or_else(|| first(annotations, &[SESSION_ANNOTATION]).map(str::to_owned))
        .unwrap_or_else(|| container_id.to_owned());
    if !super::registry::valid_session(&session) {
        return Err(ContainerError::Session(session));
    }
    Ok(Some(Who {
        identity: id.to_owned(),
        session,
        pod_uid,
    }))
}

/// The cgroup to enrol for the container whose init process is `pid`: the ancestor named
/// after the pod uid (`pod<uid>`, with `-` or `_`) when there is one, else the process's own
/// cgroup. The process must be alive after its cgroup was read (its pidfd, opened first, says
/// so): a pid reused in between is never enrolled in its place.
pub fn cgroup_to_enrol(
    root: &Path,
    pid: i32,
    pod_uid: Option<&str>,
) -> Result<PathBuf, ContainerError> {
    let pidfd = pidfd_open(pid).ok_or(ContainerError::NoProcess(pid))?;
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| ContainerError::Cgroup {
            pid,
            reason: e.to_string(),
        })
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|rel| root.join(rel.trim().trim_start_matches('/')))
                .ok_or_else(|| ContainerError::Cgroup {
                    pid,
                    reason: "no cgroup v2 entry".into(),
                })
        })?;
    if !alive(&pidfd) {
        return Err(ContainerError::NoProcess(pid));
    }
    Ok(pod_uid
        .and_then(|uid| pod_ancestor(&own, root, uid))
        .unwrap_or(own))
}

/// The nearest ancestor of `cgroup` (below `root`) whose name holds the pod uid.
fn pod_ancestor(cgroup: &Path, root: &Path, uid: &str) -> Option<PathBuf> {
    let (dash, under) = (uid.to_owned(), uid.replace('-', "_"));
    cgroup
        .ancestors()
        .take_while(|p| p.starts_with(root) && *p != root)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("pod") && (n.contains(&dash) || n.contains(&under)))
        })
        .map(Path::to_path_buf)
}

/// Reads and removes the fail-open records in `dir` (unreadable ones are removed and logged).
pub fn take_fail_open(dir: &Path) -> Vec<FailOpenRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<FailOpenRecord>(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => out.push(r),
            Err(err) => warn!(path = %path.display(), error = %err, "unreadable fail-open record"),
        }
        if let Err(err) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %err, "cannot remove a fail-open record");
        }
    }
    out.sort_by_key(|r| r.time_unix_nano);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn k8s() -> MappingConfig {
        MappingConfig {
            trust_domain: "c.test".into(),
            node_name: "n".into(),
            mode: crate::k8s::pods::IdentityMode::ServiceAccount,
            annotation_scope: AnnotationScope::Namespace,
        }
    }

    #[test]
    fn only_annotated_containers_opt_in_and_sessions_follow_the_pod() {
        assert_eq!(who("c1", &ann(&[]), None).expect("ok"), None);
        let w = who("c1", &ann(&[(IDENTITY_ANNOTATION, "spiffe://t/a")]), None)
            .expect("ok")
            .expect("opted in");
        assert_eq!(
            (w.identity.as_str(), w.session.as_str()),
            ("spiffe://t/a", "c1")
        );
        let w = who(
            "c1",
            &ann(&[
                (IDENTITY_ANNOTATION, "spiffe://t/a"),
                (SESSION_ANNOTATION, "run-7"),
            ]),
            None,
        )
        .expect("ok")
        .expect("opted in");
        assert_eq!(w.session, "run-7");
        let pod = ann(&[
            (IDENTITY_ANNOTATION, "spiffe://c.test/ns/shop/agent"),
            ("io.kubernetes.cri.sandbox-namespace", "shop"),
            ("io.kubernetes.cri.sandbox-uid", "1b2c-3d"),
        ]);
        let w = who("c1", &pod, Some(&k8s()))
            .expect("ok")
            .expect("opted in");
        assert_eq!(
            (w.session.as_str(), w.pod_uid.as_deref()),
            ("1b2c-3d", Some("1b2c-3d"))
        );
    }

    #[test]
    fn bad_or_foreign_identities_are_refused() {
        assert!(matches!(
            who("c1", &ann(&[(IDENTITY_ANNOTATION, "not-spiffe")]), None),
            Err(ContainerError::Identity(_))
        ));
        let other_ns = ann(&[
            (IDENTITY_ANNOTATION, "spiffe://c.test/ns/bank/agent"),
            ("io.kubernetes.pod.namespace", "shop"),
        ]);
        assert!(matches!(
            who("c1", &other_ns, Some(&k8s())),
            Err(ContainerError::Scope { .. })
        ));
        assert!(matches!(
            who(
                "bad/id",
                &ann(&[(IDENTITY_ANNOTATION, "spiffe://t/a")]),
                None
            ),
            Err(ContainerError::Session(_))
        ));
    }

    #[test]
    fn the_pod_cgroup_is_the_ancestor_named_after_the_pod_uid() {
        let root = Path::new("/sys/fs/cgroup");
        let c = root.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c_3d.slice/cri-containerd-abc.scope");
        assert_eq!(
            pod_ancestor(&c, root, "1b2c-3d"),
            Some(root.join(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c_3d.slice"
            ))
        );
        let c = root.join("kubepods/besteffort/pod1b2c-3d/abc");
        assert_eq!(
            pod_ancestor(&c, root, "1b2c-3d"),
            Some(root.join("kubepods/besteffort/pod1b2c-3d"))
        );
        assert_eq!(pod_ancestor(&root.join("other/abc"), root, "1b2c-3d"), None);
    }

    #[test]
    fn a_pid_that_is_no_process_is_refused() {
        assert!(matches!(
            cgroup_to_enrol(Path::new("/sys/fs/cgroup"), -1, None),
            Err(ContainerError::NoProcess(-1))
        ));
        let me = i32::try_from(std::process::id()).expect("pid");
        let cg = cgroup_to_enrol(Path::new("/sys/fs/cgroup"), me, None).expect("own cgroup");
        assert!(cg.starts_with("/sys/fs/cgroup"), "{}", cg.display());
    }
}
