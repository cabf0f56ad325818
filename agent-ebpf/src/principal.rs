//! Principal resolution: sticky attribution first, then the calling task's cgroup and its
//! ancestors (bounded walk).
//!
//! Attribution is sticky: the first time a process of a principal is seen (any hook, or the
//! `sched_process_fork` of its parent), its tgid is recorded in `STICKY` with the principal's
//! cgroup id; from then on it is that principal's whatever cgroup it moves to (a root process
//! writing itself into `<cgroup2 root>/cgroup.procs` changes nothing), and so is every process
//! it forks. `sched_process_exit` removes a task's entry, so a reused pid is never
//! attributed. If the principal has gone (its cgroup id is no longer in `PRINCIPALS`), the
//! cgroup walk decides again. Minimum kernel: 4.7 (tracepoints), as the rest.
//!
//! The un-enrolled fast path. Most calls on a node come from processes that are nobody's, and
//! they pay for the hook too. Two hash lookups (`STICKY`, then `PRINCIPALS` for the ancestor)
//! are replaced by two array reads:
//! - `STICKY_MARK`, one bit per pid, set before a `STICKY` entry is inserted and cleared after
//!   it is removed: a clear bit means "no sticky entry", so no `STICKY` lookup;
//! - `UNENROLLED`, per CPU: cgroups the walk found in no principal, tagged with the principals'
//!   generation the agent bumps after each principal it adds. A cgroup (or an ancestor) that
//!   becomes a principal invalidates every entry at once; a principal removed only makes more
//!   cgroups un-enrolled, so it needs no bump. Cgroup ids are never reused.

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use agent_common::{Config, MAX_CGROUP_LEVEL, Principal, Unenrolled, maps::limits};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{
    CONFIG, EXIT_CFG, FORK_CFG, PRINCIPALS, PRINCIPALS_GEN, STICKY, STICKY_MARK, UNENROLLED,
};

/// A resolved caller: which principal, and which of its cgroups matched.
pub struct Caller {
    pub principal: Principal,
    pub cgroup_id: u64,
}

#[inline(always)]
pub fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

impl Caller {
    /// The caller's policy slot in the live generation, or `NONE` (enrolled without policy).
    #[inline(always)]
    pub fn policy_slot(&self, cfg: &Config) -> u32 {
        if cfg.generation & 1 == 0 {
            self.principal.policy[0]
        } else {
            self.principal.policy[1]
        }
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The principal of the current task: its sticky entry, else the cgroup walk (which records a
/// sticky entry for the process). `None`: not enrolled, not policed.
#[inline(always)]
pub fn resolve(cfg: &Config) -> Option<Caller> {
    if cfg.level_mask == 0 {
        // No principal anywhere: nothing to be attributed to (the common fast path).
        return None;
    }
    let tgid = current_tgid();
    resolve_marked(cfg, tgid, may_be_sticky(tgid))
}

/// [`resolve`] for the current task, whose tgid and its mark (`sticky`: [`may_be_sticky`])
/// the caller has read already, so the hot path reads each once.
#[inline(always)]
pub fn resolve_marked(cfg: &Config, tgid: u32, sticky: bool) -> Option<Caller> {
    if cfg.level_mask == 0 {
        return None;
    }
    if sticky && let Some(caller) = sticky_caller(tgid) {
        return Some(caller);
    }
    // Read before the walk: an entry stored under it is stale once a principal is added
    // after (the agent inserts the principal, then bumps the generation).
    let generation = PRINCIPALS_GEN.get(0).copied().unwrap_or(0);
    // SAFETY: helper call without arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    let slot = UNENROLLED.get_ptr_mut((own as u32) & (limits::UNENROLLED_SLOTS - 1));
    if let Some(e) = slot
        // SAFETY: pointer returned by a map lookup, valid for this program run.
        && unsafe { (*e).holds(own, generation) }
    {
        return None;
    }
    let Some(caller) = walk(cfg) else {
        if let Some(e) = slot {
            // SAFETY: as above; this CPU's slot (a torn write fails `holds`).
            unsafe { *e = Unenrolled::new(own, generation) };
        }
        return None;
    };
    // A full map leaves the process to the cgroup walk, as before stickiness.
    mark(tgid);
    let _ = STICKY.insert(tgid, caller.cgroup_id, 0);
    Some(caller)
}

/// The principal `tgid` is stickily attributed to, if it has an entry and that principal is
/// still enrolled.
#[inline(always)]
pub(crate) fn sticky_caller(tgid: u32) -> Option<Caller> {
    // SAFETY: map value read, valid for this program run.
    let cg = unsafe { STICKY.get(tgid) }.copied()?;
    let p = PRINCIPALS.get_ptr(cg)?;
    Some(Caller {
        // SAFETY: pointer returned by a map lookup, valid for this program run.
        principal: unsafe { *p },
        cgroup_id: cg,
    })
}

/// Whether `STICKY` may hold an entry for `pid` (its mark is set, or it is beyond the bitmap).
#[inline(always)]
pub(crate) fn may_be_sticky(pid: u32) -> bool {
    match STICKY_MARK.get(pid >> 6) {
        Some(w) => *w & (1u64 << (pid & 63)) != 0,
        None => true,
    }
}

/// Sets `pid`'s mark (before its `STICKY` entry is inserted).
#[inline(always)]
fn mark(pid: u32) {
    if let Some(w) = STICKY_MARK.get_ptr_mut(pid >> 6) {
        // SAFETY: pointer returned by a map lookup, valid for this program run; atomic, as
        // other CPUs set and clear other bits of the word.
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(w, 1u64 << (pid & 63)) };
    }
}

/// Clears `pid`'s mark (after its `STICKY` entry was removed).
#[inline(always)]
fn unmark(pid: u32) {
    if let Some(w) = STICKY_MARK.get_ptr_mut(pid >> 6) {
        // SAFETY: as in `mark`.
        unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(w, !(1u64 << (pid & 63))) };
    }
}

/// Looks up the current task's ancestors at the levels where principals exist (deepest first),
/// so children, daemonised grandchildren and nested sub-cgroups stay attributed.
#[inline(always)]
pub(crate) fn walk(cfg: &Config) -> Option<Caller> {
    let mut level = MAX_CGROUP_LEVEL;
    // Bounded: at most MAX_CGROUP_LEVEL + 1 iterations.
    loop {
        if cfg.level_mask & (1u32 << level) != 0 {
            // SAFETY: helper call with a plain integer argument.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id != 0
                && let Some(p) = PRINCIPALS.get_ptr(id)
            {
                // SAFETY: pointer returned by a map lookup, valid for this program run.
                let principal = unsafe { *p };
                return Some(Caller {
                    principal,
                    cgroup_id: id,
                });
            }
        }
        // No principal at a lower level: stop here (with principals at one level, the usual
        // case, an un-enrolled caller costs one ancestor id and one hash miss).
        if level == 0 || cfg.level_mask & ((1u32 << level) - 1) == 0 {
            return None;
        }
        level -= 1;
    }
}

/// `sched_process_fork`, in the parent: the child (a process, or a thread: keyed by its tid,
/// removed when it exits) inherits the parent's principal.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sticky_fork(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let Some(parent) = resolve(&cfg) else {
        return 0;
    };
    let Some(&offset) = FORK_CFG.get(0) else {
        return 0;
    };
    if offset == 0 {
        return 0;
    }
    // SAFETY: a read within the tracepoint record at the offset tracefs gave for `child_pid`.
    if let Ok(child) = unsafe { ctx.read_at::<i32>(offset as usize) } {
        mark(child as u32);
        let _ = STICKY.insert(child as u32, parent.cgroup_id, u64::from(BPF_NOEXIST));
    }
    0
}

/// `sched_process_exit`, in each exiting thread: a thread's own entry (from
/// `sticky_fork`) goes with it; the process's entry (its tgid) goes when the whole thread
/// group is dead (`group_dead`, 6.16+), since only then may the tgid be reused. A leader that
/// exits before its other threads stays a zombie holding the tgid, so the entry must stay,
/// or a remaining thread could leave the cgroup and be nobody's. Without the field, the
/// entry goes with the leader (the older behaviour).
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sticky_exit(ctx: TracePointContext) -> u32 {
    if config().level_mask == 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if tid != tgid {
        let _ = STICKY.remove(tid);
        unmark(tid);
    }
    let group_dead = match EXIT_CFG.get(0) {
        // SAFETY: a read within the tracepoint record at the offset tracefs gave for
        // `group_dead`; unreadable counts as dead (never leave a reusable pid attributed).
        Some(&offset) if offset != 0 => {
            !matches!(unsafe { ctx.read_at::<u8>(offset as usize) }, Ok(0))
        }
        _ => tid == tgid,
    };
    if group_dead {
        let _ = STICKY.remove(tgid);
        unmark(tgid);
    }
    0
}
