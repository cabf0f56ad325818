//! The fleet: the revision every node should converge to (a watch channel, so a burst of
//! applies coalesces into the latest value), each node's sync state, and the fan-out of
//! forwarded events.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher as _, RandomState},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use corral_events::hub::HubEvent;
use corral_proto::v1 as pb;
use tokio::sync::{broadcast, watch};

use crate::store::{StoreSnapshot, nodes::NodeRecord, now_unix_nano};

/// What nodes receive: the policy set at one revision and the issued, unexpired grants.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Current {
    pub revision: u64,
    /// Policy documents sorted by name.
    pub policies_yaml: Vec<String>,
    /// Active grants, by id (absolute expiry).
    pub grants: Vec<pb::ActiveGrant>,
    /// Changes (grows) whenever `grants` changes; 0 before the first grant.
    pub grants_version: u64,
}

impl Current {
    fn with_policies(s: &StoreSnapshot, grants: Vec<pb::ActiveGrant>, grants_version: u64) -> Self {
        Self {
            revision: s.revision,
            policies_yaml: s.policies.iter().map(|p| p.yaml.clone()).collect(),
            grants,
            grants_version,
        }
    }
}

impl From<&StoreSnapshot> for Current {
    fn from(s: &StoreSnapshot) -> Self {
        Self::with_policies(s, Vec::new(), 0)
    }
}

/// A principal a node reported: (identity, session).
pub type PrincipalKey = (String, String);

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
    /// The principals in the node's latest `Principals` report (kept while disconnected:
    /// only connected nodes count for session checks).
    pub principals: BTreeSet<PrincipalKey>,
}

pub struct Fleet {
    current: watch::Sender<Arc<Current>>,
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    /// This replica's name, in its nodes' status.
    replica: String,
    /// Nodes whose state changed since the registrar last recorded them (`replicas.rs`).
    dirty: Mutex<BTreeSet<String>>,
    pub nodes_changed: tokio::sync::Notify,
    next_conn: AtomicU64,
    nonce_keys: RandomState,
    nonce_counter: AtomicU64,
    events: broadcast::Sender<Arc<HubEvent>>,
    /// Grant changes the server itself published on the event stream.
    pub server_events: AtomicU64,
    /// Events forwarded by nodes.
    pub events_received: AtomicU64,
    /// Events fleet watchers lost because they read too slowly (summed over watchers).
    pub events_dropped: AtomicU64,
    /// Events kept in the event history, and events it missed (see `history.rs`).
    pub events_recorded: AtomicU64,
    pub events_not_recorded: AtomicU64,
}

impl Fleet {
    pub fn new(snapshot: &StoreSnapshot, event_buffer: usize) -> Self {
        let (current, _) = watch::channel(Arc::new(Current::from(snapshot)));
        let (events, _) = broadcast::channel(event_buffer.max(16));
        Self {
            current,
            nodes: Mutex::new(BTreeMap::new()),
            replica: String::new(),
            dirty: Mutex::new(BTreeSet::new()),
            nodes_changed: tokio::sync::Notify::new(),
            next_conn: AtomicU64::new(1),
            nonce_keys: RandomState::new(),
            nonce_counter: AtomicU64::new(0),
            events,
            server_events: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            events_recorded: AtomicU64::new(0),
            events_not_recorded: AtomicU64::new(0),
        }
    }

    /// Names this replica (shown in its nodes' status).
    #[must_use]
    pub fn named(mut self, replica: &str) -> Self {
        replica.clone_into(&mut self.replica);
        self
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `node`'s state changed: the registrar records it.
    fn touched(&self, node: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_owned());
        self.nodes_changed.notify_one();
    }

    /// The nodes changed since the last call (every node if `all`), as records.
    pub fn take_records(&self, all: bool) -> Vec<NodeRecord> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
        let nodes = self.nodes();
        let pick = |name: &String| all || dirty.contains(name);
        nodes
            .iter()
            .filter(|(n, _)| pick(n))
            .map(|(name, e)| NodeRecord {
                status: self.node_status(name, e),
                principals: e.principals.iter().cloned().collect(),
                heartbeat_unix_nano: 0,
            })
            .collect()
    }

    fn node_status(&self, name: &str, e: &NodeEntry) -> pb::NodeStatus {
        pb::NodeStatus {
            node: name.to_owned(),
            connected: e.conn.is_some(),
            acked_revision: e.acked_revision,
            nacked_revision: e.nacked_revision,
            nack_detail: e.nack_detail.clone(),
            acked_unix_nano: e.acked_unix_nano,
            nacked_unix_nano: e.nacked_unix_nano,
            peer: e.peer.clone(),
            events_forwarded: e.events_forwarded,
            replica: self.replica.clone(),
        }
    }

    /// A new revision: every connected node's stream is woken (older values are skipped).
    pub fn publish(&self, snapshot: &StoreSnapshot) {
        self.current.send_if_modified(|cur| {
            if snapshot.revision > cur.revision {
                *cur = Arc::new(Current::with_policies(
                    snapshot,
                    cur.grants.clone(),
                    cur.grants_version,
                ));
                true
            } else {
                false
            }
        });
    }

    /// A new grant set at `version`: every connected node's stream is woken, unless the set
    /// is unchanged or `version` is not newer than the one published.
    pub fn publish_grants(&self, version: u64, grants: Vec<pb::ActiveGrant>) -> bool {
        self.current.send_if_modified(|cur| {
            if version <= cur.grants_version || grants == cur.grants {
                return false;
            }
            *cur = Arc::new(Current {
                revision: cur.revision,
                policies_yaml: cur.policies_yaml.clone(),
                grants,
                grants_version: version,
            });
            true
        })
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
        drop(nodes);
        self.touched(node);
        conn
    }

    pub fn disconnect(&self, node: &str, conn: u64) {
        if let Some(e) = self.nodes().get_mut(node)
            && e.conn == Some(conn)
        {
            e.conn = None;
            e.last_change_unix_nano = now_unix_nano();
        } else {
            return;
        }
        self.touched(node);
    }

    /// A node's full set of enrolled principals. Returns the principals that left this
    /// node's set and that no other connected node reports (their sessions ended).
    pub fn set_principals(
        &self,
        node: &str,
        principals: BTreeSet<PrincipalKey>,
    ) -> Vec<PrincipalKey> {
        let mut nodes = self.nodes();
        let Some(e) = nodes.get_mut(node) else {
            return Vec::new();
        };
        let old = std::mem::replace(&mut e.principals, principals);
        let gone: Vec<PrincipalKey> = old.difference(&e.principals).cloned().collect();
        self.touched(node);
        gone.into_iter()
            .filter(|p| {
                !nodes
                    .iter()
                    .any(|(n, e)| n != node && e.conn.is_some() && e.principals.contains(p))
            })
            .collect()
    }

    /// Whether a connected node reports `identity`'s `session` now.
    pub fn session_known(&self, identity: &str, session: &str) -> bool {
        let key = (identity.to_owned(), session.to_owned());
        self.nodes()
            .values()
            .any(|e| e.conn.is_some() && e.principals.contains(&key))
    }

    pub fn ack(&self, node: &str, revision: u64) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.acked_revision = e.acked_revision.max(revision);
            e.acked_unix_nano = now_unix_nano();
        } else {
            return;
        }
        self.touched(node);
    }

    pub fn nack(&self, node: &str, revision: u64, detail: String) {
        if let Some(e) = self.nodes().get_mut(node) {
            e.nacked_revision = e.nacked_revision.max(revision);
            e.nacked_unix_nano = now_unix_nano();
            e.nack_detail = detail;
        } else {
            return;
        }
        self.touched(node);
    }

    pub fn node(&self, node: &str) -> Option<NodeEntry> {
        self.nodes().get(node).cloned()
    }

    pub fn status(&self) -> Vec<pb::NodeStatus> {
        self.nodes()
            .iter()
            .map(|(name, e)| self.node_status(name, e))
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

    /// An event the server itself produced (grant changes): `node` and `seq` are the
    /// caller's.
    pub fn server_event(&self, e: &pb::Event) {
        self.server_events.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(Arc::new(HubEvent::from_pb(e)));
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

    fn grant(id: &str) -> pb::ActiveGrant {
        pb::ActiveGrant {
            id: id.into(),
            identity: "spiffe://t/a".into(),
            session: String::new(),
            grant: "g".into(),
            expires_unix_nano: 1,
        }
    }

    #[test]
    fn grants_and_policies_change_independently_and_versions_never_go_back() {
        let f = Fleet::new(&snap(1, &["a"]), 16);
        let mut rx = f.watch();
        rx.mark_unchanged();
        assert!(f.publish_grants(5, vec![grant("1")]));
        assert!(!f.publish_grants(4, vec![grant("2")]), "older version");
        assert!(!f.publish_grants(6, vec![grant("1")]), "same set");
        f.publish(&snap(2, &["b"]));
        let cur = rx.borrow_and_update().clone();
        assert_eq!((cur.revision, cur.grants_version), (2, 5));
        assert_eq!(cur.grants, [grant("1")], "a new revision keeps the grants");
        assert!(f.publish_grants(7, Vec::new()));
        assert_eq!(
            f.current().policies_yaml,
            ["b"],
            "new grants keep the policies"
        );
    }

    #[test]
    fn a_session_ends_when_no_connected_node_reports_it() {
        let f = Fleet::new(&StoreSnapshot::default(), 16);
        let key = |s: &str| ("spiffe://t/a".to_owned(), s.to_owned());
        let c1 = f.connect("n1", "p".into(), 0);
        f.connect("n2", "p".into(), 0);
        assert!(
            f.set_principals("n1", [key("s1"), key("s2")].into())
                .is_empty()
        );
        assert!(f.set_principals("n2", [key("s1")].into()).is_empty());
        assert!(f.set_principals("nobody", [key("s9")].into()).is_empty());
        assert!(f.session_known("spiffe://t/a", "s2"));
        assert!(
            !f.session_known("spiffe://t/a", "s9"),
            "unknown nodes' reports are dropped"
        );
        assert_eq!(f.set_principals("n1", [key("s1")].into()), [key("s2")]);
        assert!(
            f.set_principals("n1", [].into()).is_empty(),
            "n2 still has s1"
        );
        assert_eq!(f.set_principals("n2", [].into()), [key("s1")]);
        // A disconnected node's last report is kept but does not count.
        f.set_principals("n1", [key("s3")].into());
        f.disconnect("n1", c1);
        assert!(!f.session_known("spiffe://t/a", "s3"));
        assert_eq!(f.node("n1").map(|n| n.principals.len()), Some(1));
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
