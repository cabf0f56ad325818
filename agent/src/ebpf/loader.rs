//! Loading the object and attaching its programs.
//!
//! The cgroup sock_addr programs (connect4/6, sendmsg4/6) are attached as bpf_links (kernel
//! 5.7 or later). Cgroup links always coexist with other programs on the same hook (the kernel treats
//! them as `BPF_F_ALLOW_MULTI`, and rejects explicit flags), so an upgrading agent can attach
//! its programs before the old ones go away, and other cgroup programs on the node keep
//! working. The cgroup_skb programs are the exception: they are linked at each principal's
//! cgroup instead of the root ([`super::coverage`]).

use std::{
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, TracePoint,
        links::FdLink,
    },
};
use aya_obj::generated::bpf_attach_type;
use tracing::info;

use super::{
    map_access::MapError,
    maps::PolicyMaps,
    pins::{PinDir, PinError},
};

/// The sock_addr programs, by the names of their functions in `agent-ebpf`. The unix-socket
/// hooks (kernel 6.7+) are attached where the kernel has them, by [`super::unix_hooks`]:
/// [`Enforcer::sock_addr_hooks`] lists what is attached.
pub const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
];

/// The containment guards (`agent-ebpf/src/guard.rs`): `socket()` (cgroup `sock_create`) and
/// `setsockopt()` (cgroup `setsockopt`), attached like the sock_addr programs.
pub const GUARD_PROGRAMS: [&str; 2] = ["sock_create", "setsockopt"];

/// Closing a principal's socket hands its unreported repeated calls to the principal's
/// suppressed count (`agent-ebpf/src/repeat.rs`): cgroup `sock_release`, attached like the
/// guards.
pub const RELEASE_PROGRAM: &str = "sock_release";

/// Revocation of established connections and per-message source routes
/// (`agent-ebpf/src/egress.rs`): cgroup_skb programs, attached at each principal's cgroup, not
/// at the root ([`super::coverage`]).
pub use super::coverage::PROGRAMS as SKB_PROGRAMS;

/// The guard for the families `sock_create` does not see: the `syscalls:sys_enter_socket`
/// tracepoint (a deny kills the process).
pub const SOCKET_TRACEPOINT: (&str, &str, &str) = ("socket_enter", "syscalls", "sys_enter_socket");

/// Sticky attribution (`agent-ebpf/src/principal.rs`): a forked child inherits its parent's
/// principal; an exiting task's entry goes.
pub const STICKY_TRACEPOINTS: [(&str, &str, &str); 2] = [
    ("sticky_fork", "sched", "sched_process_fork"),
    ("sticky_exit", "sched", "sched_process_exit"),
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("load the kernel object")]
    Object(#[source] aya::EbpfError),
    #[error("program {name} is missing from the kernel object")]
    MissingProgram { name: &'static str },
    #[error("load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attach {name} to {path}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("take the link of {name} as a bpf_link (kernel >= 5.7 needed)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(transparent)]
    Maps(#[from] MapError),
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("link {name} to {path}")]
    Guard {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read the kernel's BTF, or the socket-to-cgroup offsets in it")]
    SockCgroup(#[source] super::btf::BtfError),
    #[error("find or mount tracefs")]
    Tracefs(#[source] crate::paths::PathError),
    #[error("read the sched_process_fork record layout from {path}")]
    ForkFormat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attach the exec programs")]
    Exec(#[source] Box<super::exec::ExecError>),
}

/// Cumulative kernel statistics of one program ([`Enforcer::program_stats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub runs: u64,
    pub run_time: std::time::Duration,
}

/// Loaded programs, their links, and the typed maps. Without pins, dropping it detaches the
/// programs; with pins, enforcement stays in force after the process is gone.
pub struct Enforcer {
    // Field order matters: links drop before the object.
    links: Vec<FdLink>,
    /// The containment guards' links, held unpinned (without pins).
    guard_links: Vec<OwnedFd>,
    unix: super::unix_hooks::UnixHooks,
    maps: PolicyMaps,
    pinned: bool,
    adopted: bool,
    exec_mode: super::exec::ExecMode,
    exec_lsm_error: Option<String>,
    _ebpf: Ebpf,
}

impl Enforcer {
    /// Loads the embedded object and attaches the sock_addr programs to `cgroup`
    /// (normally the cgroup v2 root). Nothing is pinned: for tests and one-shot tools.
    pub fn load_and_attach(cgroup: &Path) -> Result<Self, LoadError> {
        Self::start(cgroup, None)
    }

    /// Loads and attaches; with `pins`, maps are pinned (or, if an earlier agent pinned them,
    /// reused: principals, policy and chaining state carry over) and each new link replaces
    /// the pinned link of the previous agent only after it is attached (see `pins`).
    pub fn start(cgroup: &Path, pins: Option<&PinDir>) -> Result<Self, LoadError> {
        let object = super::object::bytes();
        let mut loader = EbpfLoader::new();
        let mut adopted = false;
        let map_paths: Vec<(String, PathBuf)> = match pins {
            Some(p) => {
                adopted = p.has_state();
                p.create()?;
                super::pins::check_layouts(p, object)?;
                super::pins::map_names(object)?
                    .into_iter()
                    .map(|n| {
                        let path = p.map_path(&n);
                        (n, path)
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        // Before the load pins it: whether the sticky-mark bitmap is new (see `sticky_marks`).
        let marks_new = pins.is_none_or(|p| !p.map_path(agent_common::maps::STICKY_MARK).exists());
        let mut ebpf = loader.load(object).map_err(LoadError::Object)?;
        if marks_new {
            let seeded = super::sticky_marks::seed(&mut ebpf)?;
            if seeded > 0 {
                info!(seeded, "marked the sticky entries of the previous agent");
            }
        }
        // Before any program is attached: a hook that ran without the offsets would refuse
        // every principal's call (see agent-ebpf/src/scope.rs).
        // Parsed once: the exec programs' offsets come from it too.
        let btf = super::btf::KernelBtf::from_sys_fs().map_err(LoadError::SockCgroup)?;
        let sock_cg = btf.sock_cgroup_config().map_err(LoadError::SockCgroup)?;
        write_sock_cgroup_config(&mut ebpf, sock_cg)?;
        let cg = File::open(cgroup).map_err(|source| LoadError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let mut links = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram { name })?
                .try_into()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.load()
                .map_err(|source| LoadError::Program { name, source })?;
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(|source| LoadError::Attach {
                    name,
                    path: cgroup.into(),
                    source,
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| LoadError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|source| LoadError::Link { name, source })?;
            match pins {
                Some(p) => p.install_link(name, link)?,
                None => links.push(link),
            }
            info!(program = name, cgroup = %cgroup.display(), pinned = pins.is_some(), "attached");
        }
        let mut skb = Vec::new();
        for (name, attach_type) in SKB_PROGRAMS {
            skb.push((name, attach_type as u32, load_skb(&mut ebpf, name)?));
        }
        let mut guard_links = Vec::new();
        for name in GUARD_PROGRAMS.into_iter().chain([RELEASE_PROGRAM]) {
            let link = attach_guard(&mut ebpf, name, &cg, cgroup)?;
            match pins {
                Some(p) => p.install_link_fd(name, link.as_fd())?,
                None => guard_links.push(link),
            }
            info!(program = name, cgroup = %cgroup.display(), pinned = pins.is_some(), "attached");
        }
        let tracefs = crate::paths::ensure_tracefs().map_err(LoadError::Tracefs)?;
        write_fork_offset(&mut ebpf, &tracefs)?;
        write_exit_offset(&mut ebpf, &tracefs)?;
        for (name, category, event) in std::iter::once(SOCKET_TRACEPOINT).chain(STICKY_TRACEPOINTS)
        {
            let link = attach_tracepoint(&mut ebpf, name, category, event)?;
            match pins {
                Some(p) => p.install_link(name, link)?,
                None => links.push(link),
            }
            info!(program = name, tracepoint = %format!("{category}:{event}"), pinned = pins.is_some(), "attached");
        }
        // Before the maps are taken out of `ebpf`: the unix programs are relocated against them.
        let unix = super::unix_hooks::attach(&ebpf, object, &cg, pins);
        let mut maps = PolicyMaps::take(&mut ebpf)?;
        let coverage =
            super::coverage::Coverage::new(skb, cgroup, pins.cloned()).map_err(|source| {
                LoadError::Cgroup {
                    path: cgroup.into(),
                    source,
                }
            })?;
        let covered = maps.set_coverage(coverage)?;
        info!(
            programs = "egress, ingress",
            principals = covered,
            pinned = pins.is_some(),
            "packet programs attached at the principals' cgroups"
        );
        match super::local_addrs::node_addresses() {
            Ok(addrs) => {
                maps.set_local_addrs(&addrs)?;
            }
            // Refreshed again by the daemon; until then only loopback is known as local.
            Err(e) => tracing::warn!(error = %e, "cannot list the node's addresses"),
        }
        maps.exec()
            .set_loaders(&super::loaders::loader_identities())?;
        // Exec: offsets first, then the LSM probe and the tracepoints.
        let exec = super::exec::attach(&mut ebpf, &btf, maps.exec(), pins)
            .map_err(|e| LoadError::Exec(Box::new(e)))?;
        links.extend(exec.links);
        if adopted {
            info!("adopted the pinned state of a previous agent");
        }
        Ok(Self {
            links,
            guard_links,
            unix,
            maps,
            pinned: pins.is_some(),
            adopted,
            exec_mode: exec.mode,
            exec_lsm_error: exec.lsm_error,
            _ebpf: ebpf,
        })
    }

    /// Where exec decisions are enforced: BPF LSM, or the tracepoint + SIGKILL fallback.
    pub fn exec_mode(&self) -> super::exec::ExecMode {
        self.exec_mode
    }

    /// Why the BPF LSM was not used (`None` in LSM mode).
    pub fn exec_lsm_error(&self) -> Option<&str> {
        self.exec_lsm_error.as_deref()
    }

    /// The cgroup sock_addr hooks attached: [`SOCK_ADDR_PROGRAMS`], then `connect_unix` and
    /// `sendmsg_unix` where the kernel has the unix hooks (6.7+).
    pub fn sock_addr_hooks(&self) -> Vec<&'static str> {
        let mut v = SOCK_ADDR_PROGRAMS.to_vec();
        v.extend(self.unix.active.iter().copied());
        v
    }

    /// The containment guards attached ([`GUARD_PROGRAMS`], the socket tracepoint, then the
    /// cgroup_skb programs).
    pub fn guard_hooks(&self) -> Vec<&'static str> {
        let mut v = GUARD_PROGRAMS.to_vec();
        v.push(SOCKET_TRACEPOINT.2);
        v.push("cgroup_skb");
        v
    }

    /// Why the unix-socket hooks are not attached (`None` when they are).
    pub fn unix_hooks_error(&self) -> Option<&str> {
        self.unix.error.as_deref()
    }

    /// Whether this start reused pinned maps of an earlier agent.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether links and maps are pinned (enforcement outlives this process).
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    pub fn maps(&mut self) -> &mut PolicyMaps {
        &mut self.maps
    }

    /// Run count and total run time of each of this object's programs, by function name. The
    /// kernel counts only while BPF run-time statistics are enabled (`aya::sys::enable_stats`
    /// or `sysctl kernel.bpf_stats_enabled=1`); the unix hooks, loaded outside aya, are not
    /// listed.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self._ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                Some(ProgramStats {
                    name: name.to_owned(),
                    runs: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect()
    }

    /// Number of program links this process holds unpinned (pinned links live in bpffs).
    pub fn attached(&self) -> usize {
        self.links.len() + self.guard_links.len() + self.unix.links.len()
    }
}

/// Writes the socket-to-cgroup offsets where the hooks read them (`SOCK_CG_CFG`).
fn write_sock_cgroup_config(
    ebpf: &mut Ebpf,
    cfg: agent_common::SockCgroupConfig,
) -> Result<(), MapError> {
    let name = agent_common::maps::SOCK_CG_CFG;
    let map = ebpf.map_mut(name).ok_or(MapError::Missing { name })?;
    let mut array: aya::maps::Array<_, agent_common::SockCgroupConfig> =
        aya::maps::Array::try_from(map).map_err(|source| MapError::Type { name, source })?;
    array
        .set(0, cfg, 0)
        .map_err(super::map_access::op("write", name))
}

/// Loads cgroup_skb program `name`; its fd, to link at the principals' cgroups.
fn load_skb(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd, LoadError> {
    let program = |source| LoadError::Program { name, source };
    let prog: &mut CgroupSkb = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(program)?;
    prog.load().map_err(program)?;
    prog.fd()
        .map_err(program)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| LoadError::Guard {
            name,
            path: PathBuf::new(),
            source,
        })
}

/// Loads guard program `name` (a cgroup `sock_create`, `sock_release` or `setsockopt`
/// program) and links it
/// to `cg`. The link is made with a raw `BPF_LINK_CREATE`: aya 0.14 cannot turn a sockopt link
/// into an `FdLink` to pin.
fn attach_guard(
    ebpf: &mut Ebpf,
    name: &'static str,
    cg: &File,
    path: &Path,
) -> Result<OwnedFd, LoadError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    let program = |source| LoadError::Program { name, source };
    let (fd, attach_type) = if let Ok(p) = <&mut CgroupSock>::try_from(&mut *prog) {
        p.load().map_err(program)?;
        (
            p.fd().map_err(program)?.as_fd().try_clone_to_owned(),
            if name == RELEASE_PROGRAM {
                bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE
            } else {
                bpf_attach_type::BPF_CGROUP_INET_SOCK_CREATE
            },
        )
    } else {
        let p: &mut CgroupSockopt = prog.try_into().map_err(program)?;
        p.load().map_err(program)?;
        (
            p.fd().map_err(program)?.as_fd().try_clone_to_owned(),
            bpf_attach_type::BPF_CGROUP_SETSOCKOPT,
        )
    };
    let io = |source| LoadError::Guard {
        name,
        path: path.into(),
        source,
    };
    let fd = fd.map_err(io)?;
    super::raw::link_cgroup(&fd, cg, attach_type as u32).map_err(io)
}

/// Loads and attaches tracepoint program `name` to `category:event` as a bpf_link (kernel
/// 5.15+ makes perf-event links bpf_links, which can be pinned).
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    category: &str,
    event: &str,
) -> Result<FdLink, LoadError> {
    let program = |source| LoadError::Program { name, source };
    let prog: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(program)?;
    prog.load().map_err(program)?;
    let id = prog.attach(category, event).map_err(program)?;
    let link = prog.take_link(id).map_err(program)?;
    FdLink::try_from(link).map_err(|source| LoadError::Link { name, source })
}

/// Writes the offset of `child_pid` in the `sched_process_fork` record (it moved between
/// kernel versions: 44 before the comm fields became `__data_loc`, 20 since) into `FORK_CFG`.
fn write_fork_offset(ebpf: &mut Ebpf, tracefs: &Path) -> Result<(), LoadError> {
    let path = tracefs.join("events/sched/sched_process_fork/format");
    let bad = |source| LoadError::ForkFormat {
        path: path.clone(),
        source,
    };
    let text = std::fs::read_to_string(&path).map_err(bad)?;
    let offset = child_pid_offset(&text)
        .ok_or_else(|| bad(std::io::Error::other("no `pid_t child_pid` field")))?;
    set_offset(ebpf, agent_common::maps::FORK_CFG, offset)
}

/// The `offset:N` of the `child_pid` line of a tracepoint format file.
fn child_pid_offset(format: &str) -> Option<u32> {
    field_offset(format, " child_pid;")
}

/// The offset of the field whose declaration ends with `decl` (e.g. `" child_pid;"`) in a
/// tracefs `format` file.
fn field_offset(format: &str, decl: &str) -> Option<u32> {
    let line = format.lines().find(|l| l.contains(decl))?;
    let rest = line.split("offset:").nth(1)?;
    rest.split(';').next()?.trim().parse().ok()
}

/// Writes the offset of `group_dead` in the `sched_process_exit` record into `EXIT_CFG`, or
/// 0 where the kernel has no such field (before 6.16) or tracefs does not say.
fn write_exit_offset(ebpf: &mut Ebpf, tracefs: &Path) -> Result<(), LoadError> {
    let path = tracefs.join("events/sched/sched_process_exit/format");
    let offset = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| field_offset(&t, " group_dead;"))
        .unwrap_or(0);
    if offset == 0 {
        info!(format = %path.display(), "no group_dead in sched_process_exit: a process's sticky attribution ends with its thread-group leader");
    }
    set_offset(ebpf, agent_common::maps::EXIT_CFG, offset)
}

/// Writes `offset` into entry 0 of the one-entry `Array<u32>` map `name`.
fn set_offset(ebpf: &mut Ebpf, name: &'static str, offset: u32) -> Result<(), LoadError> {
    let map = ebpf.map_mut(name).ok_or(MapError::Missing { name })?;
    let mut cfg: aya::maps::Array<&mut aya::maps::MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|source| MapError::Type { name, source })?;
    cfg.set(0, offset, 0).map_err(|source| MapError::Op {
        op: "set",
        name,
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::child_pid_offset;

    #[test]
    fn the_child_pid_offset_is_read_from_both_layouts() {
        let new = "\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\
                   \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(child_pid_offset(new), Some(20));
        assert_eq!(child_pid_offset(old), Some(44));
        assert_eq!(
            child_pid_offset("field:pid_t parent_pid;\toffset:12;"),
            None
        );
        let exit = "\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n\
                    \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(super::field_offset(exit, " group_dead;"), Some(32));
    }
}
