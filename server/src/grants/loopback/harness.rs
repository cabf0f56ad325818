//! A real server on loopback (GrantService, NodeSync with the session observer,
//! EventService, the expiry sweep) over a temp-file database, and a fake node.

use std::{path::PathBuf, sync::Arc, time::Duration};

use corral_proto::v1::{
    self as pb, event_service_client::EventServiceClient, event_service_server::EventServiceServer,
    grant_service_client::GrantServiceClient, grant_service_server::GrantServiceServer,
    node_message::Msg, node_sync_client::NodeSyncClient, node_sync_server::NodeSyncServer,
};
use corral_runtime::shutdown::Shutdown;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Streaming, transport::Channel, transport::server::TcpIncoming};

use crate::{
    events::Events,
    fleet::Fleet,
    grants::{Grants, service},
    store::{Change, PolicyStore, now_unix_nano, sqlite::SqliteStore},
    sync::Sync,
};

pub(crate) use crate::grants::templates::tests::POLICY;

pub const ID: &str = "spiffe://t/agent/a";

pub fn temp_db(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "corral-grant-svc-{name}-{}-{}.db",
        std::process::id(),
        now_unix_nano()
    ));
    let _ = std::fs::remove_file(&p);
    p
}

pub struct Server {
    pub url: String,
    pub fleet: Arc<Fleet>,
    pub grants: Arc<Grants>,
    pub stop: Shutdown,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.trigger();
    }
}

/// Opens (or reopens) the database at `db`, applies [`POLICY`] if the store has none, and
/// serves on a fresh loopback port.
pub async fn serve(db: &std::path::Path, approvers: &[&str]) -> anyhow::Result<Server> {
    let store = Arc::new(SqliteStore::open(db)?);
    if store.current().await?.revision == 0 {
        store
            .commit(
                0,
                &Change {
                    applied_by: "test".into(),
                    upserts: vec![("agents".into(), POLICY.into())],
                    deletes: Vec::new(),
                },
            )
            .await?;
    }
    let fleet = Arc::new(Fleet::new(&store.current().await?, 64));
    let approvers: Vec<String> = approvers.iter().map(|a| (*a).to_owned()).collect();
    let log: Arc<dyn crate::store::events::EventLog> = store.clone();
    let grants = Arc::new(Grants::new(store, fleet.clone(), &approvers));
    grants.start().await?;
    let stop = Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sync = Sync::new(fleet.clone(), stop.subscribe()).with_sessions(grants.clone());
    tokio::spawn(service::sweep_task(grants.clone(), stop.subscribe()));
    let mut s = stop.subscribe();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrantServiceServer::with_interceptor(
                service::GrantApi::new(grants.clone()),
                name_test_user,
            ))
            .add_service(NodeSyncServer::new(sync))
            .add_service(EventServiceServer::new(Events::new(
                fleet.clone(),
                log,
                stop.subscribe(),
            )))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move { s.wait().await },
            ),
    );
    Ok(Server {
        url: format!("http://{addr}"),
        fleet,
        grants,
        stop,
    })
}

impl Server {
    pub async fn client(&self) -> anyhow::Result<GrantServiceClient<Channel>> {
        Ok(GrantServiceClient::connect(self.url.clone()).await?)
    }

    pub async fn events(&self) -> anyhow::Result<Streaming<pb::Event>> {
        let mut c = EventServiceClient::connect(self.url.clone()).await?;
        let s = c
            .watch_events(pb::FleetWatchRequest {
                filter: Some(pb::EventFilter {
                    kinds: vec!["grant".into()],
                    ..pb::EventFilter::default()
                }),
                node: String::new(),
            })
            .await?
            .into_inner();
        Ok(s)
    }
}

/// The test transport's caller name: the real server names plaintext callers by the uid
/// owning their socket (`local_peer`), which one test process cannot vary; this harness
/// stands in for that transport and names them by [`TEST_USER`].
const TEST_USER: &str = "x-test-user";

#[allow(clippy::result_large_err, reason = "tonic's interceptor signature")]
fn name_test_user(mut r: Request<()>) -> Result<Request<()>, tonic::Status> {
    let name = r
        .metadata()
        .get(TEST_USER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(name) = name {
        r.extensions_mut().insert(crate::local_peer::LocalPeer {
            uid: 4242,
            name,
            addr: ([127, 0, 0, 1], 1).into(),
        });
    }
    Ok(r)
}

/// `msg` sent as `user` (see [`TEST_USER`]).
pub fn as_user<T>(user: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = user.parse() {
        r.metadata_mut().insert(TEST_USER, v);
    }
    r
}

pub fn request(grant: &str, session: &str, ttl: u64, reason: &str) -> pb::GrantRequest {
    pb::GrantRequest {
        identity: ID.into(),
        session: session.into(),
        grant: grant.into(),
        ttl_seconds: ttl,
        reason: reason.into(),
    }
}

pub fn decision(id: &str, reason: &str) -> pb::GrantDecisionRequest {
    pb::GrantDecisionRequest {
        id: id.into(),
        reason: reason.into(),
    }
}

/// A node on the sync stream.
pub struct Node {
    pub tx: mpsc::Sender<pb::NodeMessage>,
    pub rx: Streaming<pb::ServerMessage>,
}

fn msg(m: Msg) -> pb::NodeMessage {
    pb::NodeMessage { msg: Some(m) }
}

impl Node {
    /// Says Hello and reads (and ACKs) the first snapshot.
    pub async fn connect(s: &Server, name: &str) -> anyhow::Result<(Self, pb::Snapshot)> {
        let mut c = NodeSyncClient::connect(s.url.clone()).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(msg(Msg::Hello(pb::Hello {
            node: name.into(),
            revision: 0,
        })))
        .await?;
        let rx = c.sync(ReceiverStream::new(rx)).await?.into_inner();
        let mut n = Self { tx, rx };
        let first = n.snapshot().await?;
        n.ack(&first).await?;
        Ok((n, first))
    }

    pub async fn snapshot(&mut self) -> anyhow::Result<pb::Snapshot> {
        let m = tokio::time::timeout(Duration::from_secs(5), self.rx.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("sync stream ended"))??;
        match m.msg {
            Some(pb::server_message::Msg::Snapshot(s)) => Ok(s),
            Some(pb::server_message::Msg::Intermediate(_)) | None => {
                anyhow::bail!("empty server message")
            }
        }
    }

    pub async fn ack(&self, s: &pb::Snapshot) -> anyhow::Result<()> {
        self.tx
            .send(msg(Msg::Ack(pb::Ack {
                revision: s.revision,
                nonce: s.nonce.clone(),
            })))
            .await?;
        Ok(())
    }

    /// Reports these sessions of [`ID`] as the node's full principal set.
    pub async fn principals(&self, sessions: &[&str]) -> anyhow::Result<()> {
        self.tx
            .send(msg(Msg::Principals(pb::Principals {
                principals: sessions
                    .iter()
                    .map(|s| pb::Principal {
                        identity: ID.into(),
                        session: (*s).into(),
                        cgroup_id: 0,
                        opt_outs: Vec::new(),
                    })
                    .collect(),
            })))
            .await?;
        Ok(())
    }

    /// Nothing arrives for 200 ms.
    pub async fn quiet(&mut self) -> bool {
        tokio::time::timeout(Duration::from_millis(200), self.rx.next())
            .await
            .is_err()
    }
}

pub async fn until(mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..250 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("condition not met in 5 s")
}

pub async fn next_event(
    s: &mut Streaming<pb::Event>,
) -> anyhow::Result<(pb::Event, pb::GrantChange)> {
    let e = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("event stream ended"))??;
    match e.call.clone() {
        Some(pb::event::Call::Grant(g)) => Ok((e, g)),
        _ => anyhow::bail!("not a grant event: {e:?}"),
    }
}

/// The ids in a snapshot's grants.
pub fn ids(s: &pb::Snapshot) -> Vec<String> {
    s.grants.iter().map(|g| g.id.clone()).collect()
}
