//! The kernel side as userspace sees it: the embedded object, loading and attaching, the typed
//! map layer and the event reader. No module outside this one touches raw aya maps.

pub mod btf;
pub mod coverage;
pub mod dns_maps;
pub mod events;
pub mod exec;
pub mod exec_rules;
pub mod exec_view;
pub mod loader;
pub mod loaders;
#[expect(unsafe_code, reason = "getifaddrs(3); SAFETY notes inside")]
pub mod local_addrs;
pub mod map_access;
pub mod maps;
pub mod object;
pub mod pins;
#[expect(
    unsafe_code,
    reason = "raw bpf() syscalls aya lacks; SAFETY notes inside"
)]
pub mod raw;
pub mod sticky_marks;
pub mod unix_hooks;

pub use exec::ExecMode;
pub use loader::{Enforcer, LoadError};
pub use map_access::MapError;
pub use maps::PolicyMaps;
pub use pins::PinDir;
