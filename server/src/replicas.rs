//! Replicas sharing one PostgreSQL database converge: a change any replica commits reaches the
//! nodes of every replica. Each replica publishes what it commits itself at once; this task
//! publishes what the others committed, when `store::postgres_listen` says something changed
//! and every `--resync-secs` regardless (a notification sent while the listener was
//! reconnecting is lost). Publishing is monotonic (revision, grants version), so a change seen
//! twice, or late, is pushed once.

use std::{sync::Arc, time::Duration};

use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    fleet::Fleet,
    grants::Grants,
    store::{PolicyStore, StoreError},
};

/// Runs until `stop`.
pub async fn converge_task(
    store: Arc<dyn PolicyStore>,
    fleet: Arc<Fleet>,
    grants: Arc<Grants>,
    wake: Arc<Notify>,
    every: Duration,
    mut stop: ShutdownSignal,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.wait() => return,
            () = wake.notified() => {}
            _ = tick.tick() => {}
        }
        if let Err(e) = policies(&*store, &fleet).await {
            warn!(error = %corral_runtime::error_chain(&e), "reading other replicas' policy changes failed");
        }
        if let Err(e) = grants.refresh().await {
            warn!(error = %corral_runtime::error_chain(&e), "reading other replicas' grant changes failed");
        }
    }
}

/// Publishes the database's policy set if it is newer than the one this replica serves.
async fn policies(store: &dyn PolicyStore, fleet: &Fleet) -> Result<(), StoreError> {
    let current = store.current().await?;
    let served = fleet.current().revision;
    if current.revision > served {
        info!(
            revision = current.revision,
            served, "policies changed on another replica"
        );
        fleet.publish(&current);
    }
    Ok(())
}
