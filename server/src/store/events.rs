//! The fleet's event history: events the nodes forwarded (and the server's own), kept in the
//! store up to a count, for `corral policy suggest --server` and `corral policy simulate
//! --server` (`EventService.ListEvents`).

use super::StoreError;

/// One event as it is kept: its protobuf encoding and what queries select on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the history (increasing in the order the server received the events).
    pub id: u64,
    pub node: String,
    pub time_unix_nano: u64,
    /// `pb::Event` encoded.
    pub encoded: Vec<u8>,
}

/// Which events to read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only events after this position (paging).
    pub after_id: u64,
    /// Empty: every node.
    pub node: String,
    /// Event time window, Unix nanoseconds; 0: unbounded.
    pub since_unix_nano: u64,
    pub until_unix_nano: u64,
    /// At most this many (the oldest first).
    pub limit: usize,
}

/// Where the event history lives.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `events` (node, event time, encoding) in order, then keeps only the newest
    /// `keep` events of the history.
    async fn append(&self, events: &[(String, u64, Vec<u8>)], keep: u64) -> Result<(), StoreError>;
    /// The events `q` selects, oldest first.
    async fn events(&self, q: &EventQuery) -> Result<Vec<StoredEvent>, StoreError>;
}
