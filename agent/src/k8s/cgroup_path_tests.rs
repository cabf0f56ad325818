//! Fixtures follow the kubelet's naming (pkg/kubelet/cm: `kubepods`, QoS parents, `pod<uid>`,
//! systemd's `_` for `-`) and the runtimes' container cgroup names (containerd's
//! `cri-containerd-<id>.scope`, CRI-O's `crio-<id>.scope` and `crio-conmon-<id>.scope`,
//! cri-dockerd's `docker-<id>.scope`, containerd's bare id under cgroupfs).

use super::*;

const UID: &str = "8dc36b1a-4bd5-4f8e-9a0a-2d1b7e4c9f10";
const UID_: &str = "8dc36b1a_4bd5_4f8e_9a0a_2d1b7e4c9f10";
const CID: &str = "3f2b9c1d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";

fn container(runtime: Runtime) -> Option<ContainerCgroup> {
    Some(ContainerCgroup {
        runtime,
        id: CID.into(),
    })
}

#[track_caller]
fn check(
    path: &str,
    driver: Driver,
    qos: QosClass,
    pod_path: &str,
    container: Option<ContainerCgroup>,
) {
    let got = parse(path).unwrap_or_else(|| panic!("{path} not recognised"));
    assert_eq!(
        got,
        PodCgroup {
            driver,
            qos,
            pod_uid: UID.into(),
            pod_path: PathBuf::from(pod_path),
            container,
        },
        "{path}"
    );
}

#[test]
fn systemd_driver_every_qos_and_runtime() {
    let cases = [
        (
            QosClass::Guaranteed,
            format!("kubepods.slice/kubepods-pod{UID_}.slice"),
        ),
        (
            QosClass::Burstable,
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
        ),
        (
            QosClass::BestEffort,
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
        ),
    ];
    let runtimes = [
        ("cri-containerd", Runtime::Containerd),
        ("crio", Runtime::CriO),
        ("crio-conmon", Runtime::CriOConmon),
        ("docker", Runtime::Docker),
    ];
    for (qos, pod) in &cases {
        check(&format!("/{pod}"), Driver::Systemd, *qos, pod, None);
        for (prefix, rt) in runtimes {
            check(
                &format!("/{pod}/{prefix}-{CID}.scope"),
                Driver::Systemd,
                *qos,
                pod,
                container(rt),
            );
        }
        // A cgroup nested inside the container (systemd in a container) is still the pod's.
        check(
            &format!("/{pod}/cri-containerd-{CID}.scope/init.scope"),
            Driver::Systemd,
            *qos,
            pod,
            container(Runtime::Containerd),
        );
    }
}

#[test]
fn cgroupfs_driver_every_qos_and_runtime() {
    let cases = [
        (QosClass::Guaranteed, format!("kubepods/pod{UID}")),
        (QosClass::Burstable, format!("kubepods/burstable/pod{UID}")),
        (
            QosClass::BestEffort,
            format!("kubepods/besteffort/pod{UID}"),
        ),
    ];
    for (qos, pod) in &cases {
        check(&format!("/{pod}"), Driver::Cgroupfs, *qos, pod, None);
        check(
            &format!("/{pod}/{CID}"),
            Driver::Cgroupfs,
            *qos,
            pod,
            container(Runtime::Unnamed),
        );
        check(
            &format!("/{pod}/crio-{CID}"),
            Driver::Cgroupfs,
            *qos,
            pod,
            container(Runtime::CriO),
        );
        check(
            &format!("/{pod}/crio-conmon-{CID}"),
            Driver::Cgroupfs,
            *qos,
            pod,
            container(Runtime::CriOConmon),
        );
    }
}

#[test]
fn custom_cgroup_root_and_nested_kubelet() {
    // kind / `--cgroup-root=/kubelet` with the systemd driver.
    let pod = format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
    );
    check(
        &format!("/{pod}/cri-containerd-{CID}.scope"),
        Driver::Systemd,
        QosClass::BestEffort,
        &pod,
        container(Runtime::Containerd),
    );
    let pod = format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice");
    check(
        &format!("/{pod}"),
        Driver::Systemd,
        QosClass::Guaranteed,
        &pod,
        None,
    );
    // cgroupfs kubelet inside a docker container.
    let pod = format!("docker/{CID}/kubelet/kubepods/burstable/pod{UID}");
    check(
        &format!("/{pod}/{CID}"),
        Driver::Cgroupfs,
        QosClass::Burstable,
        &pod,
        container(Runtime::Unnamed),
    );
}

#[test]
fn static_pod_hash_uid() {
    // Static (mirror) pods get the 32-hex-digit config hash as their UID.
    let hash = "6b2bd5a5e9bd51b1c5f4d0cb4c9b2a1e";
    let got = parse(&format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice"
    ))
    .expect("parse");
    assert_eq!(got.pod_uid, hash);
    assert_eq!(got.qos, QosClass::Burstable);
}

#[test]
fn proc_cgroup_file() {
    let text = format!(
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope\n"
    );
    let got = parse_proc_cgroup(&text).expect("parse");
    assert_eq!(got.pod_uid, UID);
    assert_eq!(got.container, container(Runtime::CriO));
    // A cgroup v1 hybrid file: only the v2 line counts.
    assert_eq!(
        parse_proc_cgroup("12:pids:/kubepods/pod1234/abc\n0::/init.scope\n"),
        None
    );
}

#[test]
fn non_pod_paths_are_rejected() {
    for p in [
        "/",
        "/init.scope",
        "/system.slice/containerd.service",
        "/system.slice/kubelet.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/corral/abc-1",
        // QoS parent cgroups themselves are not pods.
        "/kubepods.slice",
        "/kubepods.slice/kubepods-burstable.slice",
        "/kubepods/burstable",
        // Slice that does not nest under its own prefix.
        &format!("/kubepods.slice/other-pod{UID_}.slice"),
        &format!("/kubepods.slice/kubepods-burstable-pod{UID_}.slice"),
        // `pod<uid>` outside a kubepods parent.
        &format!("/system.slice/pod{UID}"),
        &format!("/kubepods/other/pod{UID}"),
        // Not a UID.
        "/kubepods/podnot-a-uid",
        "/kubepods/pod",
    ] {
        assert_eq!(parse(p), None, "{p}");
    }
}

#[test]
fn container_names_that_are_not_containers() {
    let pod = format!("/kubepods/besteffort/pod{UID}");
    for child in ["short", "cri-containerd-xyz.scope", "crio-", "notes.txt"] {
        let got = parse(&format!("{pod}/{child}")).expect("pod");
        assert_eq!(got.container, None, "{child}");
    }
}

struct TempTree(PathBuf);

impl TempTree {
    fn new(name: &str, dirs: &[String]) -> Self {
        let root = std::env::temp_dir().join(format!(
            "corral-k8s-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        Self(root)
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn locates_pods_under_systemd_and_cgroupfs_roots() -> Result<(), LocateError> {
    let systemd = TempTree::new(
        "systemd",
        &[
            "system.slice/containerd.service".into(),
            "init.scope".into(),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            "kubepods.slice/kubepods-besteffort.slice".into(),
        ],
    );
    let roots = find_kubepods_roots(&systemd.0)?;
    assert_eq!(
        roots,
        vec![KubepodsRoot {
            driver: Driver::Systemd,
            path: systemd.0.join("kubepods.slice")
        }]
    );
    let want = systemd.0.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    ));
    assert_eq!(locate_pod(&roots, UID, Some(QosClass::Burstable))?, want);
    // Unknown or stale QoS: the other classes are tried.
    assert_eq!(locate_pod(&roots, UID, None)?, want);
    assert_eq!(locate_pod(&roots, UID, Some(QosClass::BestEffort))?, want);
    // What it finds, parse agrees with.
    let rel = want.strip_prefix(&systemd.0).expect("under root");
    assert_eq!(
        parse(rel.to_str().expect("utf-8")).map(|p| p.pod_uid),
        Some(UID.to_owned())
    );
    let other = "00000000-0000-0000-0000-000000000001";
    match locate_pod(&roots, other, Some(QosClass::Guaranteed)) {
        Err(LocateError::NotFound { uid, looked, .. }) => {
            assert_eq!(uid, other);
            assert_eq!(looked.len(), 3);
            assert!(looked[0].ends_with("kubepods-pod00000000_0000_0000_0000_000000000001.slice"));
        }
        r => panic!("expected NotFound, got {r:?}"),
    }

    let cgroupfs = TempTree::new(
        "cgroupfs",
        &[
            format!("kubelet/kubepods/pod{UID}/{CID}"),
            "kubelet/kubepods/burstable".into(),
            "system.slice".into(),
        ],
    );
    let roots = find_kubepods_roots(&cgroupfs.0)?;
    assert_eq!(
        roots,
        vec![KubepodsRoot {
            driver: Driver::Cgroupfs,
            path: cgroupfs.0.join("kubelet/kubepods")
        }]
    );
    assert_eq!(
        locate_pod(&roots, UID, Some(QosClass::Guaranteed))?,
        cgroupfs.0.join(format!("kubelet/kubepods/pod{UID}"))
    );
    Ok(())
}

#[test]
fn no_kubepods_root_is_empty_and_unreadable_root_is_an_error() {
    let empty = TempTree::new("empty", &["system.slice/x.service".into()]);
    assert_eq!(find_kubepods_roots(&empty.0).expect("read"), vec![]);
    assert!(matches!(
        find_kubepods_roots(&empty.0.join("missing")),
        Err(LocateError::Read { .. })
    ));
}

#[test]
fn pod_cgroups_finds_a_kubelet_that_started_later() {
    let tree = TempTree::new("later", &["system.slice".into()]);
    let mut pods = PodCgroups::new(&tree.0);
    assert!(matches!(
        pods.locate(UID, None),
        Err(LocateError::NoKubepods { .. })
    ));
    let pod = tree.0.join(format!("kubepods/besteffort/pod{UID}"));
    std::fs::create_dir_all(&pod).expect("mkdir");
    assert_eq!(
        pods.locate(UID, Some(QosClass::BestEffort)).expect("found"),
        pod
    );
    // Known roots are reused; a pod that is not there yet is NotFound, not NoKubepods.
    assert!(matches!(
        pods.locate("00000000-0000-0000-0000-000000000002", None),
        Err(LocateError::NotFound { .. })
    ));
}
