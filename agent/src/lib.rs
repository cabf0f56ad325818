//! Corral's node agent: loads the kernel programs, keeps their maps filled with compiled
//! policy and enrolled principals, and reads the decisions they record.
//!
//! Module map:
//! - [`paths`]: every host path (cgroup2 mount, bpffs, sockets, state), discovered once.
//! - [`ebpf`]: the embedded kernel object, loading/attaching, and the typed map layer
//!   (no other module touches raw aya maps).
//! - [`compiled`]: the compiled policy form the kernel maps are filled from.
//! - [`identity`]: SPIFFE ID patterns and matching.
//! - [`cgroup`]: creating, joining and removing cgroup v2 directories.
//! - [`k8s`]: pods on this node as principals: cgroup layouts, pod → identity, opt-in.
//! - [`policy`]: the policy language: parse, validate, compile, evaluate, explain.
//! - [`daemon`]: `corral-agent`: registry, policy reload, event pipeline, local API.
// `deny`, not `forbid`: the one FFI module, `ebpf::unix_hooks` (raw bpf() calls aya 0.14 cannot
// make), opts out; everything else stays free of unsafe code.
#![deny(unsafe_code)]

pub mod cgroup;
pub mod clock;
pub mod compiled;
pub mod daemon;
pub mod ebpf;
pub mod identity;
pub mod k8s;
pub mod logging;
pub mod paths;
pub mod policy;
