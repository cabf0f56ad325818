//! The cgroup unix-socket hooks (`connect_unix`, `sendmsg_unix`; kernel 6.7+), loaded and
//! attached without aya's program layer.
//!
//! aya 0.14 has neither the attach types (`BPF_CGROUP_UNIX_CONNECT` = 49,
//! `BPF_CGROUP_UNIX_SENDMSG` = 50) nor a public way to wrap a raw link fd, and aya-obj 0.3
//! rejects `cgroup/connect_unix` sections. So the kernel crate declares the two programs as
//! `connect4` programs (the object parses; `loader` never loads them as such), and this module
//! takes their instructions from the same object, relocated against the maps the main
//! [`aya::Ebpf`] created, loads them with the unix attach type, links them to the cgroup and
//! pins the links beside the others (same adoption: a new agent's link replaces the pin only
//! once attached).
//!
//! Everything here is a probe: on an older kernel (the load fails with EINVAL on the attach
//! type), with a kernel whose `struct bpf_sock_addr_kern` differs from what the programs read,
//! or on any other failure, unix sockets are simply not policed and `status` does not list the
//! hooks; the reason is logged and kept in [`UnixHooks::error`].

use std::{
    ffi::CString,
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use aya::{Ebpf, maps::Map};
use aya_obj::generated::bpf_insn;
use tracing::{info, warn};

use super::{btf::KernelBtf, pins::PinDir, raw};

/// The unix programs, by function name in `agent-ebpf`, with their attach types.
pub const UNIX_PROGRAMS: [(&str, u32); 2] = [("connect_unix", 49), ("sendmsg_unix", 50)];

/// Offsets the kernel programs read in `struct bpf_sock_addr_kern` (see `agent-ebpf/src/unix.rs`).
const KERN_UADDR: u32 = 8;
const KERN_UADDRLEN: u32 = 32;

/// The unix hooks this process attached.
#[derive(Debug, Default)]
pub struct UnixHooks {
    /// Names of the attached programs (empty: unix sockets are not policed).
    pub active: Vec<&'static str>,
    /// Links held by this process (unpinned mode); dropping them detaches the programs.
    pub links: Vec<OwnedFd>,
    /// Why the hooks are not attached.
    pub error: Option<String>,
}

/// Loads and attaches the unix hooks to `cgroup`, pinning the links in `pins`. `ebpf` must
/// still hold every map (call before the maps are taken out of it). Never fails: see the
/// module documentation; a hook attached before a later one failed stays in the result.
pub fn attach(ebpf: &Ebpf, object: &[u8], cgroup: &File, pins: Option<&PinDir>) -> UnixHooks {
    let mut hooks = UnixHooks::default();
    if let Err(e) = try_attach(ebpf, object, cgroup, pins, &mut hooks) {
        warn!(error = %e, attached = ?hooks.active, "unix-socket hooks not attached: unix sockets are not policed");
        hooks.error = Some(e);
    }
    hooks
}

fn try_attach(
    ebpf: &Ebpf,
    object: &[u8],
    cgroup: &File,
    pins: Option<&PinDir>,
    hooks: &mut UnixHooks,
) -> Result<(), String> {
    check_layout()?;
    let programs = relocated(ebpf, object)?;
    let license = CString::new("Dual MIT/GPL").map_err(|e| e.to_string())?;
    for ((name, attach_type), insns) in UNIX_PROGRAMS.into_iter().zip(programs) {
        let prog = raw::load_sock_addr(name, attach_type, &insns, &license)
            .map_err(|e| format!("{e} (kernel 6.7+ is needed for the cgroup unix hooks)"))?;
        let link = raw::link_cgroup(&prog, cgroup, attach_type)
            .map_err(|e| format!("attach {name}: {e}"))?;
        match pins {
            Some(p) => p
                .install_link_fd(name, link.as_fd())
                .map_err(|e| format!("pin {name}: {e}"))?,
            None => hooks.links.push(link),
        }
        info!(program = name, pinned = pins.is_some(), "attached");
        hooks.active.push(name);
    }
    Ok(())
}

/// The programs read `uaddr` and `uaddrlen` at fixed offsets: refuse a kernel that moved them.
fn check_layout() -> Result<(), String> {
    let btf = KernelBtf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    for (member, want) in [("uaddr", KERN_UADDR), ("uaddrlen", KERN_UADDRLEN)] {
        let got = btf
            .offset("bpf_sock_addr_kern", member)
            .map_err(|e| format!("kernel BTF: {e}"))?;
        if got != want {
            return Err(format!(
                "struct bpf_sock_addr_kern.{member} is at offset {got}, the programs read {want}"
            ));
        }
    }
    Ok(())
}

/// The file descriptor of a map of the loaded object (every kind Corral's object has).
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    let data = match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::RingBuf(m)
        | Map::SkStorage(m)
        | Map::Unsupported(m) => m,
        _ => return None,
    };
    Some(data.fd().as_fd())
}

/// The instructions of [`UNIX_PROGRAMS`] (same order), with map references pointing at the
/// maps of `ebpf` and subprogram calls linked in.
fn relocated(ebpf: &Ebpf, object: &[u8]) -> Result<Vec<Vec<bpf_insn>>, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| format!("parse object: {e}"))?;
    let mut fds = Vec::new();
    for name in obj.maps.keys() {
        let map = ebpf
            .map(name)
            .ok_or_else(|| format!("map {name} is not loaded"))?;
        let fd = map_fd(map).ok_or_else(|| format!("map {name}: unexpected map type"))?;
        fds.push((name.clone(), fd.as_raw_fd()));
    }
    let text_sections = obj.functions.keys().map(|(s, _)| *s).collect();
    let maps: Vec<(String, i32, aya_obj::Map)> = fds
        .into_iter()
        .map(|(n, fd)| {
            let m = obj.maps[&n].clone();
            (n, fd, m)
        })
        .collect();
    obj.relocate_maps(
        maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )
    .map_err(|e| format!("relocate maps: {e}"))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| format!("relocate calls: {e}"))?;
    UNIX_PROGRAMS
        .iter()
        .map(|(name, _)| {
            let p = obj
                .programs
                .get(*name)
                .ok_or_else(|| format!("program {name} is missing from the kernel object"))?;
            obj.functions
                .get(&p.function_key())
                .map(|f| f.instructions.clone())
                .ok_or_else(|| format!("program {name}: no function"))
        })
        .collect()
}
