use std::cell::RefCell;

use super::*;
use crate::k8s::{
    cgroup_path::PodCgroups,
    pods::{AnnotationScope, IdentityMode},
};

const SA: &str = include_str!("fixtures/pod-sa.json");
const ANNOTATED: &str = include_str!("fixtures/pod-annotated.json");
const PLAIN: &str = include_str!("fixtures/pod-plain.json");

fn pod(json: &str) -> Pod {
    serde_json::from_str(json).expect("pod fixture")
}

fn tracker() -> Tracker {
    Tracker::new(MappingConfig {
        trust_domain: "example.org".into(),
        node_name: "node-a".into(),
        mode: IdentityMode::ServiceAccount,
        annotation_scope: AnnotationScope::Namespace,
    })
}

/// A cgroup2-like tree (plain directories) with a systemd-driver kubepods hierarchy.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("corral-k8s-tracker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("kubepods.slice/kubepods-burstable.slice"))
            .expect("mkdir");
        Self(root)
    }

    fn add_pod(&self, rel: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    fn locate(&self) -> impl Fn(&str, Option<QosClass>) -> Result<PathBuf, LocateError> + '_ {
        move |uid, qos| PodCgroups::new(&self.0).locate(uid, qos)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SA_POD_CGROUP: &str = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8dc36b1a_4bd5_4f8e_9a0a_2d1b7e4c9f10.slice";

#[test]
fn pending_until_the_cgroup_exists_then_enrolled_once() {
    let tree = Tree::new("pending");
    let mut t = tracker();
    let calls = RefCell::new(Vec::new());
    let enrol = |p: &PodPrincipal, c: &Path| {
        calls
            .borrow_mut()
            .push((p.identity.clone(), c.to_path_buf()));
        Ok(7)
    };
    let t0 = Instant::now();
    let p = pod(SA);
    // The kubelet has not created the pod cgroup yet.
    assert_eq!(
        t.apply(&p, None, t0, tree.locate(), enrol),
        Outcome::Pending
    );
    assert!(calls.borrow().is_empty());
    let u = &t.unenrolled()["8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10"];
    assert!(!u.failed);
    assert!(u.reason.contains("no cgroup for pod"), "{}", u.reason);
    assert_eq!(t.failed(), 0);

    let cg = tree.add_pod(SA_POD_CGROUP);
    assert_eq!(
        t.apply(&p, None, t0 + Duration::from_secs(1), tree.locate(), enrol),
        Outcome::Enrolled
    );
    assert_eq!(
        *calls.borrow(),
        vec![(
            "spiffe://example.org/ns/agents/sa/research".to_owned(),
            cg.clone()
        )]
    );
    assert!(t.unenrolled().is_empty());
    assert_eq!(
        t.enrolled()["8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10"].cgroup,
        cg
    );
    // A later update of the same pod does not enrol it again.
    assert_eq!(
        t.apply(&p, None, t0, tree.locate(), enrol),
        Outcome::AlreadyEnrolled
    );
    assert_eq!(calls.borrow().len(), 1);
}

#[test]
fn a_pod_whose_cgroup_never_appears_becomes_a_reported_failure() {
    let tree = Tree::new("never");
    let mut t = tracker();
    let t0 = Instant::now();
    let p = pod(SA);
    let enrol = |_: &PodPrincipal, _: &Path| Ok(1);
    assert_eq!(
        t.apply(&p, None, t0, tree.locate(), enrol),
        Outcome::Pending
    );
    assert_eq!(
        t.apply(&p, None, t0 + PENDING_GRACE, tree.locate(), enrol),
        Outcome::Failed
    );
    assert_eq!(t.failed(), 1);
    let u = &t.unenrolled()["8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10"];
    assert_eq!(
        (u.namespace.as_str(), u.name.as_str()),
        ("agents", "research-agent-7d9f8b6c5-x2kqp")
    );
    assert_eq!(u.since, t0);
    assert_eq!(u.uid, "8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10");
}

#[test]
fn the_grace_period_is_configurable_and_since_is_kept() {
    let tree = Tree::new("grace");
    let mut t = tracker().with_grace(Duration::from_millis(500));
    let t0 = Instant::now();
    let p = pod(SA);
    let enrol = |_: &PodPrincipal, _: &Path| Ok(1);
    assert_eq!(
        t.apply(&p, None, t0, tree.locate(), enrol),
        Outcome::Pending
    );
    let wall = t.unenrolled()["8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10"].since_wall;
    assert_eq!(
        t.apply(
            &p,
            None,
            t0 + Duration::from_millis(499),
            tree.locate(),
            enrol
        ),
        Outcome::Pending
    );
    assert_eq!(
        t.apply(
            &p,
            None,
            t0 + Duration::from_millis(500),
            tree.locate(),
            enrol
        ),
        Outcome::Failed
    );
    let u = &t.unenrolled()["8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10"];
    assert_eq!(
        (u.since, u.since_wall),
        (t0, wall),
        "first seen, not last tried"
    );
    // Deleted: no longer reported.
    assert_eq!(t.delete(&p), None);
    assert!(t.unenrolled().is_empty());
}

#[test]
fn enrol_errors_and_invalid_identities_fail_at_once() {
    let tree = Tree::new("errors");
    tree.add_pod(SA_POD_CGROUP);
    let mut t = tracker();
    let now = Instant::now();
    assert_eq!(
        t.apply(&pod(SA), None, now, tree.locate(), |_, _| Err(
            "no free principal index".into()
        )),
        Outcome::Failed
    );
    let mut bad = pod(ANNOTATED);
    bad.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(
            "corral.dev/identity".into(),
            "spiffe://example.org/ns/kube-system/sa/admin".into(),
        );
    assert_eq!(
        t.apply(&bad, None, now, tree.locate(), |_, _| Ok(1)),
        Outcome::Failed
    );
    assert_eq!(t.failed(), 2);
    let reasons: Vec<&str> = t.unenrolled().values().map(|u| u.reason.as_str()).collect();
    assert!(reasons.contains(&"no free principal index"), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("outside `spiffe://example.org/ns/agents/...`")),
        "{reasons:?}"
    );
    // Deleting the pods clears their reports.
    assert_eq!(t.delete(&pod(SA)), None);
    assert_eq!(t.delete(&bad), None);
    assert!(t.unenrolled().is_empty());
}

#[test]
fn not_opted_in_pods_are_left_alone_and_enrolment_is_sticky() {
    let tree = Tree::new("sticky");
    tree.add_pod(SA_POD_CGROUP);
    let mut t = tracker();
    let now = Instant::now();
    let never = |_: &PodPrincipal, _: &Path| -> Result<u32, String> { panic!("must not enrol") };
    assert_eq!(
        t.apply(&pod(PLAIN), None, now, tree.locate(), never),
        Outcome::Ignored
    );
    assert_eq!(
        t.apply(&pod(SA), None, now, tree.locate(), |_, _| Ok(3)),
        Outcome::Enrolled
    );
    // The opt-in annotation is taken off the running pod: it stays enforced.
    let mut off = pod(SA);
    off.metadata.annotations = None;
    assert_eq!(
        t.apply(&off, None, now, tree.locate(), never),
        Outcome::AlreadyEnrolled
    );
    assert_eq!(t.enrolled().len(), 1);
    let gone = t.delete(&off).expect("was enrolled");
    assert_eq!(
        gone.principal.identity,
        "spiffe://example.org/ns/agents/sa/research"
    );
    assert!(t.enrolled().is_empty());
}

#[test]
fn resync_returns_the_pods_deleted_while_not_watching() {
    let tree = Tree::new("resync");
    tree.add_pod(SA_POD_CGROUP);
    let mut t = tracker();
    let now = Instant::now();
    assert_eq!(
        t.apply(&pod(SA), None, now, tree.locate(), |_, _| Ok(1)),
        Outcome::Enrolled
    );
    assert_eq!(
        t.apply(&pod(ANNOTATED), None, now, tree.locate(), |_, _| Ok(2)),
        Outcome::Pending
    );
    // Both still listed: nothing to remove.
    assert!(t.resync(&[pod(SA), pod(ANNOTATED)]).is_empty());
    assert_eq!(t.unenrolled().len(), 1);
    // Both gone.
    let gone = t.resync(&[pod(PLAIN)]);
    assert_eq!(gone.len(), 1);
    assert_eq!(
        gone[0].principal.session,
        "8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10"
    );
    assert!(t.enrolled().is_empty());
    assert!(t.unenrolled().is_empty());
}
