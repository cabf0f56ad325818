//! Re-stats the exec rule paths in force every
//! [`RESTAT_INTERVAL`](crate::ebpf::exec_rules::RESTAT_INTERVAL) and updates the exec maps
//! where a path's identity changed (replaced by a new inode, created after the policy was
//! written, removed, retargeted symlink). Why polling and not inotify: see
//! [`crate::ebpf::exec_rules`].
//!
//! The `stat`s run without the enforcer lock (a slow filesystem cannot stall the API or a
//! policy apply); the lock is taken per policy only to install a change, and a change is
//! dropped if the policy was rewritten meanwhile (the new write statted the paths itself).

use std::sync::Arc;

use corral_runtime::shutdown::ShutdownSignal;
use tracing::{error, info, warn};

use super::Shared;
use crate::ebpf::exec_rules::{RESTAT_INTERVAL, resolve};

/// One pass: re-stat every policy's exec rules and install what changed.
pub fn restat(shared: &Shared) {
    let watched = shared.enforcer().maps().exec().watched();
    for (policy, rules) in watched {
        let fresh = resolve(&rules);
        match shared
            .enforcer()
            .maps()
            .exec()
            .refresh(policy, &rules, fresh)
        {
            Ok(0) => {}
            Ok(n) => info!(
                policy,
                entries = n,
                "exec rule paths changed on disk; exec maps updated"
            ),
            Err(e) => {
                warn!(policy, error = %corral_runtime::error_chain(&e), "update exec maps after a re-stat")
            }
        }
    }
}

pub async fn run(shared: Arc<Shared>, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval(RESTAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {
                let s = shared.clone();
                // stat and map writes are blocking syscalls: off the async workers.
                if let Err(e) = tokio::task::spawn_blocking(move || restat(&s)).await {
                    error!(error = %e, "exec re-stat task failed");
                }
            }
        }
    }
}
