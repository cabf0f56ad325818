//! The sync client against an in-process `NodeSync` server: it reports its principals right
//! after `Hello` and again, without polling, when they change; a snapshot is applied and ACKed.

use std::{pin::Pin, sync::Mutex as StdMutex};

use corral_proto::v1::node_sync_server::{NodeSync, NodeSyncServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use corral_runtime::shutdown::Shutdown;

/// Forwards every node message to the test and pushes one snapshot.
struct Server {
    seen: mpsc::Sender<pb::NodeMessage>,
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl NodeSync for Server {
    type SyncStream = Out;

    async fn sync(
        &self,
        req: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = req.into_inner();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                if seen.send(m).await.is_err() {
                    return;
                }
            }
        });
        let snap = pb::ServerMessage {
            msg: Some(pb::server_message::Msg::Snapshot(pb::Snapshot {
                revision: 4,
                nonce: "n4".into(),
                grants_version: 9,
                ..Default::default()
            })),
        };
        // The stream stays open after the snapshot, like the real server's.
        let out = tokio_stream::iter([Ok(snap)]).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(out)))
    }
}

struct Sink {
    principals: StdMutex<Vec<pb::Principal>>,
    changes: watch::Sender<u64>,
    grants_versions: StdMutex<Vec<u64>>,
}

impl SnapshotSink for Sink {
    fn revision(&self) -> u64 {
        0
    }

    fn apply(&self, s: &pb::Snapshot) -> Result<(), String> {
        self.grants_versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(s.grants_version);
        Ok(())
    }

    fn principals(&self) -> Vec<pb::Principal> {
        self.principals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn principal_changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }
}

fn principal(session: &str, cgroup_id: u64) -> pb::Principal {
    pb::Principal {
        identity: "spiffe://t/a".into(),
        session: session.into(),
        cgroup_id,
        opt_outs: Vec::new(),
    }
}

async fn next(rx: &mut mpsc::Receiver<pb::NodeMessage>) -> Msg {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a node message within 5 s")
        .and_then(|m| m.msg)
        .expect("the stream is open")
}

/// The next `Principals`, skipping ACKs.
async fn next_principals(rx: &mut mpsc::Receiver<pb::NodeMessage>) -> Vec<pb::Principal> {
    loop {
        match next(rx).await {
            Msg::Principals(p) => return p.principals,
            Msg::Ack(_) => {}
            other => panic!("unexpected node message {other:?}"),
        }
    }
}

#[tokio::test]
async fn principals_follow_hello_and_every_change() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen, mut rx) = mpsc::channel(64);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeSyncServer::new(Server { seen }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let sink = Arc::new(Sink {
        principals: StdMutex::new(vec![principal("s1", 11)]),
        changes: watch::Sender::new(0),
        grants_versions: StdMutex::default(),
    });
    let stop = Shutdown::new();
    let client = tokio::spawn(run(
        ClientConfig::new(&format!("http://{addr}"), "n1"),
        sink.clone(),
        None,
        Arc::new(SyncStatus::default()),
        stop.subscribe(),
    ));

    match next(&mut rx).await {
        Msg::Hello(h) => assert_eq!(h.node, "n1"),
        other => panic!("Hello first, got {other:?}"),
    }
    assert_eq!(next_principals(&mut rx).await, vec![principal("s1", 11)]);
    match next(&mut rx).await {
        Msg::Ack(a) => assert_eq!((a.revision, a.nonce.as_str()), (4, "n4")),
        other => panic!("the snapshot's ACK, got {other:?}"),
    }
    assert_eq!(
        *sink
            .grants_versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
        vec![9]
    );

    sink.principals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(principal("s2", 12));
    sink.changes.send_modify(|v| *v += 1);
    assert_eq!(
        next_principals(&mut rx).await,
        vec![principal("s1", 11), principal("s2", 12)]
    );

    sink.principals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    sink.changes.send_modify(|v| *v += 1);
    assert!(next_principals(&mut rx).await.is_empty());

    stop.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
}
