//! Event emission: per-node sequence numbers and counted drops.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid};

use agent_common::EventHeader;

use crate::maps::{DROPS, EVENTS, SEQ};

/// Next per-node sequence number. Taken before the reserve, so a failed reserve leaves a gap
/// that the counted drop explains.
#[inline(always)]
fn next_seq() -> u64 {
    match SEQ.get_ptr_mut(0) {
        // SeqCst, not Relaxed: LLVM's BPF backend lowers a relaxed `atomicrmw add` to the
        // non-fetching XADD even when the result is used, so every event would get the same
        // number (caught by the accounting test).
        // SAFETY: array element pointer from the kernel, 8-byte aligned, valid for this run.
        Some(p) => (unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) }) + 1,
        None => 0,
    }
}

#[inline(always)]
pub fn count_drop() {
    if let Some(p) = DROPS.get_ptr_mut(0) {
        // SAFETY: per-CPU element, no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}

/// Fills the common header.
#[inline(always)]
pub fn header(kind: u8, cgroup_id: u64, principal: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        seq: next_seq(),
        // SAFETY: helper without arguments.
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id,
        tid: pid_tgid as u32,
        pid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        principal,
        kind,
        ..EventHeader::default()
    }
}

/// Writes `event` to the ring buffer or counts it as dropped.
#[inline(always)]
pub fn emit<T: Copy + 'static>(event: &T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(0);
        }
        None => count_drop(),
    }
}
