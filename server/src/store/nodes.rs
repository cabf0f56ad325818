//! Node registrations: each replica records the nodes syncing with it, so every replica can
//! show the whole fleet (`PolicyService.Status`, hence `corral policy apply` waiting for every
//! node) and check a grant request against sessions on any replica's nodes. A replica writes
//! its nodes when they change and a heartbeat every second; a record whose heartbeat is old
//! belongs to a replica that is gone, and is read as disconnected.

use corral_proto::v1 as pb;

use super::StoreError;

/// One node as a replica recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// `status.node` is the node's name, `status.replica` the replica's.
    pub status: pb::NodeStatus,
    /// The principals (identity, session) the node reported.
    pub principals: Vec<(String, String)>,
    /// When the replica last confirmed it (Unix ns).
    pub heartbeat_unix_nano: u64,
}

/// Where node registrations live.
#[async_trait::async_trait]
pub trait NodeRegistry: Send + Sync + 'static {
    /// Records `nodes` as `replica` sees them, at `now`. A node connected to another replica is
    /// not overwritten by a replica it has left (its disconnected view).
    async fn put_nodes(
        &self,
        replica: &str,
        nodes: &[NodeRecord],
        now: u64,
    ) -> Result<(), StoreError>;
    /// Renews the heartbeat of every node `replica` has connected.
    async fn heartbeat(&self, replica: &str, now: u64) -> Result<(), StoreError>;
    /// Every recorded node, by name.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
}

/// The stored form of the principals.
pub(super) fn encode_principals(p: &[(String, String)]) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::Principals {
        principals: p
            .iter()
            .map(|(identity, session)| pb::Principal {
                identity: identity.clone(),
                session: session.clone(),
                ..pb::Principal::default()
            })
            .collect(),
    })
}

/// A stored record back; an undecodable one reads as empty (it is rewritten at the next
/// change or heartbeat of its replica).
pub(super) fn decode(status: &[u8], principals: &[u8], heartbeat: u64) -> NodeRecord {
    let status: pb::NodeStatus = prost::Message::decode(status).unwrap_or_default();
    let principals: pb::Principals = prost::Message::decode(principals).unwrap_or_default();
    NodeRecord {
        status,
        principals: principals
            .principals
            .into_iter()
            .map(|p| (p.identity, p.session))
            .collect(),
        heartbeat_unix_nano: heartbeat,
    }
}
