//! Where the cgroup_skb programs run: the principals' cgroups, not the root.
//!
//! A cgroup program runs for a socket by the cgroup the socket was created in, whoever uses
//! it. The connect/sendmsg hooks and the guards stay at the cgroup v2 root (they decide by the
//! calling process, sticky attribution included), but the per-packet programs (`egress.rs`)
//! are attached at each principal's cgroup, so the node's own traffic never runs them. A
//! principal must therefore not use a socket of any other cgroup, or its connection would
//! escape revocation, grant expiry and the per-packet checks:
//! - `sock_create` (guard.rs) refuses a principal's process a socket outside every principal's
//!   cgroup (a root process that moved itself out, a thread of a group that did);
//! - [`covered`], from the connect/sendmsg hooks before they record an allowed call, refuses a
//!   principal the use of a socket created elsewhere (handed over by a process outside, or
//!   opened before the process joined). It follows the socket's cgroup and its ancestors with
//!   `bpf_probe_read_kernel` at offsets the agent took from the kernel's BTF
//!   ([`SockCgroupConfig`]): a socket created in the cgroup before it was enrolled is covered.
//!   The principal's cgroup found is kept on the socket (`SockState::cover`) and checked
//!   against `PRINCIPALS` at each recorded call (a principal removed no longer covers it).
//! - a ping socket (decided only by the packet programs) must itself be of a principal's
//!   cgroup ([`socket_in_a_principal`], from guard.rs).
//!
//! Minimum kernel: 6.0 (`cgroup.ancestors[]`); the agent checks the offsets at load.

use core::ptr;

use agent_common::{
    Config, MAX_CGROUP_LEVEL, SOCK_CGROUP_CONFIG_VALID, SockCgroupConfig, SockState,
};
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated},
};

use crate::{
    maps::{PRINCIPALS, SOCK_CG_CFG},
    principal,
};

/// Whether the socket `sk` was created in a principal's cgroup or below one, and that
/// principal is still enrolled; the cgroup is kept on its state `st` (`cover`), so later calls
/// cost one lookup. Unknown offsets, or a read that fails: not covered (closed).
#[inline(always)]
pub(crate) fn covered(sk: *mut bpf_sock, st: &mut SockState) -> bool {
    if st.cover != 0 && PRINCIPALS.get_ptr(st.cover).is_some() {
        return true;
    }
    let Some(sk) = address(sk) else {
        return false;
    };
    match principal_of_socket(&principal::config(), sk) {
        Some(id) => {
            st.cover = id;
            true
        }
        None => false,
    }
}

/// The principal cgroup the socket at kernel address `sk` was created in (or below), if any.
#[inline(always)]
pub(crate) fn principal_of_socket(cfg: &Config, sk: u64) -> Option<u64> {
    let off = SOCK_CG_CFG.get(0).copied()?;
    if off.valid != SOCK_CGROUP_CONFIG_VALID {
        return None;
    }
    in_a_principal(cfg, sk, &off)
}

/// [`principal_of_socket`] for a socket pointer.
#[inline(always)]
pub(crate) fn socket_in_a_principal(sk: *mut bpf_sock) -> bool {
    address(sk).is_some_and(|a| principal_of_socket(&principal::config(), a).is_some())
}

/// Whether a socket the current task creates now will run the packet programs: false only
/// for a task attributed to a principal stickily (it has a `STICKY` entry for an enrolled
/// principal) that is in no principal's cgroup. Any other task is either un-enrolled or
/// attributed by the cgroup it is in, which is the new socket's.
#[inline(always)]
pub(crate) fn created_in_scope() -> bool {
    let cfg = principal::config();
    if cfg.level_mask == 0 {
        return true;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !principal::may_be_sticky(tgid) || principal::sticky_caller(tgid).is_none() {
        return true;
    }
    principal::walk(&cfg).is_some()
}

/// The kernel address `sk` points to, as a number: the verifier allows no arithmetic on a
/// socket pointer, so its value is copied out of the stack slot that holds it.
#[inline(always)]
fn address(sk: *mut bpf_sock) -> Option<u64> {
    let slot = [sk];
    // SAFETY: a read of this program's own stack (the array above), 8 bytes.
    unsafe { bpf_probe_read_kernel(slot.as_ptr().cast::<u64>()) }
        .ok()
        .filter(|a| *a != 0)
}

/// Looks up the socket's cgroup's ancestors at the levels where principals exist (deepest
/// first), as `principal::walk` does for the calling task. Reads that fail give 0 (no
/// principal has id 0); no branch depends on them, which keeps the verifier's work small.
#[inline(always)]
fn in_a_principal(cfg: &Config, sk: u64, off: &SockCgroupConfig) -> Option<u64> {
    let cgrp = read0(sk + u64::from(off.sk_cgroup));
    let own = read0_u32(cgrp + u64::from(off.cgroup_level));
    let own = if own > MAX_CGROUP_LEVEL {
        MAX_CGROUP_LEVEL
    } else {
        own
    };
    // The levels of principals at or above the socket's cgroup.
    let mask = cfg.level_mask & (((2u64 << own) - 1) as u32);
    let mut level = MAX_CGROUP_LEVEL;
    // Bounded: at most MAX_CGROUP_LEVEL + 1 iterations.
    loop {
        if mask & (1u32 << level) != 0 {
            let anc = read0(cgrp + u64::from(off.cgroup_ancestors) + u64::from(level) * 8);
            let kn = read0(anc + u64::from(off.cgroup_kn));
            let id = read0(kn + u64::from(off.kn_id));
            if PRINCIPALS.get_ptr(id).is_some() {
                return Some(id);
            }
        }
        if level == 0 || mask & ((1u32 << level) - 1) == 0 {
            return None;
        }
        level -= 1;
    }
}

/// The 4 bytes at kernel address `addr`, or 0 if they cannot be read.
#[inline(always)]
fn read0_u32(addr: u64) -> u32 {
    let mut v = 0u32;
    // SAFETY: the helper writes at most 4 bytes into `v` (zeroed on failure) and tolerates any
    // source address.
    unsafe {
        generated::bpf_probe_read_kernel(
            ptr::from_mut(&mut v).cast(),
            4,
            addr as *const core::ffi::c_void,
        )
    };
    v
}

/// The 8 bytes at kernel address `addr`, or 0 if they cannot be read.
#[inline(always)]
fn read0(addr: u64) -> u64 {
    let mut v = 0u64;
    // SAFETY: the helper writes at most 8 bytes into `v` (zeroed on failure) and tolerates any
    // source address.
    unsafe {
        generated::bpf_probe_read_kernel(
            ptr::from_mut(&mut v).cast(),
            8,
            addr as *const core::ffi::c_void,
        )
    };
    v
}
