//! Replicas sharing one PostgreSQL database converge: a change any replica commits reaches the
//! nodes of every replica. Each replica publishes what it commits itself at once; this task
//! publishes what the others committed, when `store::postgres_listen` says something changed
//! and every `--resync-secs` regardless (a notification sent while the listener was
//! reconnecting is lost). Publishing is monotonic (revision, grants version), so a change seen
//! twice, or late, is pushed once.
//!
//! Node registrations: [`register_task`] records this replica's nodes in the database, and
//! [`Peers`] reads the others', so `Status` shows the whole fleet on any replica (and `corral
//! policy apply` waits for every node) and a grant request is checked against the sessions
//! of every replica's nodes.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use corral_proto::v1 as pb;
use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    fleet::Fleet,
    grants::Grants,
    store::{
        PolicyStore, StoreError,
        nodes::{NodeRecord, NodeRegistry},
        now_unix_nano,
    },
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

/// How often a replica renews its nodes' records; a record older than [`STALE`] belongs to a
/// replica that is gone and reads as disconnected.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const STALE: Duration = Duration::from_secs(5);
/// Changes within this window are recorded together.
const BATCH: Duration = Duration::from_millis(10);

/// Records this replica's nodes in the database when they change, and renews them every
/// [`HEARTBEAT`], until `stop`.
pub async fn register_task(
    registry: Arc<dyn NodeRegistry>,
    fleet: Arc<Fleet>,
    mut stop: ShutdownSignal,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Everything once at start, then what changed.
    let mut all = true;
    loop {
        let beat = tokio::select! {
            () = stop.wait() => return,
            () = fleet.nodes_changed.notified() => false,
            _ = tick.tick() => true,
        };
        tokio::time::sleep(BATCH).await;
        let now = now_unix_nano();
        let records = fleet.take_records(std::mem::take(&mut all));
        let mut res = registry.put_nodes(fleet.replica(), &records, now).await;
        if beat && res.is_ok() {
            res = registry.heartbeat(fleet.replica(), now).await;
        }
        if let Err(e) = res {
            // Written again in full at the next heartbeat.
            all = true;
            warn!(error = %corral_runtime::error_chain(&e), "recording this replica's nodes failed");
        }
    }
}

/// The fleet as every replica sees it: this replica's nodes and, for the others, their
/// records in the database.
pub struct Peers {
    registry: Arc<dyn NodeRegistry>,
    /// The last read of the node records and when it was made. `corral policy apply` asks
    /// for the status every 10 ms while it waits, and any number of clients may: they share
    /// one database read per [`FRESH`] (the lock makes concurrent callers wait for one read).
    cache: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<Vec<NodeRecord>>)>>,
}

/// How long one read of the node records answers status calls: below the registrar's own
/// batching delay plus the poll interval, so an ACK recorded by another replica shows at most
/// this much later.
const FRESH: Duration = Duration::from_millis(20);

impl Peers {
    pub fn new(registry: Arc<dyn NodeRegistry>) -> Self {
        Self {
            registry,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// Every node record, read at most once per [`FRESH`].
    async fn records(&self) -> Result<Arc<Vec<NodeRecord>>, StoreError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, v)) = cache.as_ref()
            && at.elapsed() < FRESH
        {
            return Ok(v.clone());
        }
        let v = Arc::new(self.registry.nodes().await?);
        *cache = Some((tokio::time::Instant::now(), v.clone()));
        Ok(v)
    }

    /// Records of other replicas' nodes, a stale one read as disconnected.
    async fn others(&self, fleet: &Fleet) -> Result<Vec<NodeRecord>, StoreError> {
        let fresh_after = now_unix_nano().saturating_sub(STALE.as_nanos() as u64);
        let mut v: Vec<NodeRecord> = self
            .records()
            .await?
            .iter()
            .filter(|r| r.status.replica != fleet.replica())
            .cloned()
            .collect();
        for r in &mut v {
            r.status.connected &= r.heartbeat_unix_nano >= fresh_after;
        }
        Ok(v)
    }

    /// Every node: this replica's own view of a node it has connected wins, then a connected
    /// record of another replica, then whichever view remains.
    pub async fn status(&self, fleet: &Fleet) -> Result<Vec<pb::NodeStatus>, StoreError> {
        let mut by_name: BTreeMap<String, pb::NodeStatus> = fleet
            .status()
            .into_iter()
            .map(|n| (n.node.clone(), n))
            .collect();
        for r in self.others(fleet).await? {
            match by_name.get(&r.status.node) {
                Some(mine) if mine.connected || !r.status.connected => {}
                _ => {
                    by_name.insert(r.status.node.clone(), r.status);
                }
            }
        }
        Ok(by_name.into_values().collect())
    }

    /// Whether a connected node of any replica reports `identity`'s `session`.
    pub async fn session_known(
        &self,
        fleet: &Fleet,
        identity: &str,
        session: &str,
    ) -> Result<bool, StoreError> {
        if fleet.session_known(identity, session) {
            return Ok(true);
        }
        Ok(self.others(fleet).await?.iter().any(|r| {
            r.status.connected
                && r.principals
                    .iter()
                    .any(|(i, s)| i == identity && s == session)
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A registry that counts its reads.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait::async_trait]
    impl NodeRegistry for Counting {
        async fn put_nodes(&self, _: &str, _: &[NodeRecord], _: u64) -> Result<(), StoreError> {
            Ok(())
        }
        async fn heartbeat(&self, _: &str, _: u64) -> Result<(), StoreError> {
            Ok(())
        }
        async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn status_polls_share_one_read_of_the_node_records_per_fresh_period() {
        let reg = Arc::new(Counting::default());
        let peers = Arc::new(Peers::new(reg.clone()));
        // Twenty callers at once, then again right after: one read (or, on a machine so slow
        // that this took longer than a period, one per period).
        let t = tokio::time::Instant::now();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let p = peers.clone();
                tokio::spawn(async move { p.records().await.map(|v| v.len()) })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.ok().and_then(Result::ok), Some(0));
        }
        assert!(peers.records().await.is_ok());
        let periods = (t.elapsed().as_millis() / FRESH.as_millis()) as usize;
        let reads = reg.0.load(Ordering::SeqCst);
        assert!(
            (1..=1 + periods).contains(&reads),
            "{reads} reads in {periods} periods"
        );
        // Once the period is over, the next call reads again.
        tokio::time::sleep(FRESH + Duration::from_millis(5)).await;
        assert!(peers.records().await.is_ok());
        assert_eq!(reg.0.load(Ordering::SeqCst), reads + 1);
    }
}
