//! Pod and container cgroups as the kubelet and the container runtimes lay them out on cgroup v2.
//!
//! The kubelet creates one cgroup per pod under a QoS-class parent, named by its cgroup driver:
//!
//! | driver | QoS | pod cgroup (relative to the cgroup2 root) |
//! | --- | --- | --- |
//! | systemd | Guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice` |
//! | systemd | Burstable | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//! | systemd | BestEffort | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` |
//! | cgroupfs | Guaranteed | `kubepods/pod<uid>` |
//! | cgroupfs | Burstable | `kubepods/burstable/pod<uid>` |
//! | cgroupfs | BestEffort | `kubepods/besteffort/pod<uid>` |
//!
//! (`<uid_>`: systemd unit names cannot hold `-` inside a slice level, so the kubelet writes the
//! pod UID's dashes as `_`.) With `--cgroup-root=/kubelet` (kind, nested kubelets) the
//! `kubepods` root moves down one level (`kubelet.slice/kubelet-kubepods.slice/...`,
//! `kubelet/kubepods/...`). Each container has a cgroup below its pod's: with the systemd
//! driver a scope named by the runtime (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `crio-conmon-<id>.scope` for CRI-O's monitor, `docker-<id>.scope` with cri-dockerd); with
//! cgroupfs the bare id (containerd) or `crio-<id>` (CRI-O).
//!
//! Corral enrols the pod cgroup, so every container of the pod, started now or later, is
//! attributed through the kernel's ancestor walk.

use std::path::{Path, PathBuf};

/// The pod's QoS class (`status.qosClass`), which picks its parent cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// From the API's `status.qosClass` value.
    pub fn from_api(s: &str) -> Option<Self> {
        match s {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The QoS level's cgroup name (none for Guaranteed, whose pods sit at the root).
    fn dir(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }

    const ALL: [Self; 3] = [Self::Guaranteed, Self::Burstable, Self::BestEffort];
}

/// The kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// Which runtime made a container cgroup, as far as its name tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope` / `crio-<id>`.
    CriO,
    /// `crio-conmon-<id>.scope`: CRI-O's per-container monitor process, not the container.
    CriOConmon,
    /// `docker-<id>.scope` (cri-dockerd).
    Docker,
    /// A bare id (containerd with the cgroupfs driver): the name does not say.
    Unnamed,
}

/// A container cgroup below a pod cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroup {
    pub runtime: Runtime,
    /// The runtime's container id (hex).
    pub id: String,
}

/// What a cgroup path says about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    pub driver: Driver,
    pub qos: QosClass,
    /// The pod UID with its dashes (as in `metadata.uid`).
    pub pod_uid: String,
    /// The pod cgroup, relative to the cgroup2 root (no leading `/`).
    pub pod_path: PathBuf,
    /// The container, when the path goes below the pod cgroup.
    pub container: Option<ContainerCgroup>,
}

/// A pod UID as the kubelet puts it into cgroup names: a UUID, or the 32-hex-digit hash the
/// kubelet gives static pods. `_` stands for `-` under the systemd driver.
fn pod_uid(raw: &str, systemd: bool) -> Option<String> {
    let uid: String = if systemd {
        raw.replace('_', "-")
    } else {
        raw.into()
    };
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-')
        && !uid.starts_with('-')
        && !uid.ends_with('-');
    ok.then_some(uid)
}

fn container_id(s: &str) -> Option<&str> {
    let ok = (12..=128).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_hexdigit());
    ok.then_some(s)
}

fn systemd_container(name: &str) -> Option<ContainerCgroup> {
    let base = name.strip_suffix(".scope")?;
    // Longest prefix first: `crio-conmon-` before `crio-`.
    let table = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-conmon-", Runtime::CriOConmon),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ];
    table.iter().find_map(|(prefix, runtime)| {
        let id = container_id(base.strip_prefix(prefix)?)?;
        Some(ContainerCgroup {
            runtime: *runtime,
            id: id.into(),
        })
    })
}

fn cgroupfs_container(name: &str) -> Option<ContainerCgroup> {
    let (runtime, id) = if let Some(id) = name.strip_prefix("crio-conmon-") {
        (Runtime::CriOConmon, id)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (Runtime::CriO, id)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (Runtime::Docker, id)
    } else {
        (Runtime::Unnamed, name)
    };
    Some(ContainerCgroup {
        runtime,
        id: container_id(id)?.into(),
    })
}

/// The systemd pod slice `<X>-pod<uid_>.slice` whose parent is `<X>.slice`, where `<X>` is a
/// kubepods QoS slice prefix (`kubepods`, `kubepods-burstable`, `kubepods-besteffort`, or the
/// same under a custom cgroup root, `kubelet-kubepods-burstable`).
fn systemd_pod(name: &str, parent: &str) -> Option<(QosClass, String)> {
    let base = name.strip_suffix(".slice")?;
    let (prefix, uid) = base.rsplit_once("-pod")?;
    if parent.strip_suffix(".slice")? != prefix {
        return None;
    }
    let qos = if prefix == "kubepods" || prefix.ends_with("-kubepods") {
        QosClass::Guaranteed
    } else if prefix.ends_with("kubepods-burstable") {
        QosClass::Burstable
    } else if prefix.ends_with("kubepods-besteffort") {
        QosClass::BestEffort
    } else {
        return None;
    };
    Some((qos, pod_uid(uid, true)?))
}

/// The cgroupfs pod directory `pod<uid>` under `kubepods`, `kubepods/burstable` or
/// `kubepods/besteffort`.
fn cgroupfs_pod(comps: &[&str], i: usize) -> Option<(QosClass, String)> {
    let uid = pod_uid(comps[i].strip_prefix("pod")?, false)?;
    let parent = *comps.get(i.checked_sub(1)?)?;
    let grandparent = i.checked_sub(2).and_then(|g| comps.get(g)).copied();
    let qos = match (parent, grandparent) {
        ("kubepods", _) => QosClass::Guaranteed,
        ("burstable", Some("kubepods")) => QosClass::Burstable,
        ("besteffort", Some("kubepods")) => QosClass::BestEffort,
        _ => return None,
    };
    Some((qos, uid))
}

/// Parses a cgroup v2 path (relative to the cgroup2 root, with or without the leading `/`, as
/// in `/proc/<pid>/cgroup`) of a pod or of anything inside one. `None` when the path is not in
/// a Kubernetes pod.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for i in 0..comps.len() {
        let found = match i.checked_sub(1).map(|p| comps[p]) {
            Some(parent) if comps[i].ends_with(".slice") => {
                systemd_pod(comps[i], parent).map(|p| (Driver::Systemd, p))
            }
            _ => cgroupfs_pod(&comps, i).map(|p| (Driver::Cgroupfs, p)),
        };
        let Some((driver, (qos, pod_uid))) = found else {
            continue;
        };
        let container = comps.get(i + 1).and_then(|c| match driver {
            Driver::Systemd => systemd_container(c),
            Driver::Cgroupfs => cgroupfs_container(c),
        });
        return Some(PodCgroup {
            driver,
            qos,
            pod_uid,
            pod_path: comps[..=i].iter().collect(),
            container,
        });
    }
    None
}

/// Parses the cgroup v2 line (`0::<path>`) of a `/proc/<pid>/cgroup` file.
pub fn parse_proc_cgroup(text: &str) -> Option<PodCgroup> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(parse)
}

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("read cgroup directory {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no kubepods cgroup under {root} (is the host's cgroup2 root mounted there?)")]
    NoKubepods { root: PathBuf },
    #[error("no cgroup for pod {uid} under {} (looked for {})", .roots.join(", "), .looked.join(", "))]
    NotFound {
        uid: String,
        roots: Vec<String>,
        looked: Vec<String>,
    },
}

/// A kubelet's pod cgroup root: `kubepods` (cgroupfs) or `<X>.slice` with `X` ending in
/// `kubepods` (systemd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubepodsRoot {
    pub driver: Driver,
    /// Absolute path of the `kubepods` cgroup.
    pub path: PathBuf,
}

impl KubepodsRoot {
    /// The pod cgroup of `uid` with QoS `qos` under this root (whether it exists or not).
    pub fn pod_dir(&self, uid: &str, qos: QosClass) -> PathBuf {
        match self.driver {
            Driver::Cgroupfs => {
                let mut p = self.path.clone();
                if let Some(q) = qos.dir() {
                    p.push(q);
                }
                p.join(format!("pod{uid}"))
            }
            Driver::Systemd => {
                let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let prefix = name.strip_suffix(".slice").unwrap_or(name);
                let uid_ = uid.replace('-', "_");
                match qos.dir() {
                    None => self.path.join(format!("{prefix}-pod{uid_}.slice")),
                    Some(q) => self
                        .path
                        .join(format!("{prefix}-{q}.slice"))
                        .join(format!("{prefix}-{q}-pod{uid_}.slice")),
                }
            }
        }
    }
}

/// How deep below the cgroup2 root a kubepods root is looked for (`/kubepods.slice` is 1,
/// `/kubelet.slice/kubelet-kubepods.slice` 2, a kubelet in a container one more).
const KUBEPODS_MAX_DEPTH: usize = 3;

fn kubepods_root(name: &str) -> Option<Driver> {
    if name == "kubepods" {
        return Some(Driver::Cgroupfs);
    }
    let base = name.strip_suffix(".slice")?;
    (base == "kubepods" || base.ends_with("-kubepods")).then_some(Driver::Systemd)
}

/// Finds the kubelet's pod cgroup roots under the cgroup2 root (breadth first, bounded depth;
/// systemd units other than slices are not entered).
pub fn find_kubepods_roots(cgroup_root: &Path) -> Result<Vec<KubepodsRoot>, LocateError> {
    let mut found = Vec::new();
    let mut level = vec![cgroup_root.to_path_buf()];
    for _ in 0..KUBEPODS_MAX_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                // Directories come and go (a unit stops): only the root must be readable.
                Err(source) if dir == cgroup_root => {
                    return Err(LocateError::Read {
                        path: dir.clone(),
                        source,
                    });
                }
                Err(_) => continue,
            };
            let mut names: Vec<(String, PathBuf)> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect();
            names.sort();
            for (name, path) in names {
                if let Some(driver) = kubepods_root(&name) {
                    found.push(KubepodsRoot { driver, path });
                } else if !(name.ends_with(".scope")
                    || name.ends_with(".service")
                    || name.ends_with(".mount")
                    || name.ends_with(".socket"))
                {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    Ok(found)
}

/// The cgroup directory of pod `uid` under `roots`: the QoS class's directory first when it is
/// known, then the other classes (a pod's class cannot change, but `status.qosClass` can be
/// missing on a pod seen early).
pub fn locate_pod(
    roots: &[KubepodsRoot],
    uid: &str,
    qos: Option<QosClass>,
) -> Result<PathBuf, LocateError> {
    let mut order: Vec<QosClass> = qos.into_iter().collect();
    order.extend(QosClass::ALL.iter().filter(|q| Some(**q) != qos));
    let mut looked = Vec::new();
    for root in roots {
        for q in &order {
            let p = root.pod_dir(uid, *q);
            if p.is_dir() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    Err(LocateError::NotFound {
        uid: uid.into(),
        roots: roots.iter().map(|r| r.path.display().to_string()).collect(),
        looked,
    })
}

/// Finds pod cgroups under one cgroup2 root, remembering where the kubelet's roots are (looked
/// up again when a pod is not found: the kubelet may have started after the agent).
#[derive(Debug)]
pub struct PodCgroups {
    cgroup_root: PathBuf,
    roots: Vec<KubepodsRoot>,
}

impl PodCgroups {
    pub fn new(cgroup_root: &Path) -> Self {
        Self {
            cgroup_root: cgroup_root.into(),
            roots: Vec::new(),
        }
    }

    /// The cgroup directory of pod `uid`.
    pub fn locate(&mut self, uid: &str, qos: Option<QosClass>) -> Result<PathBuf, LocateError> {
        if !self.roots.is_empty()
            && let Ok(p) = locate_pod(&self.roots, uid, qos)
        {
            return Ok(p);
        }
        self.roots = find_kubepods_roots(&self.cgroup_root)?;
        if self.roots.is_empty() {
            return Err(LocateError::NoKubepods {
                root: self.cgroup_root.clone(),
            });
        }
        locate_pod(&self.roots, uid, qos)
    }
}

#[cfg(test)]
#[path = "cgroup_path_tests.rs"]
mod tests;
