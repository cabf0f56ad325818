//! `EventService.WatchEvents`: the fleet's events, as the agents forward them, filtered like
//! the agent's own stream and by node. A watcher that falls behind the buffer loses events;
//! they are counted (`PolicyStatusResponse.events_dropped`) and logged, never silent.
//! `EventService.ListEvents`: the recorded history (see `history.rs`), oldest first, with
//! the same filter, a node and a time window.

use std::{pin::Pin, sync::Arc, sync::atomic::Ordering};

use corral_events::hub::{Filter, HubEvent};
use corral_proto::v1::{self as pb, event_service_server::EventService};
use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::{instrument, warn};

use crate::{
    error::ServerError,
    fleet::Fleet,
    store::events::{EventLog, EventQuery},
};

pub struct Events {
    fleet: Arc<Fleet>,
    log: Arc<dyn EventLog>,
    stop: ShutdownSignal,
}

impl Events {
    pub fn new(fleet: Arc<Fleet>, log: Arc<dyn EventLog>, stop: ShutdownSignal) -> Self {
        Self { fleet, log, stop }
    }
}

/// Events read from the history per database query.
const PAGE: usize = 1_024;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Events {
    type WatchEventsStream = EventStream;
    type ListEventsStream = EventStream;

    #[instrument(skip_all)]
    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<Self::ListEventsStream>, Status> {
        let r = req.into_inner();
        let filter =
            Filter::new(r.filter).map_err(|e| ServerError::BadRequest(format!("filter: {e}")))?;
        let limit = usize::try_from(r.limit).unwrap_or(usize::MAX);
        let mut q = EventQuery {
            after_id: 0,
            node: r.node,
            since_unix_nano: r.since_unix_nano,
            until_unix_nano: r.until_unix_nano,
            limit: PAGE,
        };
        let log = self.log.clone();
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut sent = 0usize;
            loop {
                let page = match log.events(&q).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(corral_runtime::error_chain(&e))))
                            .await;
                        return;
                    }
                };
                let Some(last) = page.last() else { return };
                q.after_id = last.id;
                let full = page.len() == PAGE;
                for stored in page {
                    let Ok(ev) = <pb::Event as prost::Message>::decode(stored.encoded.as_slice())
                    else {
                        continue;
                    };
                    if !filter.matches(&HubEvent::from_pb(&ev)) {
                        continue;
                    }
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                    sent += 1;
                    if limit != 0 && sent >= limit {
                        return;
                    }
                }
                if !full {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    #[instrument(skip_all)]
    async fn watch_events(
        &self,
        req: Request<pb::FleetWatchRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        let filter =
            Filter::new(r.filter).map_err(|e| ServerError::BadRequest(format!("filter: {e}")))?;
        let node = r.node;
        let mut rx = self.fleet.watch_events();
        let (tx, out) = mpsc::channel(256);
        let fleet = self.fleet.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let e = tokio::select! {
                    _ = stop.wait() => return,
                    _ = tx.closed() => return,
                    e = rx.recv() => e,
                };
                match e {
                    Ok(e) => {
                        if !filter.matches(&e) {
                            continue;
                        }
                        let Ok(ev) = e.to_pb() else { continue };
                        if !node.is_empty() && ev.node != node {
                            continue;
                        }
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        fleet.events_dropped.fetch_add(n, Ordering::Relaxed);
                        warn!(
                            lost = n,
                            "a fleet event watcher read too slowly and lost events"
                        );
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
