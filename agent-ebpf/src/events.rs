//! Event emission: per-node sequence numbers and counted drops.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::bindings::{
    BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE,
};
use aya_ebpf::helpers::generated::{bpf_ktime_get_boot_ns, bpf_ktime_get_ns};
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid};

use agent_common::{Config, EventHeader, RateState, VERDICT_ALLOW};

use crate::maps::{DROPS, EVENTS, RATE, SEQ, WAKE};

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
    count_drops(1);
}

#[inline(always)]
pub fn count_drops(n: u64) {
    if let Some(p) = DROPS.get_ptr_mut(0) {
        // SAFETY: per-CPU element, no other writer on this CPU while we run.
        unsafe { *p += n };
    }
}

/// Fills the common header for the current task.
#[inline(always)]
pub fn header(kind: u8, cgroup_id: u64, principal: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    header_for(
        kind,
        cgroup_id,
        principal,
        (pid_tgid >> 32) as u32,
        pid_tgid as u32,
        bpf_get_current_uid_gid() as u32,
    )
}

/// Fills the common header for process `pid` (thread `tid`) of user `uid`: for programs that do
/// not run in the context of the process concerned (packets sent from softirq or a timer).
#[inline(always)]
pub fn header_for(
    kind: u8,
    cgroup_id: u64,
    principal: u32,
    pid: u32,
    tid: u32,
    uid: u32,
) -> EventHeader {
    EventHeader {
        seq: next_seq(),
        // SAFETY: helper without arguments.
        time_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id,
        tid,
        pid,
        uid,
        principal,
        kind,
        ..EventHeader::default()
    }
}

/// The submit flags for a record with `verdict`: when to wake the reader.
///
/// Waking the reader costs an interrupt per record (an inter-processor interrupt, which a VM
/// pays dearly): it tripled the cost of an allowed UDP connect when the reader kept up, and
/// doubled a denied one's. The reader also drains on a timer (the agent every 20 ms), which
/// bounds any record's delay. So:
/// - an allow does not wake it, unless a quarter of the ring (`BPF_RB_RING_SIZE`) is unread;
/// - a deny or audit-deny wakes it at once (if it has caught up: the kernel's default), unless
///   this CPU woke it for one less than [`DENY_WAKE_NS`] ago: the first deny of a burst is
///   read at once, the rest within the timer's period (never lost: only later).
///
/// Minimum kernel: 5.8 (as the ring buffer itself).
#[inline(always)]
pub fn submit_flags(verdict: u8) -> u64 {
    let unread = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let filling = unread.saturating_mul(4) >= EVENTS.query(u64::from(BPF_RB_RING_SIZE));
    if filling {
        return u64::from(BPF_RB_FORCE_WAKEUP);
    }
    if verdict == VERDICT_ALLOW {
        return u64::from(BPF_RB_NO_WAKEUP);
    }
    let Some(last) = WAKE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot of a per-CPU array, valid for this run. A program on this CPU
    // interleaving with this one can only cost one wakeup more or fewer.
    unsafe {
        if now.wrapping_sub(*last) < DENY_WAKE_NS {
            return u64::from(BPF_RB_NO_WAKEUP);
        }
        *last = now;
    }
    0
}

/// How long after a deny woke the reader further denies on that CPU do not (1 ms).
pub const DENY_WAKE_NS: u64 = 1_000_000;

/// Writes `event` (whose header says `verdict`) to the ring buffer or counts it as dropped;
/// true if written.
#[inline(always)]
pub fn emit<T: Copy + 'static>(event: &T, verdict: u8) -> bool {
    let flags = submit_flags(verdict);
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(flags);
            true
        }
        None => {
            count_drop();
            false
        }
    }
}

/// The principal's rate-limiter entry, created on first use (principals adopted from an older
/// agent have none yet).
#[inline(always)]
fn rate_state(principal: u32) -> Option<*mut RateState> {
    if let Some(p) = RATE.get_ptr_mut(principal) {
        return Some(p);
    }
    // Another CPU may create it first: BPF_NOEXIST fails then, and the lookup finds theirs.
    let _ = RATE.insert(principal, RateState::default(), u64::from(BPF_NOEXIST));
    RATE.get_ptr_mut(principal)
}

/// Whether an allow event of `principal` may be emitted under `cfg.allow_rate` (GCRA: a token
/// bucket kept in one word). A suppressed event is counted in the principal's `RATE` entry.
/// Deny and audit-deny events must not come here: they are never limited.
/// Minimum kernel: 5.12 (BPF atomic compare-and-exchange); without a rate configured (the
/// default) nothing here runs.
#[inline(always)]
pub fn allow_event_permitted(cfg: &Config, principal: u32) -> bool {
    if cfg.allow_rate == 0 {
        return true;
    }
    let Some(state) = rate_state(principal) else {
        // The map is full: not limited (never silently lost).
        return true;
    };
    let rate = u64::from(cfg.allow_rate);
    let burst = if cfg.allow_burst == 0 {
        rate
    } else {
        u64::from(cfg.allow_burst)
    };
    let interval = 1_000_000_000 / rate;
    let tolerance = interval * (burst - 1);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: map value pointer, 8-byte aligned, valid for this run; every writer of these
    // fields uses atomic operations.
    unsafe {
        let tat_ptr = core::ptr::addr_of_mut!((*state).tat_ns);
        // Bounded retries under contention; if they all lose, emit (counted as delivered).
        for _ in 0..4 {
            let tat = core::ptr::read_volatile(tat_ptr);
            let base = if tat > now { tat } else { now };
            if base - now > tolerance {
                atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                    core::ptr::addr_of_mut!((*state).suppressed),
                    1,
                );
                return false;
            }
            let (_, swapped) = atomic_cxchg::<
                u64,
                { AtomicOrdering::SeqCst },
                { AtomicOrdering::SeqCst },
            >(tat_ptr, tat, base + interval);
            if swapped {
                return true;
            }
        }
    }
    true
}

/// Takes the principal's count of suppressed allow events, to be carried on the event about to
/// be emitted. If that event is then lost, give the count back with [`restore_suppressed`].
#[inline(always)]
pub fn take_suppressed(principal: u32) -> u32 {
    let Some(state) = RATE.get_ptr_mut(principal) else {
        return 0;
    };
    // SAFETY: map value pointer, 8-byte aligned, valid for this run.
    unsafe {
        let p = core::ptr::addr_of_mut!((*state).suppressed);
        let pending = core::ptr::read_volatile(p);
        if pending == 0 {
            return 0;
        }
        let take = if pending > u64::from(u32::MAX) {
            u64::from(u32::MAX)
        } else {
            pending
        };
        // Subtract exactly what is taken: increments racing with us stay counted.
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, take.wrapping_neg());
        take as u32
    }
}

/// Adds `count` allow calls not reported one by one (see repeat.rs) to the principal's
/// suppressed count, carried on its next event.
#[inline(always)]
pub fn add_suppressed(principal: u32, count: u32) {
    if count == 0 {
        return;
    }
    match rate_state(principal) {
        // SAFETY: map value pointer, 8-byte aligned, valid for this run.
        Some(state) => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                core::ptr::addr_of_mut!((*state).suppressed),
                u64::from(count),
            );
        },
        // The map is full: counted as dropped rather than lost.
        None => count_drops(u64::from(count)),
    }
}

/// Gives back a count taken by [`take_suppressed`] whose event was dropped.
#[inline(always)]
pub fn restore_suppressed(principal: u32, count: u32) {
    if count == 0 {
        return;
    }
    if let Some(state) = RATE.get_ptr_mut(principal) {
        // SAFETY: as in `take_suppressed`.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                core::ptr::addr_of_mut!((*state).suppressed),
                u64::from(count),
            )
        };
    }
}
