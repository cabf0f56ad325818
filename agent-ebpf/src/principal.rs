//! Principal resolution: the calling task's cgroup and its ancestors, bounded walk.

use agent_common::{Config, MAX_CGROUP_LEVEL, Principal};
use aya_ebpf::helpers::generated::bpf_get_current_ancestor_cgroup_id;

use crate::maps::{CONFIG, PRINCIPALS};

/// A resolved caller: which principal, and which of its cgroups matched.
pub struct Caller {
    pub principal: Principal,
    pub cgroup_id: u64,
}

#[inline(always)]
pub fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Looks up the current task's ancestors at the levels where principals exist (deepest first),
/// so children, daemonised grandchildren and nested sub-cgroups stay attributed.
/// `None`: not enrolled, not policed.
#[inline(always)]
pub fn resolve(cfg: &Config) -> Option<Caller> {
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
