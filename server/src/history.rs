//! The event history's writer: every event on the fleet stream (forwarded by nodes, or the
//! server's own) is appended to the store's [`EventLog`] in batches, which keeps the newest
//! `--event-history` events. It reads the stream as a watcher does: if it falls behind by more
//! than the stream's buffer, or the database fails, the events it misses are counted
//! (`events_not_recorded` in `corral policy status`) and logged, never silently lost.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

use crate::{fleet::Fleet, store::events::EventLog};

/// Events written in one transaction at most.
const BATCH: usize = 1_024;
/// How long an event may wait for its batch to fill.
const LINGER: Duration = Duration::from_millis(100);

/// Records the fleet's events until `stop`; `keep` is the history's size.
pub async fn record_task(
    fleet: Arc<Fleet>,
    log: Arc<dyn EventLog>,
    keep: u64,
    mut stop: ShutdownSignal,
) {
    let mut rx = fleet.watch_events();
    let mut batch: Vec<(String, u64, Vec<u8>)> = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            _ = stop.wait() => return,
            e = rx.recv() => e,
        };
        let mut next = Some(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while let Some(e) = next.take() {
            match e {
                Ok(e) => {
                    if let Ok(ev) = e.to_pb() {
                        batch.push((ev.node, ev.time_unix_nano, e.encoded.to_vec()));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    fleet.events_not_recorded.fetch_add(n, Ordering::Relaxed);
                    warn!(lost = n, "the event history fell behind the fleet's events");
                }
                Err(RecvError::Closed) => return,
            }
            if batch.len() >= BATCH {
                break;
            }
            next = tokio::time::timeout_at(deadline, rx.recv()).await.ok();
        }
        if batch.is_empty() {
            continue;
        }
        let events = std::mem::take(&mut batch);
        let n = events.len() as u64;
        match log.append(&events, keep).await {
            Ok(()) => {
                fleet.events_recorded.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                fleet.events_not_recorded.fetch_add(n, Ordering::Relaxed);
                warn!(lost = n, error = %corral_runtime::error_chain(&e), "cannot record events in the history");
            }
        }
    }
}
