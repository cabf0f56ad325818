//! The watcher's view of the pods on this node: which are enrolled, which opted in and are not
//! (yet) enrolled and why. A pod that opted in and cannot be enrolled is always in
//! [`Tracker::unenrolled`] (and logged when it becomes a failure), never dropped silently.
//!
//! Enrolment is sticky: once a pod is enforced it stays enforced until it is deleted (taking
//! the opt-in annotation off a running pod does not release it; fail closed). Its identity is
//! fixed at enrolment: a changed `corral.dev/identity` is reported, and takes effect for a new
//! pod.
//!
//! The tracker decides; the caller performs: it passes a `locate` function (pod UID, QoS →
//! cgroup directory) and an `enrol` function (principal, cgroup → kernel index), and removes
//! the principals that [`Tracker::delete`] and [`Tracker::resync`] return.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Pod;
use tracing::{info, warn};

use super::{
    cgroup_path::{LocateError, QosClass},
    pods::{MappingConfig, PodDecision, PodPrincipal, map_pod},
};

/// How long an opted-in pod may wait for its cgroup (the kubelet creates it when it starts the
/// pod sandbox) before it counts as failed, by default (`--pod-cgroup-grace`).
pub const PENDING_GRACE: Duration = Duration::from_secs(30);

/// An enrolled pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub principal: PodPrincipal,
    pub cgroup: PathBuf,
}

/// An opted-in pod that is not enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unenrolled {
    pub namespace: String,
    pub name: String,
    /// Empty when the pod object has none.
    pub uid: String,
    pub reason: String,
    /// Past the grace period, or not a matter of waiting (bad identity, enrol error).
    pub failed: bool,
    /// When it was first seen opted in and not enrolled (the `now` passed to `apply`).
    pub since: Instant,
    /// The same moment on the wall clock, for reports.
    pub since_wall: SystemTime,
}

/// What one pod event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ignored,
    Enrolled,
    AlreadyEnrolled,
    Pending,
    Failed,
}

#[derive(Debug)]
pub struct Tracker {
    cfg: MappingConfig,
    grace: Duration,
    enrolled: BTreeMap<String, Enrolled>,
    unenrolled: BTreeMap<String, Unenrolled>,
}

fn pod_ref(pod: &Pod) -> (String, String, String) {
    let m = &pod.metadata;
    (
        m.uid.clone().unwrap_or_default(),
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

impl Tracker {
    pub fn new(cfg: MappingConfig) -> Self {
        Self {
            cfg,
            grace: PENDING_GRACE,
            enrolled: BTreeMap::new(),
            unenrolled: BTreeMap::new(),
        }
    }

    /// How long an opted-in pod may wait for its cgroup before it counts as failed
    /// (default [`PENDING_GRACE`]).
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn config(&self) -> &MappingConfig {
        &self.cfg
    }

    /// Enrolled pods by UID.
    pub fn enrolled(&self) -> &BTreeMap<String, Enrolled> {
        &self.enrolled
    }

    /// Opted-in pods that are not enrolled, by UID (the key is `namespace/name` when the pod
    /// has no UID).
    pub fn unenrolled(&self) -> &BTreeMap<String, Unenrolled> {
        &self.unenrolled
    }

    /// Pods that opted in and failed to enrol (past the grace period, or for good).
    pub fn failed(&self) -> usize {
        self.unenrolled.values().filter(|u| u.failed).count()
    }

    fn note(
        &mut self,
        key: String,
        (uid, namespace, name): (String, String, String),
        reason: String,
        permanent: bool,
        now: Instant,
    ) -> Outcome {
        let prev = self.unenrolled.get(&key);
        let (since, since_wall) =
            prev.map_or_else(|| (now, SystemTime::now()), |u| (u.since, u.since_wall));
        let failed = permanent || now.saturating_duration_since(since) >= self.grace;
        let was_failed = prev.is_some_and(|u| u.failed);
        if failed && !was_failed {
            warn!(
                namespace,
                pod = name,
                reason,
                "opted-in pod is NOT enforced"
            );
        }
        self.unenrolled.insert(
            key,
            Unenrolled {
                namespace,
                name,
                uid,
                reason,
                failed,
                since,
                since_wall,
            },
        );
        if failed {
            Outcome::Failed
        } else {
            Outcome::Pending
        }
    }

    /// A pod was added or changed (or listed at start): enrol it if it opted in.
    pub fn apply<L, E>(
        &mut self,
        pod: &Pod,
        namespace_labels: Option<&BTreeMap<String, String>>,
        now: Instant,
        locate: L,
        enrol: E,
    ) -> Outcome
    where
        L: FnOnce(&str, Option<QosClass>) -> Result<PathBuf, LocateError>,
        E: FnOnce(&PodPrincipal, &Path) -> Result<u32, String>,
    {
        let (uid, namespace, name) = pod_ref(pod);
        let key = if uid.is_empty() {
            format!("{namespace}/{name}")
        } else {
            uid.clone()
        };
        let decision = map_pod(&self.cfg, pod, namespace_labels);
        if let Some(e) = self.enrolled.get(&key) {
            if let PodDecision::Enrol(p) = &decision
                && p.identity != e.principal.identity
            {
                warn!(namespace, pod = name, enforced = %e.principal.identity, requested = %p.identity,
                      "pod identity changed: the enrolled identity stays until the pod is recreated");
            }
            return Outcome::AlreadyEnrolled;
        }
        match decision {
            PodDecision::NotOptedIn | PodDecision::OtherNode | PodDecision::Finished => {
                self.unenrolled.remove(&key);
                Outcome::Ignored
            }
            PodDecision::Reject(e) => {
                let reason = corral_runtime::error_chain(&e);
                self.note(key, (uid, namespace, name), reason, true, now)
            }
            PodDecision::Enrol(p) => {
                let cgroup = match locate(&p.session, p.qos) {
                    Ok(c) => c,
                    Err(e) => {
                        let reason = corral_runtime::error_chain(&e);
                        return self.note(key, (uid, namespace, name), reason, false, now);
                    }
                };
                match enrol(&p, &cgroup) {
                    Ok(index) => {
                        info!(namespace, pod = name, identity = %p.identity, index,
                              cgroup = %cgroup.display(), "pod enrolled");
                        self.unenrolled.remove(&key);
                        self.enrolled.insert(
                            key,
                            Enrolled {
                                principal: p,
                                cgroup,
                            },
                        );
                        Outcome::Enrolled
                    }
                    Err(reason) => self.note(key, (uid, namespace, name), reason, true, now),
                }
            }
        }
    }

    /// A pod was deleted: forget it; returns its principal for the caller to remove.
    pub fn delete(&mut self, pod: &Pod) -> Option<Enrolled> {
        let (uid, namespace, name) = pod_ref(pod);
        self.unenrolled.remove(&format!("{namespace}/{name}"));
        self.unenrolled.remove(&uid);
        self.enrolled.remove(&uid)
    }

    /// After a full list (start, or the watch restarted): forgets the pods that are gone and
    /// returns their principals. The caller then [`apply`](Self::apply)s every listed pod.
    pub fn resync(&mut self, listed: &[Pod]) -> Vec<Enrolled> {
        let present: BTreeSet<String> = listed
            .iter()
            .map(|p| {
                let (uid, ns, name) = pod_ref(p);
                if uid.is_empty() {
                    format!("{ns}/{name}")
                } else {
                    uid
                }
            })
            .collect();
        self.unenrolled.retain(|k, _| present.contains(k));
        let gone: Vec<String> = self
            .enrolled
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        gone.iter()
            .filter_map(|k| self.enrolled.remove(k))
            .collect()
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
