//! What the OCI hook (`corral oci-hook`) and the agent agree on: the annotations a container
//! is named by, and the record the hook leaves when it lets a container start unpoliced
//! (`--fail-open`, agent unreachable) for the agent to report when it runs again.

use std::path::{Path, PathBuf};

/// The container's identity (a SPIFFE ID): its presence opts the container in.
pub const IDENTITY_ANNOTATION: &str = "corral.dev/identity";
/// The session id (default: the pod uid on Kubernetes, else the container id).
pub const SESSION_ANNOTATION: &str = "corral.dev/session";
/// The pod uid, as containerd's CRI plugin and CRI-O pass it.
pub const POD_UID_ANNOTATIONS: [&str; 2] =
    ["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"];
/// The pod namespace, as containerd's CRI plugin and CRI-O pass it.
pub const POD_NAMESPACE_ANNOTATIONS: [&str; 2] = [
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.pod.namespace",
];

/// A container the hook let start unpoliced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailOpenRecord {
    pub container_id: String,
    pub pid: u32,
    /// The identity it asked for.
    pub identity: String,
    /// Why the agent could not enrol it.
    pub reason: String,
    pub time_unix_nano: u64,
}

/// Where the hook leaves [`FailOpenRecord`]s: `fail-open/` next to the agent's socket (the
/// agent reads and removes them).
pub fn fail_open_dir(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join("fail-open")
}

/// A container id as a file name: letters, digits, `-`, `_`, `.` kept, anything else `_`.
pub fn file_name(container_id: &str) -> String {
    let mut s: String = container_id
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    s.push_str(".json");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sit_next_to_the_socket_under_a_safe_name() {
        assert_eq!(
            fail_open_dir(Path::new("/run/corral/agent.sock")),
            Path::new("/run/corral/fail-open")
        );
        assert_eq!(file_name("abc-1"), "abc-1.json");
        assert_eq!(file_name("../x/y"), "_.._x_y.json");
        assert_eq!(file_name(""), "_.json");
    }
}
