//! Pod → principal: which pods on this node are enforced, under which identity and session.
//!
//! - Identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>` (mode
//!   [`IdentityMode::ServiceAccount`], the default) or `spiffe://<trust-domain>/ns/<namespace>`
//!   ([`IdentityMode::Namespace`]); the pod annotation `corral.dev/identity` overrides either.
//!   The annotation is set by whoever can create pods in the namespace, so by default it may
//!   only name an identity in the agent's trust domain under that namespace
//!   (`spiffe://<td>/ns/<namespace>/...`): a tenant cannot claim another namespace's identity
//!   (and its policy). [`AnnotationScope::TrustDomain`] lifts the namespace restriction.
//! - Session: the pod UID (one principal per pod; a restarted container keeps it, a new pod
//!   gets a new one).
//! - Opt-in: the namespace label or the pod annotation `corral.dev/enforce: "true"`. A pod
//!   cannot opt out of its namespace's enforcement (`"false"` on the pod is ignored then):
//!   namespace labels are the namespace owner's decision.
//!
//! [`map_pod`] is the one function the watcher and the tests call.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::cgroup_path::QosClass;
use corral_policy::identity::{self, IdentityError};

/// Pod annotation naming the pod's identity.
pub const IDENTITY_ANNOTATION: &str = "corral.dev/identity";
/// Pod annotation or namespace label opting in.
pub const ENFORCE_KEY: &str = "corral.dev/enforce";

/// How a pod's default identity is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityMode {
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    #[default]
    ServiceAccount,
    /// `spiffe://<td>/ns/<namespace>`.
    Namespace,
}

/// Which identities the `corral.dev/identity` annotation may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnnotationScope {
    /// Only `spiffe://<td>/ns/<the pod's namespace>/...`.
    #[default]
    Namespace,
    /// Any identity in the agent's trust domain.
    TrustDomain,
}

/// The mapping settings (from the agent's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingConfig {
    pub trust_domain: String,
    /// This node's name (`spec.nodeName` of the pods it enforces).
    pub node_name: String,
    pub mode: IdentityMode,
    pub annotation_scope: AnnotationScope,
}

/// Where a principal's identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    Annotation,
    ServiceAccount,
    Namespace,
}

/// An enforced pod's principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPrincipal {
    pub identity: String,
    pub source: IdentitySource,
    /// The pod UID, also the session.
    pub session: String,
    pub namespace: String,
    pub name: String,
    /// From `status.qosClass`; absent on a pod seen before the API server set it.
    pub qos: Option<QosClass>,
}

/// Why an opted-in pod cannot be enrolled.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("pod has no {0}")]
    Missing(&'static str),
    #[error("pod UID `{0}` is not a valid session id")]
    Uid(String),
    #[error("`{ENFORCE_KEY}` is `{0}`: use \"true\" or \"false\"")]
    EnforceValue(String),
    #[error("annotation `{IDENTITY_ANNOTATION}`")]
    Identity(#[source] IdentityError),
    #[error("annotation `{IDENTITY_ANNOTATION}` names `{identity}`, outside `{allowed}`")]
    IdentityScope { identity: String, allowed: String },
    #[error("the default identity `{0}` is not a valid SPIFFE ID")]
    DefaultIdentity(String, #[source] IdentityError),
}

/// What to do with a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum PodDecision {
    /// Neither the pod nor its namespace opted in: not policed.
    NotOptedIn,
    /// Scheduled elsewhere (or not yet scheduled): not this agent's.
    OtherNode,
    /// Opted in, but finished (`Succeeded`/`Failed`): nothing runs in it any more.
    Finished,
    /// Enrol the pod's cgroup as this principal.
    Enrol(PodPrincipal),
    /// Opted in and cannot be enrolled: reported, never silently unpoliced.
    Reject(MappingError),
}

fn opted_in(value: Option<&String>) -> Result<bool, MappingError> {
    match value.map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(MappingError::EnforceValue(other.into())),
    }
}

/// Pod UIDs are UUIDs (static pods: a hex hash); they become session ids and path parts.
fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// Decides what to do with `pod`, given the labels of its namespace (`None` when the agent does
/// not read namespaces: then only the pod annotation opts in).
pub fn map_pod(
    cfg: &MappingConfig,
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> PodDecision {
    let meta = &pod.metadata;
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let ns_in = match opted_in(namespace_labels.and_then(|l| l.get(ENFORCE_KEY))) {
        Ok(v) => v,
        Err(e) => return PodDecision::Reject(e),
    };
    let pod_in = match opted_in(annotations.get(ENFORCE_KEY)) {
        Ok(v) => v,
        // A malformed value on a pod in an enforced namespace does not matter.
        Err(_) if ns_in => false,
        Err(e) => return PodDecision::Reject(e),
    };
    if !(ns_in || pod_in) {
        return PodDecision::NotOptedIn;
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.node_name.as_deref()) != Some(cfg.node_name.as_str()) {
        return PodDecision::OtherNode;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return PodDecision::Finished;
    }
    match principal(cfg, pod, annotations) {
        Ok(p) => PodDecision::Enrol(p),
        Err(e) => PodDecision::Reject(e),
    }
}

fn principal(
    cfg: &MappingConfig,
    pod: &Pod,
    annotations: &BTreeMap<String, String>,
) -> Result<PodPrincipal, MappingError> {
    let meta = &pod.metadata;
    let namespace = meta
        .namespace
        .clone()
        .ok_or(MappingError::Missing("namespace"))?;
    let name = meta.name.clone().ok_or(MappingError::Missing("name"))?;
    let uid = meta.uid.clone().ok_or(MappingError::Missing("UID"))?;
    if !valid_uid(&uid) {
        return Err(MappingError::Uid(uid));
    }
    let td = &cfg.trust_domain;
    let (identity, source) = match annotations.get(IDENTITY_ANNOTATION) {
        Some(id) => {
            identity::validate_id(id).map_err(MappingError::Identity)?;
            let allowed = match cfg.annotation_scope {
                AnnotationScope::Namespace => format!("spiffe://{td}/ns/{namespace}/"),
                AnnotationScope::TrustDomain => format!("spiffe://{td}/"),
            };
            if !id.starts_with(&allowed) {
                return Err(MappingError::IdentityScope {
                    identity: id.clone(),
                    allowed: format!("{allowed}..."),
                });
            }
            (id.clone(), IdentitySource::Annotation)
        }
        None => {
            let (id, source) = match cfg.mode {
                IdentityMode::ServiceAccount => {
                    let sa = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.as_deref())
                        .unwrap_or("default");
                    (
                        format!("spiffe://{td}/ns/{namespace}/sa/{sa}"),
                        IdentitySource::ServiceAccount,
                    )
                }
                IdentityMode::Namespace => (
                    format!("spiffe://{td}/ns/{namespace}"),
                    IdentitySource::Namespace,
                ),
            };
            identity::validate_id(&id).map_err(|e| MappingError::DefaultIdentity(id.clone(), e))?;
            (id, source)
        }
    };
    let qos = pod
        .status
        .as_ref()
        .and_then(|s| s.qos_class.as_deref())
        .and_then(QosClass::from_api);
    Ok(PodPrincipal {
        identity,
        source,
        session: uid,
        namespace,
        name,
        qos,
    })
}

#[cfg(test)]
#[path = "pods_tests.rs"]
mod tests;

/// The runtime ids of the pod's running containers (init, regular and ephemeral), from
/// `status.*containerStatuses[].containerID` (`containerd://<id>`, `cri-o://<id>`): the ids
/// the runtime gave its OCI hook as the container id.
pub fn running_container_ids(pod: &Pod) -> Vec<String> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let all = [
        &status.init_container_statuses,
        &status.container_statuses,
        &status.ephemeral_container_statuses,
    ];
    all.into_iter()
        .flatten()
        .flatten()
        .filter(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        .filter_map(|c| c.container_id.as_deref())
        .map(|id| id.split_once("://").map_or(id, |(_, id)| id).to_owned())
        .filter(|id| !id.is_empty())
        .collect()
}
