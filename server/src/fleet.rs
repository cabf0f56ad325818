//! The fleet: the revision every node should converge to (a watch channel, so a burst of
//! applies coalesces into the latest value), each node's sync state, and the fan-out of
//! forwarded events.

use std::{
    collections::BTreeMap,
    hash::{BuildHasher as _, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use corral_agent::daemon::hub::HubEvent;
use corral_proto::v1 as pb;
use tokio::sync::{broadcast, watch};

use crate::store::{StoreSnapshot, now_unix_nano};

/// The policy set at one revision, as nodes receive it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Current {
    pub revision: u64,
    /// Policy documents sorted by name.
    pub policies_yaml: Vec<String>,
}

impl From<&StoreSnapshot> for Current {
    fn from(s: &StoreSnapshot) -> Self {
        Self {
            revision: s.revision,
            policies_yaml: s.policies.iter().map(|p| p.yaml.clone()).collect(),
        }
    }
}

/// What the server knows about one node.
#[derive(Debug, Clone, Default)]
pub struct NodeEntry {
    /// The live stream's id; `None` when disconnected.
    pub conn: Option<u64>,
    pub peer: String,
    /// The revision the node said it enforced in its last `Hello`.
    pub hello_revision: u64,
    pub acked_revision: u64,
    pub acked_unix_nano: u64,
    pub nacked_revision: u64,
    pub nacked_unix_nano: u64,
    pub nack_detail: String,
    pub last_change_unix_nano: u64,
    pub events_forwarded: u64,
}

pub struct Fleet {
    current: watch::Sender<Arc<Current>>,
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    next_conn: AtomicU64,
    nonce_keys: RandomState,
    nonce_counter: AtomicU64,
    events: broadcast::Sender<Arc<HubEvent>>,
    /// Events forwarded by nodes.
    pub events_received: AtomicU64,
    /// Events fleet watchers lost because they read too slowly (summed over watchers).
    pub events_dropped: AtomicU64,
}

impl Fleet {
    pub fn new(snapshot: &StoreSnapshot, event_buffer: usize) -> Self {
        let (current, _) = watch::channel(Arc::new(Current::from(snapshot)));
        let (events, _) = broadcast::channel(event_buffer.max(16));
        Self {
            current,
            nodes: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(1),
            nonce_keys: RandomState::new(),
            nonce_counter: AtomicU64::new(0),
            events,
            events_received: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new revision: every connected node's stream is woken (older values are skipped).
    pub fn publish(&self, snapshot: &StoreSnapshot) {
        self.current.send_if_modified(|cur| {
            if snapshot.revision > cur.revision {
                *cur = Arc::new(Current::from(snapshot));
                true
            } else {
                false
            }
        });
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Arc<Current>> {
        self.current.subscribe()
    }

    /// A fresh nonce: random per server start, unique per snapshot sent.
    pub fn nonce(&self) -> String {
        let n = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:x}", self.nonce_keys.hash_one(n))
    }

    /// A node opened a stream; a newer stream of the same node supersedes an older one.
    pub fn connect(&self, node: &str, peer: String, hello_revision: u64) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.nodes();
        let e = nodes.entry(node.to_owned()).or_default();
        e.conn = Some(conn);
        e.peer = peer;
        e.hello_revision = hello_revision;
        e.last_change_unix_nano = now_unix_nano();
        conn
    }

    pub fn disconnect(&self, node: &str, conn: u64) {
        if let Some(e) = self.nodes().get_mut(node)
            && e.conn == Some(conn)
        {
            e.conn = None;
            e.last_change_unix_nano = now_unix_nano();
        }
    }

    pub fn ack(&self, node: &str, revision: u64) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.acked_revision = e.acked_revision.max(revision);
            e.acked_unix_nano = now_unix_nano();
        }
    }

    pub fn nack(&self, node: &str, revision: u64, detail: String) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.nacked_revision = e.nacked_revision.max(revision);
            e.nacked_unix_nano = now_unix_nano();
            e.nack_detail = detail;
        }
    }

    pub fn node(&self, node: &str) -> Option<NodeEntry> {
        self.nodes().get(node).cloned()
    }

    pub fn status(&self) -> Vec<pb::NodeStatus> {
        self.nodes()
            .iter()
            .map(|(name, e)| pb::NodeStatus {
                node: name.clone(),
                connected: e.conn.is_some(),
                acked_revision: e.acked_revision,
                nacked_revision: e.nacked_revision,
                nack_detail: e.nack_detail.clone(),
                acked_unix_nano: e.acked_unix_nano,
                nacked_unix_nano: e.nacked_unix_nano,
                peer: e.peer.clone(),
                events_forwarded: e.events_forwarded,
            })
            .collect()
    }

    /// An event a node forwarded; the node name is the stream's, whatever the event says.
    pub fn forward_event(&self, node: &str, mut e: pb::Event) {
        e.node = node.to_owned();
        self.events_received.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.nodes().get_mut(node) {
            n.events_forwarded += 1;
        }
        // No watcher: nothing to deliver to.
        let _ = self.events.send(Arc::new(HubEvent::from_pb(&e)));
    }

    pub fn watch_events(&self) -> broadcast::Receiver<Arc<HubEvent>> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PolicyRecord;

    fn snap(revision: u64, yaml: &[&str]) -> StoreSnapshot {
        StoreSnapshot {
            revision,
            policies: yaml
                .iter()
                .map(|y| PolicyRecord {
                    name: (*y).into(),
                    yaml: (*y).into(),
                    revision,
                    applied_by: String::new(),
                    applied_unix_nano: 0,
                    deleted: false,
                })
                .collect(),
        }
    }

    #[test]
    fn a_burst_coalesces_to_the_latest_revision_and_never_goes_back() {
        let f = Fleet::new(&snap(1, &["a"]), 16);
        let mut rx = f.watch();
        rx.mark_unchanged();
        f.publish(&snap(2, &["b"]));
        f.publish(&snap(3, &["c"]));
        f.publish(&snap(2, &["old"]));
        assert!(rx.has_changed().unwrap_or(false));
        let cur = rx.borrow_and_update().clone();
        assert_eq!(cur.revision, 3);
        assert_eq!(cur.policies_yaml, ["c"]);
        assert!(!rx.has_changed().unwrap_or(true));
    }

    #[test]
    fn nonces_are_unique_and_a_superseded_stream_does_not_disconnect_the_node() {
        let f = Fleet::new(&StoreSnapshot::default(), 16);
        let a = f.nonce();
        assert_ne!(a, f.nonce());
        let c1 = f.connect("n", "p1".into(), 0);
        let c2 = f.connect("n", "p2".into(), 0);
        f.disconnect("n", c1);
        assert!(f.status()[0].connected);
        f.ack("n", 4);
        f.nack("n", 5, "too many rules".into());
        f.disconnect("n", c2);
        let s = &f.status()[0];
        assert!(!s.connected);
        assert_eq!((s.acked_revision, s.nacked_revision), (4, 5));
        assert_eq!(s.nack_detail, "too many rules");
    }
}
