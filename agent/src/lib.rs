//! Corral's node agent: loads the kernel programs, keeps their maps filled with compiled
//! policy and enrolled principals, and reads the decisions they record. The only crate that
//! builds the kernel object (`build.rs`); the policy language is `corral_policy`, the shared
//! runtime pieces `corral_runtime`, event fan-out and rendering `corral_events`.
//!
//! Module map:
//! - [`paths`]: every host path (cgroup2 mount, bpffs, sockets, state), discovered once.
//! - [`ebpf`]: the embedded kernel object, loading/attaching, and the typed map layer
//!   (no other module touches raw aya maps).
//! - [`cgroup`]: creating, joining and removing cgroup v2 directories.
//! - [`k8s`]: pods on this node as principals: cgroup layouts, pod → identity, opt-in.
//! - [`clock`]: CLOCK_BOOTTIME, the clock the kernel programs stamp events and grants with.
//! - [`daemon`]: `corral-agent`: registry, policy reload, event pipeline, local API.
// `deny`, not `forbid`: the one FFI module, `ebpf::raw` (raw bpf() calls aya 0.14 cannot
// make), opts out; everything else stays free of unsafe code.
#![deny(unsafe_code)]

pub mod cgroup;
pub mod clock;
pub mod daemon;
pub mod ebpf;
pub mod k8s;
pub mod paths;
