//! Kubernetes: pods on this node as principals.
//!
//! - [`cgroup_path`]: the kubelet's and the runtimes' cgroup layouts: parse a cgroup path into
//!   pod UID, QoS class and container id; find a pod's cgroup under the cgroup2 root.
//! - [`pods`]: pod → principal (identity, session = pod UID), opt-in rules.
//! - [`tracker`]: the watcher's state: which pods are enrolled, pending or failed, and why.
//!
//! Pure logic, unit-tested without a cluster: the pod objects come from JSON fixtures and go
//! through [`pods::map_pod`], the function a watcher calls for every pod it sees.

pub mod cgroup_path;
pub mod pods;
pub mod tracker;
