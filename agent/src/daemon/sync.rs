//! `corral-agent --server URL`: the node side of `NodeSync`, modelled on Envoy's xDS.
//!
//! One bidirectional stream per node. The node says `Hello` (its name and the revision it
//! enforces), the server answers with a full [`pb::Snapshot`] and pushes a new one for each
//! new revision. Each snapshot is compiled with the same compiler the server validated it
//! with, checked against this node's limits, applied in one map generation flip, stored as
//! last-known-good, and ACKed; any failure is NACKed with its detail and the previous policy
//! stays in force. A lost connection is retried with jittered exponential backoff
//! (`corral_runtime::backoff::Backoff`, 10 ms to 15 s); the next `Hello` resyncs. Events from the hub are forwarded
//! on the same stream through the hub's bounded per-subscriber queue (drops are counted in
//! the hub's subscriber drops).
//!
//! Grants ride on the same snapshots: a snapshot whose policy text and revision are already
//! enforced only updates the grant book and the kernel grant map (no compile, no generation
//! flip: the approve → enforced path). Right after `Hello`, and again on every enrolment or
//! removal, the node sends its full set of principals (`Principals`), which the server checks
//! grant requests' sessions against.
//!
//! The client is generic over a [`SnapshotSink`] so the same code drives the simulated nodes
//! of the tests and benchmarks (`corral-simnode`), which compile and ACK but load nothing.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use corral_proto::v1::{self as pb, node_message::Msg, node_sync_client::NodeSyncClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use corral_events::hub::HubEvent;
use corral_policy::snapshot::{check_limits, compile_snapshot, snapshot_source};
use corral_runtime::{backoff::Backoff, shutdown::ShutdownSignal};

use super::{Shared, policy};

/// What a sync client applies snapshots to.
pub trait SnapshotSink: Send + Sync + 'static {
    /// The revision enforced now (0: none), sent in `Hello`.
    fn revision(&self) -> u64;
    /// Validates, compiles and applies `snapshot` (blocking). `Err` is the NACK detail; the
    /// previous policy must then stay in force.
    fn apply(&self, snapshot: &pb::Snapshot) -> Result<(), String>;
    /// The principals enrolled now, reported after `Hello` and on every change.
    fn principals(&self) -> Vec<pb::Principal> {
        Vec::new()
    }
    /// Changes each time the principals change; `None`: they never do.
    fn principal_changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
    /// The workload-signing key to have certified as an intermediate (P-256 point); `None`:
    /// none asked for.
    fn intermediate_key(&self) -> Option<Vec<u8>> {
        None
    }
    /// The server certified the key.
    fn intermediate(&self, _: &pb::Intermediate) {}
}

/// How often a connected node renews its intermediate (well inside the server's 24 h).
const INTERMEDIATE_RENEW: Duration = Duration::from_secs(6 * 3600);

fn intermediate_request(sink: &Arc<dyn SnapshotSink>) -> Option<pb::NodeMessage> {
    sink.intermediate_key().map(|public_key| pb::NodeMessage {
        msg: Some(Msg::IntermediateRequest(pb::IntermediateRequest {
            public_key,
        })),
    })
}

fn principals_msg(sink: &Arc<dyn SnapshotSink>) -> pb::NodeMessage {
    pb::NodeMessage {
        msg: Some(Msg::Principals(pb::Principals {
            principals: sink.principals(),
        })),
    }
}

async fn principal_change(changes: &mut Option<watch::Receiver<u64>>) -> bool {
    match changes {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The URLs of a `--server` list (comma-separated; blanks ignored).
pub fn server_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The link to the server, as `status` shows it.
#[derive(Debug, Default)]
pub struct SyncStatus {
    connected: Mutex<bool>,
    /// The replica synced with, or last tried.
    server: Mutex<String>,
    /// Moves to another replica after losing one (or failing to reach it).
    pub failovers: AtomicU64,
    /// Successful stream opens.
    pub connects: AtomicU64,
    pub snapshots_acked: AtomicU64,
    pub snapshots_nacked: AtomicU64,
    pub events_forwarded: AtomicU64,
    pub events_undecodable: AtomicU64,
}

impl SyncStatus {
    pub fn connected(&self) -> bool {
        *self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn server(&self) -> String {
        self.server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_server(&self, url: &str) {
        url.clone_into(&mut self.server.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn set_connected(&self, v: bool) {
        *self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = v;
    }

    /// `connected` or `disconnected (enforcing last-known-good revision N)`.
    pub fn describe(&self, revision: u64) -> String {
        if self.connected() {
            "connected".into()
        } else if revision == 0 {
            "disconnected (no last-known-good policy: enrolled principals are denied everything)"
                .into()
        } else {
            format!("disconnected (enforcing last-known-good revision {revision})")
        }
    }
}

/// Where and as whom to sync.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's replicas; one is used at a time.
    pub urls: Vec<String>,
    pub node: String,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// mTLS (an `https://` URL); `None`: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientConfig {
    /// `urls`: one URL or a comma-separated list of replicas.
    pub fn new(urls: &str, node: &str) -> Self {
        Self {
            urls: server_urls(urls),
            node: node.into(),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(15),
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("server URL {url}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("open the sync stream")]
    Open(#[source] tonic::Status),
    #[error("sync stream")]
    Stream(#[source] tonic::Status),
    #[error("the server closed the sync stream")]
    Closed,
}

/// Runs the sync client until `stop`: connect, resync, apply, reconnect with backoff. With
/// several replicas, a node starts at one chosen by its name (so a fleet spreads over them) and
/// moves to the next whenever it loses or cannot reach the one it is on; the `Hello` carries
/// the last-known-good revision, so any replica resumes from there.
pub async fn run(
    cfg: ClientConfig,
    sink: Arc<dyn SnapshotSink>,
    mut events: Option<mpsc::Receiver<Arc<HubEvent>>>,
    status: Arc<SyncStatus>,
    mut stop: ShutdownSignal,
) {
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    let n = cfg.urls.len().max(1);
    let mut at = start_index(&cfg.node, n);
    loop {
        let url = cfg.urls.get(at).cloned().unwrap_or_default();
        status.set_server(&url);
        let res = session(
            &cfg,
            &url,
            &sink,
            &mut events,
            &status,
            &mut stop,
            &mut backoff,
        )
        .await;
        status.set_connected(false);
        if stop.is_set() {
            return;
        }
        let delay = backoff.next_delay();
        match res {
            Err(e) => {
                warn!(server = %url, error = %corral_runtime::error_chain(&e), retry_in = ?delay, "policy server unreachable; the last-known-good policy stays in force")
            }
            Ok(()) => return,
        }
        if n > 1 {
            at = (at + 1) % n;
            status.failovers.fetch_add(1, Ordering::Relaxed);
            info!(next = %cfg.urls[at], "trying another server replica");
        }
        tokio::select! {
            _ = stop.wait() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Where a node starts in a list of `n` replicas: a hash of its name, so nodes spread over
/// the replicas and a restarted node goes back to the same one.
fn start_index(node: &str, n: usize) -> usize {
    let h = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(h % n as u64).unwrap_or(0)
}

/// One stream; `Ok` only when stopping.
async fn session(
    cfg: &ClientConfig,
    url: &str,
    sink: &Arc<dyn SnapshotSink>,
    events: &mut Option<mpsc::Receiver<Arc<HubEvent>>>,
    status: &SyncStatus,
    stop: &mut ShutdownSignal,
    backoff: &mut Backoff,
) -> Result<(), SyncError> {
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|source| SyncError::Url {
        url: url.to_owned(),
        source,
    })?;
    if let Some(tls) = &cfg.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|source| SyncError::Url {
                url: url.to_owned(),
                source,
            })?;
    }
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = tokio::select! {
        _ = stop.wait() => return Ok(()),
        c = endpoint.connect() => c.map_err(|source| SyncError::Connect { url: url.to_owned(), source })?,
    };
    let mut client = NodeSyncClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::NodeMessage>(256);
    let hello = pb::NodeMessage {
        msg: Some(Msg::Hello(pb::Hello {
            node: cfg.node.clone(),
            revision: sink.revision(),
        })),
    };
    // Seen before the set is read: a change while reading is reported again.
    let mut changes = sink.principal_changes();
    if let Some(rx) = &mut changes {
        rx.borrow_and_update();
    }
    // Cannot fail: the receiver is alive and the queue empty.
    let _ = tx.try_send(hello);
    let _ = tx.try_send(principals_msg(sink));
    if let Some(r) = intermediate_request(sink) {
        let _ = tx.try_send(r);
    }
    let mut renew = tokio::time::interval_at(
        tokio::time::Instant::now() + INTERMEDIATE_RENEW,
        INTERMEDIATE_RENEW,
    );
    let mut inbound = tokio::select! {
        _ = stop.wait() => return Ok(()),
        r = client.sync(ReceiverStream::new(rx)) => r.map_err(SyncError::Open)?.into_inner(),
    };
    status.set_connected(true);
    status.connects.fetch_add(1, Ordering::Relaxed);
    backoff.reset();
    info!(server = %url, node = %cfg.node, "connected to the policy server");
    loop {
        tokio::select! {
            _ = stop.wait() => return Ok(()),
            m = inbound.next() => {
                let m = match m {
                    None => return Err(SyncError::Closed),
                    Some(m) => m.map_err(SyncError::Stream)?,
                };
                let snap = match m.msg {
                    Some(pb::server_message::Msg::Snapshot(snap)) => snap,
                    Some(pb::server_message::Msg::Intermediate(i)) => {
                        sink.intermediate(&i);
                        continue;
                    }
                    None => continue,
                };
                let reply = handle_snapshot(sink, snap, status).await;
                if tx.send(reply).await.is_err() {
                    return Err(SyncError::Closed);
                }
            }
            _ = renew.tick() => {
                if let Some(r) = intermediate_request(sink)
                    && tx.send(r).await.is_err()
                {
                    return Err(SyncError::Closed);
                }
            }
            alive = principal_change(&mut changes) => {
                if !alive {
                    changes = None;
                    continue;
                }
                if let Some(rx) = &mut changes {
                    rx.borrow_and_update();
                }
                if tx.send(principals_msg(sink)).await.is_err() {
                    return Err(SyncError::Closed);
                }
            }
            e = recv_event(events) => {
                let Some(e) = e else {
                    // The hub closed (shutdown): stop forwarding, keep syncing.
                    *events = None;
                    continue;
                };
                let Ok(ev) = e.to_pb() else {
                    status.events_undecodable.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let msg = pb::NodeMessage { msg: Some(Msg::Event(ev)) };
                if tx.send(msg).await.is_err() {
                    return Err(SyncError::Closed);
                }
                status.events_forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn recv_event(events: &mut Option<mpsc::Receiver<Arc<HubEvent>>>) -> Option<Arc<HubEvent>> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn handle_snapshot(
    sink: &Arc<dyn SnapshotSink>,
    snap: pb::Snapshot,
    status: &SyncStatus,
) -> pb::NodeMessage {
    let (revision, nonce) = (snap.revision, snap.nonce.clone());
    let s = sink.clone();
    let res = match tokio::task::spawn_blocking(move || s.apply(&snap)).await {
        Ok(r) => r,
        Err(e) => Err(format!("the apply task failed: {e}")),
    };
    match res {
        Ok(()) => {
            status.snapshots_acked.fetch_add(1, Ordering::Relaxed);
            debug!(revision, "snapshot applied; ACK");
            pb::NodeMessage {
                msg: Some(Msg::Ack(pb::Ack { revision, nonce })),
            }
        }
        Err(error_detail) => {
            status.snapshots_nacked.fetch_add(1, Ordering::Relaxed);
            warn!(revision, error = %error_detail, "snapshot rejected; NACK (the previous policy stays in force)");
            pb::NodeMessage {
                msg: Some(Msg::Nack(pb::Nack {
                    revision,
                    nonce,
                    error_detail,
                })),
            }
        }
    }
}

/// The real node: snapshots go into the kernel maps through the standalone apply path.
pub struct AgentSink {
    pub shared: Arc<Shared>,
    /// The Workload API's CA, when the agent serves it: its key is certified by the server.
    pub workload_ca: Option<Arc<super::workload::ca::Ca>>,
}

impl SnapshotSink for AgentSink {
    fn revision(&self) -> u64 {
        self.shared.policy_state().revision()
    }

    fn principals(&self) -> Vec<pb::Principal> {
        self.shared
            .registry
            .list()
            .iter()
            .map(|p| p.to_pb())
            .collect()
    }

    fn principal_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.shared.registry.subscribe())
    }

    fn intermediate_key(&self) -> Option<Vec<u8>> {
        self.workload_ca.as_ref().map(|ca| ca.intermediate_key())
    }

    fn intermediate(&self, i: &pb::Intermediate) {
        if let Some(ca) = &self.workload_ca {
            match ca.set_intermediate(&i.cert, &i.root) {
                Ok(()) => info!(
                    not_after_unix = i.not_after_unix,
                    "workload intermediate from the server in use"
                ),
                Err(e) => {
                    warn!(error = %corral_runtime::error_chain(&e), "the server's workload intermediate cannot be used; SVIDs stay signed by the node's own CA")
                }
            }
        }
    }

    /// The grants are taken first, whatever becomes of the policy: a revocation must reach
    /// the kernel even when this node rejects the snapshot's policy.
    fn apply(&self, snap: &pb::Snapshot) -> Result<(), String> {
        let shared = &self.shared;
        let grants_changed = shared.grants.set_from_snapshot(snap);
        let source = snapshot_source(&snap.policies_yaml);
        if shared.policy_state().revision() == snap.revision
            && shared
                .lkg
                .source()
                .is_some_and(|(r, s)| r == snap.revision && s == source)
        {
            // The policy is already enforced: only the grants may have changed.
            let mut enf = shared.enforcer();
            shared.reconcile_grants(enf.maps());
            debug!(
                revision = snap.revision,
                grants_version = snap.grants_version,
                grants_changed,
                "grants updated"
            );
            return Ok(());
        }
        let file = format!("server revision {}", snap.revision);
        let keep = |msg: String| {
            // The previous policy stays in force, under the new grants.
            let mut enf = shared.enforcer();
            shared.reconcile_grants(enf.maps());
            msg
        };
        let res = compile_snapshot(&file, snap.revision, &snap.policies_yaml)
            .map_err(policy::ApplyError::Invalid)
            .map_err(|e| {
                let mut st = shared.policy_state_mut();
                policy::record_error(&mut st, &e);
                st.last_error.clone().unwrap_or_default()
            })
            .map_err(keep)?;
        if let Err(e) = check_limits(&res, shared.resolved.config.max_rules) {
            let msg = e.to_string();
            let mut st = shared.policy_state_mut();
            st.apply_errors += 1;
            warn!(
                revision = snap.revision,
                "{msg}; the previous policy stays in force"
            );
            st.last_error = Some(msg.clone());
            drop(st);
            return Err(keep(msg));
        }
        let mut enf = shared.enforcer();
        let mut st = shared.policy_state_mut();
        if let Err(e) = policy::apply_compiled(
            res,
            &mut st,
            enf.maps(),
            &shared.registry,
            &shared.grants,
            &shared.resolved.cgroup_root,
        ) {
            let e = policy::ApplyError::Maps(e);
            policy::record_error(&mut st, &e);
            return Err(corral_runtime::error_chain(&e));
        }
        shared.lkg.store(snap.revision, &source);
        Ok(())
    }
}

#[cfg(test)]
#[path = "sync_session_tests.rs"]
mod session_tests;
