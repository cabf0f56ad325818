//! `EventService.WatchEvents`: the fleet's events, as the agents forward them, filtered like
//! the agent's own stream and by node. A watcher that falls behind the buffer loses events;
//! they are counted (`PolicyStatusResponse.events_dropped`) and logged, never silent.

use std::{pin::Pin, sync::Arc, sync::atomic::Ordering};

use corral_events::hub::Filter;
use corral_proto::v1::{self as pb, event_service_server::EventService};
use corral_runtime::shutdown::ShutdownSignal;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::{instrument, warn};

use crate::{error::ServerError, fleet::Fleet};

pub struct Events {
    fleet: Arc<Fleet>,
    stop: ShutdownSignal,
}

impl Events {
    pub fn new(fleet: Arc<Fleet>, stop: ShutdownSignal) -> Self {
        Self { fleet, stop }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl EventService for Events {
    type WatchEventsStream = EventStream;

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
