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
use crate::ebpf::exec_rules::{RESTAT_INTERVAL, resolve_in};

/// One pass: find the live container views, re-stat every policy's exec rules in the agent's
/// view and in the views of the containers it governs, and install what changed.
pub fn restat(shared: &Shared) {
    let (version, watched) = {
        let mut enf = shared.enforcer();
        // Under the lock: a container recorded after this read bumps the version below, and
        // this pass's stale resolutions are then dropped.
        let containers = shared.container_views.live();
        let exec = enf.maps().exec();
        exec.set_containers(containers);
        // The views of each policy key, decided by the policy generation that key belongs to.
        let state = shared.policy_state();
        let watched = exec
            .watched()
            .into_iter()
            .map(|(key, rules)| {
                let governs = |identity: &str| {
                    state.by_key(key).is_some_and(|g| {
                        g.compiled.policy_for(identity) == Some(agent_common::policy_key_slot(key))
                    })
                };
                (key, rules, exec.views_for(governs))
            })
            .collect::<Vec<_>>();
        (exec.containers_version(), watched)
    };
    for (policy, rules, views) in watched {
        let fresh = resolve_in(&rules, &views);
        let mut enf = shared.enforcer();
        let exec = enf.maps().exec();
        if exec.containers_version() != version {
            return;
        }
        match exec.refresh(policy, &rules, views, fresh) {
            Ok(0) => {}
            Ok(n) => info!(
                policy,
                entries = n,
                "exec rule paths changed on disk (or a container view came or went); exec maps updated"
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
