//! `NodeSync`: one bidirectional stream per node, xDS-style.
//!
//! The first message must be `Hello`. The server then sends the full snapshot of the current
//! revision (it cannot know what the node holds, whatever revision it claims), with a fresh
//! nonce. At most one snapshot is in flight per node: revisions published while one is
//! un-ACKed are coalesced (the fleet's watch channel keeps only the latest), and the latest is
//! sent once the node ACKs or NACKs. A NACKed revision is not resent on the same stream; the
//! next revision (or the next `Hello`) is. Grants travel in the same snapshots: a new grants
//! version (approve, revoke, expiry, session end) sends a new snapshot at the same revision,
//! under the same one-in-flight rule, with no added delay. Events on the stream go to the
//! fleet fan-out. `Principals` reports update the fleet's view of the node's sessions; the
//! sessions that leave it (and no other connected node reports) go to the
//! [`SessionObserver`].

use std::{pin::Pin, sync::Arc};

use corral_proto::v1::{self as pb, node_message::Msg, node_sync_server::NodeSync};
use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, instrument, warn};

use crate::fleet::{Current, Fleet, PrincipalKey};

/// Told when principals' sessions end on the fleet.
#[async_trait::async_trait]
pub trait SessionObserver: Send + std::marker::Sync + 'static {
    async fn sessions_ended(&self, gone: &[PrincipalKey]);
}

pub struct Sync {
    fleet: Arc<Fleet>,
    stop: ShutdownSignal,
    sessions: Option<Arc<dyn SessionObserver>>,
    ca: Option<Arc<crate::workload_ca::WorkloadCa>>,
}

impl Sync {
    pub fn new(fleet: Arc<Fleet>, stop: ShutdownSignal) -> Self {
        Self {
            fleet,
            stop,
            sessions: None,
            ca: None,
        }
    }

    /// Nodes' intermediate requests are certified by `ca`.
    #[must_use]
    pub fn with_workload_ca(mut self, ca: Arc<crate::workload_ca::WorkloadCa>) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Ended sessions are reported to `observer`.
    #[must_use]
    pub fn with_sessions(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.sessions = Some(observer);
        self
    }
}

/// The snapshot in flight on one stream.
struct InFlight {
    revision: u64,
    nonce: String,
}

struct Stream1 {
    fleet: Arc<Fleet>,
    node: String,
    conn: u64,
    tx: mpsc::Sender<Result<pb::ServerMessage, Status>>,
    in_flight: Option<InFlight>,
    /// The newest (revision, grants version) sent on this stream.
    sent: Option<(u64, u64)>,
    sessions: Option<Arc<dyn SessionObserver>>,
    ca: Option<Arc<crate::workload_ca::WorkloadCa>>,
}

impl Stream1 {
    /// Sends the current snapshot if nothing is in flight and its revision or grants version
    /// is newer than what was sent.
    async fn maybe_send(&mut self, cur: &Current) -> bool {
        if self.in_flight.is_some()
            || self
                .sent
                .is_some_and(|(r, g)| r >= cur.revision && g >= cur.grants_version)
        {
            return true;
        }
        let nonce = self.fleet.nonce();
        let snap = pb::Snapshot {
            revision: cur.revision,
            nonce: nonce.clone(),
            policies_yaml: cur.policies_yaml.clone(),
            grants: cur.grants.clone(),
            grants_version: cur.grants_version,
        };
        debug!(node = %self.node, revision = cur.revision, grants_version = cur.grants_version, grants = cur.grants.len(), %nonce, "snapshot sent");
        self.in_flight = Some(InFlight {
            revision: cur.revision,
            nonce,
        });
        self.sent = Some((cur.revision, cur.grants_version));
        self.tx
            .send(Ok(pb::ServerMessage {
                msg: Some(pb::server_message::Msg::Snapshot(snap)),
            }))
            .await
            .is_ok()
    }

    /// A `Principals` report: the fleet keeps it; ended sessions go to the observer.
    async fn principals(&self, p: pb::Principals) {
        let set = p
            .principals
            .into_iter()
            .map(|p| (p.identity, p.session))
            .collect();
        let gone = self.fleet.set_principals(&self.node, set);
        debug!(node = %self.node, ended = gone.len(), "principals reported");
        if !gone.is_empty()
            && let Some(o) = &self.sessions
        {
            o.sessions_ended(&gone).await;
        }
    }

    /// An intermediate for the node's workload key, if this server has the trust domain's
    /// CA; `false` if the stream is gone.
    async fn intermediate(&self, r: &pb::IntermediateRequest) -> bool {
        let Some(ca) = &self.ca else {
            debug!(node = %self.node, "intermediate asked for; no workload CA configured");
            return true;
        };
        match ca.certify(&self.node, &r.public_key) {
            Ok((cert, not_after_unix)) => {
                info!(node = %self.node, not_after_unix, "workload intermediate issued");
                self.tx
                    .send(Ok(pb::ServerMessage {
                        msg: Some(pb::server_message::Msg::Intermediate(pb::Intermediate {
                            cert,
                            root: ca.root().to_vec(),
                            not_after_unix,
                        })),
                    }))
                    .await
                    .is_ok()
            }
            Err(e) => {
                warn!(node = %self.node, error = %corral_runtime::error_chain(&e), "workload intermediate refused");
                true
            }
        }
    }

    /// Matches an ACK/NACK to the snapshot in flight; stale nonces are ignored.
    fn answered(&mut self, revision: u64, nonce: &str) -> bool {
        match &self.in_flight {
            Some(f) if f.nonce == nonce && f.revision == revision => {
                self.in_flight = None;
                true
            }
            _ => {
                debug!(node = %self.node, revision, nonce, "stale or unknown nonce ignored");
                false
            }
        }
    }
}

async fn serve_stream(
    mut s: Stream1,
    mut inbound: Streaming<pb::NodeMessage>,
    mut stop: ShutdownSignal,
) {
    let mut watch = s.fleet.watch();
    let cur = watch.borrow_and_update().clone();
    if !s.maybe_send(&cur).await {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            changed = watch.changed() => {
                if changed.is_err() {
                    break;
                }
                let cur = watch.borrow_and_update().clone();
                if !s.maybe_send(&cur).await {
                    break;
                }
            }
            m = inbound.next() => {
                let m = match m {
                    None => break,
                    Some(Err(e)) => {
                        debug!(node = %s.node, error = %e, "sync stream ended");
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                match m.msg {
                    Some(Msg::Ack(a)) => {
                        if s.answered(a.revision, &a.nonce) {
                            s.fleet.ack(&s.node, a.revision);
                            debug!(node = %s.node, revision = a.revision, "ACK");
                        }
                    }
                    Some(Msg::Nack(n)) => {
                        if s.answered(n.revision, &n.nonce) {
                            warn!(node = %s.node, revision = n.revision, error = %n.error_detail, "NACK");
                            s.fleet.nack(&s.node, n.revision, n.error_detail);
                        }
                    }
                    Some(Msg::Event(e)) => s.fleet.forward_event(&s.node, e),
                    Some(Msg::Principals(p)) => s.principals(p).await,
                    Some(Msg::IntermediateRequest(r)) => {
                        if !s.intermediate(&r).await {
                            break;
                        }
                    }
                    Some(Msg::Hello(_)) | None => {
                        let _ = s.tx.send(Err(Status::invalid_argument("Hello may only be the first message"))).await;
                        break;
                    }
                }
                if s.in_flight.is_none() {
                    let cur = watch.borrow_and_update().clone();
                    if !s.maybe_send(&cur).await {
                        break;
                    }
                }
            }
        }
    }
    s.fleet.disconnect(&s.node, s.conn);
    info!(node = %s.node, "node disconnected");
}

/// With mTLS, a node may only sync as the name its client certificate is issued to (a DNS
/// subject alternative name), so one node's certificate cannot take another node's place.
fn node_cert_matches(
    certs: &[rustls_pki_types::CertificateDer<'static>],
    node: &str,
) -> Result<(), Status> {
    let denied = || {
        Status::permission_denied(format!(
            "the client certificate is not issued to node `{node}` (it needs a DNS subject \
             alternative name equal to the node name)"
        ))
    };
    let leaf = certs.first().ok_or_else(denied)?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|_| denied())?;
    let name = rustls_pki_types::ServerName::try_from(node).map_err(|_| denied())?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| denied())
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeSync for Sync {
    type SyncStream = SyncStream;

    #[instrument(skip_all, fields(peer = ?req.remote_addr()))]
    async fn sync(
        &self,
        req: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let certs = req.peer_certs();
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("the sync stream ended before Hello"))??;
        let Some(Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("Hello needs the node name"));
        }
        if let Some(certs) = certs {
            node_cert_matches(&certs, &hello.node)?;
        }
        let conn = self.fleet.connect(&hello.node, peer, hello.revision);
        info!(node = %hello.node, revision = hello.revision, "node connected");
        let (tx, rx) = mpsc::channel(4);
        let s = Stream1 {
            fleet: self.fleet.clone(),
            node: hello.node,
            conn,
            tx,
            in_flight: None,
            sent: None,
            sessions: self.sessions.clone(),
            ca: self.ca.clone(),
        };
        tokio::spawn(serve_stream(s, inbound, self.stop.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use corral_proto::v1::{node_sync_client::NodeSyncClient, node_sync_server::NodeSyncServer};
    use corral_runtime::shutdown::Shutdown;
    use tonic::transport::server::TcpIncoming;

    use super::*;
    use crate::store::{PolicyRecord, StoreSnapshot};

    fn snap(revision: u64, yaml: &str) -> StoreSnapshot {
        StoreSnapshot {
            revision,
            policies: vec![PolicyRecord {
                name: "p".into(),
                yaml: yaml.into(),
                revision,
                applied_by: String::new(),
                applied_unix_nano: 0,
                deleted: false,
            }],
        }
    }

    fn msg(m: Msg) -> pb::NodeMessage {
        pb::NodeMessage { msg: Some(m) }
    }

    async fn serve(fleet: Arc<Fleet>, stop: &Shutdown) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let svc = NodeSyncServer::new(Sync::new(fleet, stop.subscribe()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Ok(format!("http://{addr}"))
    }

    async fn next_snapshot(s: &mut Streaming<pb::ServerMessage>) -> anyhow::Result<pb::Snapshot> {
        let m = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        match m.msg {
            Some(pb::server_message::Msg::Snapshot(s)) => Ok(s),
            Some(pb::server_message::Msg::Intermediate(_)) | None => anyhow::bail!("empty message"),
        }
    }

    async fn quiet(s: &mut Streaming<pb::ServerMessage>) -> bool {
        tokio::time::timeout(Duration::from_millis(200), s.next())
            .await
            .is_err()
    }

    async fn until(mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
        for _ in 0..250 {
            if f() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("condition not met in 5 s")
    }

    #[tokio::test]
    async fn a_burst_during_an_unacked_snapshot_sends_only_the_latest_and_tracks_ack_nack()
    -> anyhow::Result<()> {
        let fleet = Arc::new(Fleet::new(&snap(1, "one"), 16));
        let stop = Shutdown::new();
        let url = serve(fleet.clone(), &stop).await?;
        let mut client = NodeSyncClient::connect(url).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(msg(Msg::Hello(pb::Hello {
            node: "n1".into(),
            revision: 0,
        })))
        .await?;
        let mut inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();

        // Hello → the full current snapshot.
        let s1 = next_snapshot(&mut inbound).await?;
        assert_eq!(
            (s1.revision, s1.policies_yaml.as_slice()),
            (1, &["one".to_owned()][..])
        );
        assert!(fleet.status()[0].connected);

        // A burst while revision 1 is un-ACKed: nothing is sent until the ACK, then only
        // the latest.
        for (r, y) in [(2, "two"), (3, "three"), (4, "four")] {
            fleet.publish(&snap(r, y));
        }
        assert!(
            quiet(&mut inbound).await,
            "nothing while a snapshot is in flight"
        );
        tx.send(msg(Msg::Ack(pb::Ack {
            revision: 1,
            nonce: s1.nonce.clone(),
        })))
        .await?;
        let s4 = next_snapshot(&mut inbound).await?;
        assert_eq!((s4.revision, s4.policies_yaml[0].as_str()), (4, "four"));
        assert_ne!(s4.nonce, s1.nonce);
        assert_eq!(fleet.status()[0].acked_revision, 1);

        // A stale nonce is ignored; the matching NACK is recorded with its detail.
        tx.send(msg(Msg::Ack(pb::Ack {
            revision: 4,
            nonce: "stale".into(),
        })))
        .await?;
        tx.send(msg(Msg::Nack(pb::Nack {
            revision: 4,
            nonce: s4.nonce.clone(),
            error_detail: "node limit exceeded".into(),
        })))
        .await?;
        until(|| fleet.status()[0].nacked_revision == 4).await?;
        let st = &fleet.status()[0];
        assert_eq!(st.acked_revision, 1, "the stale ACK did not count");
        assert_eq!(st.nack_detail, "node limit exceeded");

        // The NACKed revision is not resent; the next one is.
        assert!(quiet(&mut inbound).await);
        fleet.publish(&snap(5, "five"));
        assert_eq!(next_snapshot(&mut inbound).await?.revision, 5);

        // The node goes away: disconnected, its revisions kept.
        drop(tx);
        drop(inbound);
        until(|| !fleet.status()[0].connected).await?;
        assert_eq!(fleet.status()[0].nacked_revision, 4);
        stop.trigger();
        Ok(())
    }

    #[tokio::test]
    async fn a_grants_change_sends_a_snapshot_at_the_same_revision_one_at_a_time()
    -> anyhow::Result<()> {
        let fleet = Arc::new(Fleet::new(&snap(1, "one"), 16));
        let stop = Shutdown::new();
        let mut client = NodeSyncClient::connect(serve(fleet.clone(), &stop).await?).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(msg(Msg::Hello(pb::Hello {
            node: "n1".into(),
            revision: 1,
        })))
        .await?;
        let mut inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();
        let s1 = next_snapshot(&mut inbound).await?;
        let grant = |id: &str| pb::ActiveGrant {
            id: id.into(),
            identity: "spiffe://t/a".into(),
            session: String::new(),
            grant: "g".into(),
            expires_unix_nano: 9,
        };
        // Two grant changes while revision 1 is un-ACKed: only the latest, after the ACK.
        fleet.publish_grants(3, vec![grant("1")]);
        fleet.publish_grants(4, vec![grant("1"), grant("2")]);
        assert!(quiet(&mut inbound).await);
        tx.send(msg(Msg::Ack(pb::Ack {
            revision: 1,
            nonce: s1.nonce.clone(),
        })))
        .await?;
        let s2 = next_snapshot(&mut inbound).await?;
        assert_eq!((s2.revision, s2.grants_version, s2.grants.len()), (1, 4, 2));
        assert_eq!(s2.policies_yaml, ["one"], "the full snapshot again");
        tx.send(msg(Msg::Ack(pb::Ack {
            revision: 1,
            nonce: s2.nonce.clone(),
        })))
        .await?;
        assert!(quiet(&mut inbound).await, "nothing new: nothing sent");
        fleet.publish_grants(5, Vec::new());
        let s3 = next_snapshot(&mut inbound).await?;
        assert_eq!((s3.grants_version, s3.grants.len()), (5, 0));
        stop.trigger();
        Ok(())
    }

    #[tokio::test]
    async fn the_first_message_must_be_hello() -> anyhow::Result<()> {
        let fleet = Arc::new(Fleet::new(&snap(1, "one"), 16));
        let stop = Shutdown::new();
        let mut client = NodeSyncClient::connect(serve(fleet.clone(), &stop).await?).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(msg(Msg::Ack(pb::Ack {
            revision: 1,
            nonce: String::new(),
        })))
        .await?;
        let err = client
            .sync(ReceiverStream::new(rx))
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("accepted a stream without Hello"))?;
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(fleet.status().is_empty());
        stop.trigger();
        Ok(())
    }
}
