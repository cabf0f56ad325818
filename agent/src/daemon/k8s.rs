//! `--kubernetes`: enrol the pods on this node that opt in, as they come and go.
//!
//! Two watches (kube-rs): pods with `spec.nodeName=<this node>` and, with namespace opt-in,
//! namespaces (for the `corral.dev/enforce` label). Every pod goes through
//! [`crate::k8s::tracker::Tracker::apply`] (→ [`crate::k8s::pods::map_pod`]); its cgroup is
//! found with [`crate::k8s::cgroup_path::PodCgroups`] and enrolled as an external principal
//! ([`super::registry::Registry::enroll_cgroup`]). A deleted pod's principal is removed; after
//! a (re)list, principals of pods that are gone are removed. Opted-in pods that are not
//! enrolled yet are retried every [`RETRY`]; those that fail are logged at warn level by the
//! tracker. Every opted-in pod that is not enrolled (waiting for its cgroup, or failed) is
//! published in [`PodReport`] (→ `corral status`, the `corral_k8s_pods_not_enrolled` gauge)
//! until it is enrolled or deleted.
//!
//! Readiness: [`run`] signals `ready` once both watches have listed and every listed pod has
//! been applied; the daemon serves its local API (the readiness probe) only after that.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use corral_runtime::shutdown::ShutdownSignal;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::oneshot;
use tokio_stream::StreamExt as _;
use tracing::{error, info, warn};

use super::Shared;
use crate::k8s::{
    cgroup_path::PodCgroups,
    pods::{AnnotationScope, IdentityMode, MappingConfig, PodPrincipal},
    tracker::{Enrolled, PENDING_GRACE, Tracker, Unenrolled},
};

/// How often opted-in pods that are not enrolled are tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// The `--kubernetes` flags (flattened into the daemon's config).
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct K8sArgs {
    /// Kubernetes: watch the pods on this node (`--node-name`, e.g. from the downward API) and
    /// enrol those that opt in (`corral.dev/enforce: "true"` on the pod, or as a namespace label).
    #[arg(long, env = "CORRAL_KUBERNETES", requires = "trust_domain")]
    pub kubernetes: bool,

    /// SPIFFE trust domain of pod identities (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "CORRAL_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,

    /// Default pod identity: from the service account or the namespace alone.
    #[arg(
        long,
        env = "CORRAL_IDENTITY_MODE",
        value_enum,
        default_value = "service-account"
    )]
    pub identity_mode: IdentityMode,

    /// Which identities the `corral.dev/identity` pod annotation may name.
    #[arg(
        long,
        env = "CORRAL_ANNOTATION_SCOPE",
        value_enum,
        default_value = "namespace"
    )]
    pub annotation_scope: AnnotationScope,

    /// Honour the `corral.dev/enforce` namespace label (watches namespaces).
    #[arg(long, env = "CORRAL_NAMESPACE_OPT_IN", default_value_t = true, action = clap::ArgAction::Set)]
    pub namespace_opt_in: bool,

    /// Seconds an opted-in pod may wait for its cgroup (created by the kubelet when the pod
    /// sandbox starts) before it is reported as failed rather than pending (it is listed as not
    /// enrolled either way).
    #[arg(long, env = "CORRAL_POD_CGROUP_GRACE_SECS", default_value_t = PENDING_GRACE.as_secs())]
    pub pod_cgroup_grace_secs: u64,
}

/// Opted-in pods on this node that are not enrolled (their processes are not policed), as the
/// watcher last published them; empty without `--kubernetes`.
#[derive(Debug, Default)]
pub struct PodReport {
    unenrolled: Mutex<Vec<Unenrolled>>,
}

impl PodReport {
    /// Sorted by namespace and name.
    pub fn unenrolled(&self) -> Vec<Unenrolled> {
        self.unenrolled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// (pending, failed).
    pub fn counts(&self) -> (usize, usize) {
        let u = self
            .unenrolled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let failed = u.iter().filter(|p| p.failed).count();
        (u.len() - failed, failed)
    }

    fn publish(&self, tracker: &Tracker) {
        let mut now: Vec<Unenrolled> = tracker.unenrolled().values().cloned().collect();
        now.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        *self
            .unenrolled
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = now;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("--trust-domain `{0}` is not a valid SPIFFE trust domain")]
    TrustDomain(String),
}

impl K8sArgs {
    /// The mapping settings, when `--kubernetes` is on.
    pub fn mapping(&self, node: &str) -> Result<Option<MappingConfig>, K8sError> {
        if !self.kubernetes {
            return Ok(None);
        }
        let td = self.trust_domain.clone().unwrap_or_default();
        if corral_policy::identity::validate_id(&format!("spiffe://{td}")).is_err() || td.is_empty()
        {
            return Err(K8sError::TrustDomain(td));
        }
        Ok(Some(MappingConfig {
            trust_domain: td,
            node_name: node.into(),
            mode: self.identity_mode,
            annotation_scope: self.annotation_scope,
        }))
    }
}

struct Watch {
    shared: Arc<Shared>,
    tracker: Tracker,
    cgroups: PodCgroups,
    namespace_opt_in: bool,
    /// Last seen state of every pod on this node, by UID.
    pods: BTreeMap<String, Pod>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Containers reported as missed by the OCI hook, by pod UID (each reported once).
    missed: BTreeMap<String, std::collections::BTreeSet<String>>,
}

impl Watch {
    fn labels(&self, pod: &Pod) -> Option<&BTreeMap<String, String>> {
        if !self.namespace_opt_in {
            return None;
        }
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        let ns = pod.metadata.namespace.as_deref().unwrap_or("");
        Some(self.namespaces.get(ns).unwrap_or(&EMPTY))
    }

    fn apply(&mut self, pod: &Pod) {
        let labels = self.labels(pod).cloned();
        let shared = self.shared.clone();
        let cgroups = &mut self.cgroups;
        self.tracker.apply(
            pod,
            labels.as_ref(),
            Instant::now(),
            |uid, qos| cgroups.locate(uid, qos),
            |p: &PodPrincipal, cgroup: &Path| {
                let mut enf = shared.enforcer();
                let slot = shared
                    .policy_state()
                    .current()
                    .and_then(|g| g.compiled.policy_for(&p.identity));
                shared
                    .registry
                    .enroll_cgroup(&p.identity, &p.session, cgroup, slot, enf.maps())
                    .map(|r| r.index)
                    .map_err(|e| corral_runtime::error_chain(&e))
            },
        );
    }

    /// The running containers of an enrolled pod that no OCI hook enrolled (their ids are not
    /// among those the hook recorded): they ran before the pod was enrolled, and their exec
    /// rules are resolved in the agent's view only. Counted, logged and published once each.
    fn report_missed(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        let Some(enrolled) = self.tracker.enrolled().get(uid) else {
            return;
        };
        let running = crate::k8s::pods::running_container_ids(pod);
        if running.is_empty() {
            return;
        }
        let hooked = self.shared.container_views.container_ids();
        let principal = self
            .shared
            .registry
            .principal_containing(&enrolled.cgroup)
            .map(|r| r.to_pb());
        let seen = self.missed.entry(uid.to_owned()).or_default();
        for id in running {
            if hooked.contains(&id) || !seen.insert(id.clone()) {
                continue;
            }
            self.shared
                .containers
                .missed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(namespace = %enrolled.principal.namespace, pod = %enrolled.principal.name, container = %id, "a container of an enrolled pod was not enrolled by the OCI hook: it ran unpoliced until the pod watch enrolled the pod");
            self.shared.publish_container(
                corral_proto::v1::ContainerChange {
                    container_id: id,
                    action: "missed".into(),
                    pid: 0,
                    cgroup_path: enrolled.cgroup.display().to_string(),
                    reason: "no OCI hook enrolled it (hook not installed, agent down with \
                             --fail-open, or the runtime passed no corral.dev/identity to the \
                             pod's sandbox): policed from the pod watch's enrolment on, exec \
                             rules resolved in the agent's view"
                        .into(),
                },
                principal.clone(),
                crate::clock::unix_now_ns(),
            );
        }
    }

    fn remove(&self, gone: Enrolled) {
        let mut enf = self.shared.enforcer();
        self.shared.registry.remove_cgroup(&gone.cgroup, enf.maps());
        info!(namespace = %gone.principal.namespace, pod = %gone.principal.name, "pod gone: principal removed");
    }

    fn pod_seen(&mut self, pod: Pod) {
        self.apply(&pod);
        self.report_missed(&pod);
        if let Some(uid) = pod.metadata.uid.clone() {
            self.pods.insert(uid, pod);
        }
    }

    fn pod_deleted(&mut self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            self.pods.remove(uid);
            self.missed.remove(uid);
        }
        if let Some(gone) = self.tracker.delete(pod) {
            self.remove(gone);
        }
    }

    /// After a full list: remove the principals of pods that are gone, apply the listed ones.
    fn pods_listed(&mut self, listed: Vec<Pod>) {
        for gone in self.tracker.resync(&listed) {
            self.remove(gone);
        }
        self.pods.clear();
        let uids: std::collections::BTreeSet<&str> = listed
            .iter()
            .filter_map(|p| p.metadata.uid.as_deref())
            .collect();
        self.missed.retain(|uid, _| uids.contains(uid.as_str()));
        for p in listed {
            self.pod_seen(p);
        }
    }

    /// Tries the opted-in pods that are not enrolled again.
    fn retry(&mut self) {
        let waiting: Vec<Pod> = self
            .tracker
            .unenrolled()
            .keys()
            .filter_map(|uid| self.pods.get(uid).cloned())
            .collect();
        for p in waiting {
            self.apply(&p);
            self.report_missed(&p);
        }
    }

    /// A namespace's labels changed: its pods are decided again.
    fn namespace_seen(&mut self, ns: &Namespace) {
        let Some(name) = ns.metadata.name.clone() else {
            return;
        };
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        if self.namespaces.get(&name) == Some(&labels) {
            return;
        }
        self.namespaces.insert(name.clone(), labels);
        let pods: Vec<Pod> = self
            .pods
            .values()
            .filter(|p| p.metadata.namespace.as_deref() == Some(name.as_str()))
            .cloned()
            .collect();
        for p in pods {
            self.apply(&p);
        }
    }
}

/// Watches until shutdown. `ready` is sent after the first complete sync.
pub async fn run(
    shared: Arc<Shared>,
    mapping: MappingConfig,
    namespace_opt_in: bool,
    ready: oneshot::Sender<()>,
    mut stop: ShutdownSignal,
) {
    let grace = Duration::from_secs(shared.resolved.config.k8s.pod_cgroup_grace_secs);
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                error!(error = %corral_runtime::error_chain(&e), "connect to the Kubernetes API; retrying in 5 s");
                tokio::select! {
                    _ = stop.wait() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    let node = mapping.node_name.clone();
    let mut w = Watch {
        cgroups: PodCgroups::new(&shared.resolved.cgroup_root),
        shared,
        tracker: Tracker::new(mapping).with_grace(grace),
        namespace_opt_in,
        pods: BTreeMap::new(),
        namespaces: BTreeMap::new(),
        missed: BTreeMap::new(),
    };
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff();
    tokio::pin!(pods);
    let namespaces =
        watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    tokio::pin!(namespaces);
    let mut ready = Some(ready);
    let mut pods_done = false;
    let mut ns_done = !namespace_opt_in;
    let mut listing: Vec<Pod> = Vec::new();
    let mut ns_listing: Vec<Namespace> = Vec::new();
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(node, "watching the pods on this node");
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = retry.tick(), if pods_done && ns_done => w.retry(),
            ev = namespaces.next(), if namespace_opt_in => match ev {
                Some(Ok(watcher::Event::Init)) => ns_listing.clear(),
                Some(Ok(watcher::Event::InitApply(ns))) => ns_listing.push(ns),
                Some(Ok(watcher::Event::InitDone)) => {
                    w.namespaces.clear();
                    for ns in ns_listing.drain(..) {
                        w.namespace_seen(&ns);
                    }
                    ns_done = true;
                    if pods_done {
                        // Pods applied before the namespaces were known: decide them again.
                        let all: Vec<Pod> = w.pods.values().cloned().collect();
                        for p in &all {
                            w.apply(p);
                        }
                    }
                }
                Some(Ok(watcher::Event::Apply(ns))) => w.namespace_seen(&ns),
                Some(Ok(watcher::Event::Delete(ns))) => {
                    if let Some(n) = &ns.metadata.name {
                        w.namespaces.remove(n);
                    }
                }
                Some(Err(e)) => warn!(error = %corral_runtime::error_chain(&e), "namespace watch"),
                None => return,
            },
            ev = pods.next() => match ev {
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(p))) => listing.push(p),
                Some(Ok(watcher::Event::InitDone)) => {
                    w.pods_listed(std::mem::take(&mut listing));
                    pods_done = true;
                }
                Some(Ok(watcher::Event::Apply(p))) => w.pod_seen(p),
                Some(Ok(watcher::Event::Delete(p))) => w.pod_deleted(&p),
                Some(Err(e)) => warn!(error = %corral_runtime::error_chain(&e), "pod watch"),
                None => return,
            },
        }
        w.shared.k8s_pods.publish(&w.tracker);
        if pods_done
            && ns_done
            && let Some(tx) = ready.take()
        {
            info!(
                enrolled = w.tracker.enrolled().len(),
                not_enrolled = w.tracker.unenrolled().len(),
                failed = w.tracker.failed(),
                "pods on this node synced"
            );
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        k8s: K8sArgs,
    }

    #[test]
    fn flags_and_trust_domain() {
        let c = Cli::try_parse_from(["x"]).expect("parse");
        assert_eq!(c.k8s.mapping("n").expect("off"), None);
        assert!(c.k8s.namespace_opt_in);
        assert_eq!(c.k8s.pod_cgroup_grace_secs, 30);
        assert!(
            Cli::try_parse_from(["x", "--kubernetes"]).is_err(),
            "needs a trust domain"
        );
        let c = Cli::try_parse_from([
            "x",
            "--kubernetes",
            "--trust-domain",
            "prod.example.org",
            "--identity-mode",
            "namespace",
            "--annotation-scope",
            "trust-domain",
            "--namespace-opt-in",
            "false",
            "--pod-cgroup-grace-secs",
            "1",
        ])
        .expect("parse");
        assert_eq!(
            c.k8s.mapping("node-a").expect("valid"),
            Some(MappingConfig {
                trust_domain: "prod.example.org".into(),
                node_name: "node-a".into(),
                mode: IdentityMode::Namespace,
                annotation_scope: AnnotationScope::TrustDomain,
            })
        );
        assert!(!c.k8s.namespace_opt_in);
        assert_eq!(c.k8s.pod_cgroup_grace_secs, 1);
        let bad = Cli::try_parse_from(["x", "--kubernetes", "--trust-domain", "Bad/Domain"])
            .expect("parse");
        assert!(matches!(
            bad.k8s.mapping("n"),
            Err(K8sError::TrustDomain(_))
        ));
    }
}
