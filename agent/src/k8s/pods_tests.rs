//! Pod objects as the API server returns them (JSON fixtures), through [`map_pod`].

use super::*;

const SA: &str = include_str!("fixtures/pod-sa.json");
const ANNOTATED: &str = include_str!("fixtures/pod-annotated.json");
const PLAIN: &str = include_str!("fixtures/pod-plain.json");
const COMPLETED: &str = include_str!("fixtures/pod-completed.json");

fn cfg() -> MappingConfig {
    MappingConfig {
        trust_domain: "example.org".into(),
        node_name: "node-a".into(),
        mode: IdentityMode::ServiceAccount,
        annotation_scope: AnnotationScope::Namespace,
    }
}

fn pod(json: &str) -> Pod {
    serde_json::from_str(json).expect("pod fixture")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn annotate(p: &mut Pod, key: &str, value: &str) {
    p.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.into(), value.into());
}

#[test]
fn service_account_identity_and_pod_uid_session() {
    let got = map_pod(&cfg(), &pod(SA), None);
    assert_eq!(
        got,
        PodDecision::Enrol(PodPrincipal {
            identity: "spiffe://example.org/ns/agents/sa/research".into(),
            source: IdentitySource::ServiceAccount,
            session: "8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10".into(),
            namespace: "agents".into(),
            name: "research-agent-7d9f8b6c5-x2kqp".into(),
            qos: Some(QosClass::Burstable),
        })
    );
}

#[test]
fn namespace_mode_and_default_service_account() {
    let c = MappingConfig {
        mode: IdentityMode::Namespace,
        ..cfg()
    };
    let PodDecision::Enrol(p) = map_pod(&c, &pod(SA), None) else {
        panic!("not enrolled")
    };
    assert_eq!(p.identity, "spiffe://example.org/ns/agents");
    assert_eq!(p.source, IdentitySource::Namespace);

    // No serviceAccountName: the API server's default, `default`.
    let mut p = pod(SA);
    if let Some(s) = p.spec.as_mut() {
        s.service_account_name = None;
    }
    let PodDecision::Enrol(p) = map_pod(&cfg(), &p, None) else {
        panic!("not enrolled")
    };
    assert_eq!(p.identity, "spiffe://example.org/ns/agents/sa/default");
}

#[test]
fn annotation_overrides_the_identity() {
    let PodDecision::Enrol(p) = map_pod(&cfg(), &pod(ANNOTATED), None) else {
        panic!("not enrolled")
    };
    assert_eq!(p.identity, "spiffe://example.org/ns/agents/agent/coder");
    assert_eq!(p.source, IdentitySource::Annotation);
    assert_eq!(p.qos, Some(QosClass::Guaranteed));
    assert_eq!(p.session, "2b1f0c9e-8d7a-4c6b-b5a4-93827160f5e4");
}

#[test]
fn annotation_may_not_leave_its_namespace_unless_allowed() {
    let mut p = pod(ANNOTATED);
    annotate(
        &mut p,
        IDENTITY_ANNOTATION,
        "spiffe://example.org/ns/payments/sa/ledger",
    );
    assert_eq!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::IdentityScope {
            identity: "spiffe://example.org/ns/payments/sa/ledger".into(),
            allowed: "spiffe://example.org/ns/agents/...".into(),
        })
    );
    let wide = MappingConfig {
        annotation_scope: AnnotationScope::TrustDomain,
        ..cfg()
    };
    assert!(matches!(map_pod(&wide, &p, None), PodDecision::Enrol(e)
        if e.identity == "spiffe://example.org/ns/payments/sa/ledger"));
    // Another trust domain is never accepted.
    annotate(&mut p, IDENTITY_ANNOTATION, "spiffe://evil.org/ns/agents/x");
    for c in [cfg(), wide] {
        assert!(matches!(
            map_pod(&c, &p, None),
            PodDecision::Reject(MappingError::IdentityScope { .. })
        ));
    }
    // A namespace whose name extends the pod's is not the pod's namespace.
    annotate(
        &mut p,
        IDENTITY_ANNOTATION,
        "spiffe://example.org/ns/agents-other/x",
    );
    assert!(matches!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::IdentityScope { .. })
    ));
}

#[test]
fn invalid_annotation_identity_is_reported() {
    let mut p = pod(ANNOTATED);
    annotate(
        &mut p,
        IDENTITY_ANNOTATION,
        "spiffe://example.org/ns/agents/a b",
    );
    assert!(matches!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::Identity(IdentityError::Segment(_)))
    ));
    annotate(&mut p, IDENTITY_ANNOTATION, "https://example.org/x");
    assert!(matches!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::Identity(IdentityError::Scheme(_)))
    ));
}

#[test]
fn opt_in_by_namespace_label_or_pod_annotation_only() {
    let plain = pod(PLAIN);
    assert_eq!(map_pod(&cfg(), &plain, None), PodDecision::NotOptedIn);
    assert_eq!(
        map_pod(&cfg(), &plain, Some(&labels(&[("team", "web")]))),
        PodDecision::NotOptedIn
    );
    let ns_on = labels(&[(ENFORCE_KEY, "true")]);
    let PodDecision::Enrol(p) = map_pod(&cfg(), &plain, Some(&ns_on)) else {
        panic!("namespace label must opt in")
    };
    assert_eq!(p.identity, "spiffe://example.org/ns/default/sa/default");
    assert_eq!(p.qos, Some(QosClass::BestEffort));

    // A pod cannot opt out of its namespace's enforcement.
    let mut out = pod(PLAIN);
    annotate(&mut out, ENFORCE_KEY, "false");
    assert!(matches!(
        map_pod(&cfg(), &out, Some(&ns_on)),
        PodDecision::Enrol(_)
    ));
    assert_eq!(map_pod(&cfg(), &out, None), PodDecision::NotOptedIn);
    // A namespace label of "false" does not undo a pod's own opt-in.
    let ns_off = labels(&[(ENFORCE_KEY, "false")]);
    assert!(matches!(
        map_pod(&cfg(), &pod(SA), Some(&ns_off)),
        PodDecision::Enrol(_)
    ));
}

#[test]
fn malformed_opt_in_values_are_reported() {
    let mut p = pod(PLAIN);
    annotate(&mut p, ENFORCE_KEY, "yes");
    assert_eq!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::EnforceValue("yes".into()))
    );
    // Within an enforced namespace the pod's value does not matter.
    let ns_on = labels(&[(ENFORCE_KEY, "true")]);
    assert!(matches!(
        map_pod(&cfg(), &p, Some(&ns_on)),
        PodDecision::Enrol(_)
    ));
    let ns_bad = labels(&[(ENFORCE_KEY, "True")]);
    assert_eq!(
        map_pod(&cfg(), &pod(PLAIN), Some(&ns_bad)),
        PodDecision::Reject(MappingError::EnforceValue("True".into()))
    );
}

#[test]
fn other_nodes_unscheduled_and_finished_pods() {
    let other = MappingConfig {
        node_name: "node-b".into(),
        ..cfg()
    };
    assert_eq!(map_pod(&other, &pod(SA), None), PodDecision::OtherNode);
    let mut unscheduled = pod(SA);
    if let Some(s) = unscheduled.spec.as_mut() {
        s.node_name = None;
    }
    assert_eq!(map_pod(&cfg(), &unscheduled, None), PodDecision::OtherNode);
    assert_eq!(
        map_pod(&cfg(), &pod(COMPLETED), None),
        PodDecision::Finished
    );
}

#[test]
fn missing_or_bad_metadata_is_reported_not_skipped() {
    let mut p = pod(SA);
    p.metadata.uid = None;
    assert_eq!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::Missing("UID"))
    );
    let mut p = pod(SA);
    p.metadata.uid = Some("../../etc".into());
    assert_eq!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::Uid("../../etc".into()))
    );
    let mut p = pod(SA);
    if let Some(s) = p.spec.as_mut() {
        s.service_account_name = Some("bad:name".into());
    }
    assert!(matches!(
        map_pod(&cfg(), &p, None),
        PodDecision::Reject(MappingError::DefaultIdentity(..))
    ));
    // No QoS class yet: still enrolled; the cgroup is looked for under every class.
    let mut p = pod(SA);
    p.status = None;
    assert!(matches!(map_pod(&cfg(), &p, None), PodDecision::Enrol(e) if e.qos.is_none()));
}

#[test]
fn running_container_ids_drop_the_runtime_prefix_and_skip_the_rest() {
    let p: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "status": {
            "initContainerStatuses": [{"name": "i", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "containerID": "containerd://init1",
                "state": {"terminated": {"exitCode": 0}}}],
            "containerStatuses": [
                {"name": "a", "image": "x", "imageID": "", "ready": true, "restartCount": 0,
                 "containerID": "cri-o://abc", "state": {"running": {}}},
                {"name": "b", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ContainerCreating"}}}
            ],
            "ephemeralContainerStatuses": [{"name": "e", "image": "x", "imageID": "",
                "ready": false, "restartCount": 0, "containerID": "containerd://eph",
                "state": {"running": {}}}]
        }
    }))
    .expect("pod");
    assert_eq!(running_container_ids(&p), ["abc", "eph"]);
    assert!(running_container_ids(&pod(SA)).is_empty());
}
