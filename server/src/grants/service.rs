//! `GrantService` on gRPC, the expiry sweep, and the session observer.

use std::{sync::Arc, time::Duration};

use corral_proto::v1::{self as pb, grant_service_server::GrantService};
use corral_runtime::shutdown::ShutdownSignal;
use tonic::{Request, Response, Status};
use tracing::{instrument, warn};

use super::{Grants, convert::to_pb};
use crate::{
    auth::caller, error::ServerError, fleet::PrincipalKey, store::now_unix_nano,
    sync::SessionObserver,
};

/// How often active grants past their expiry are marked `EXPIRED`. The kernel stops honouring
/// a grant at its expiry by itself; this keeps records and snapshots accurate.
pub const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The gRPC face of [`Grants`].
pub struct GrantApi {
    grants: Arc<Grants>,
}

impl GrantApi {
    pub fn new(grants: Arc<Grants>) -> Self {
        Self { grants }
    }
}

fn done(
    g: Result<crate::store::grants::GrantRecord, super::GrantError>,
) -> Result<Response<pb::Grant>, Status> {
    let g = g.map_err(ServerError::from)?;
    Ok(Response::new(to_pb(&g)))
}

#[tonic::async_trait]
impl GrantService for GrantApi {
    #[instrument(skip_all, fields(identity = %req.get_ref().identity, grant = %req.get_ref().grant))]
    async fn request(&self, req: Request<pb::GrantRequest>) -> Result<Response<pb::Grant>, Status> {
        let c = caller(&req);
        done(self.grants.request(&c, req.get_ref()).await)
    }

    #[instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn approve(
        &self,
        req: Request<pb::GrantDecisionRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let c = caller(&req);
        let r = req.get_ref();
        done(self.grants.approve(&c, &r.id, &r.reason).await)
    }

    #[instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn deny(
        &self,
        req: Request<pb::GrantDecisionRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let c = caller(&req);
        let r = req.get_ref();
        done(self.grants.deny(&c, &r.id, &r.reason).await)
    }

    #[instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn revoke(
        &self,
        req: Request<pb::GrantDecisionRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let c = caller(&req);
        let r = req.get_ref();
        done(self.grants.revoke(&c, &r.id, &r.reason).await)
    }

    #[instrument(skip_all)]
    async fn list(
        &self,
        req: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let gs = self
            .grants
            .list(req.get_ref())
            .await
            .map_err(ServerError::from)?;
        Ok(Response::new(pb::ListGrantsResponse {
            grants: gs.iter().map(to_pb).collect(),
        }))
    }
}

#[async_trait::async_trait]
impl SessionObserver for Grants {
    async fn sessions_ended(&self, gone: &[PrincipalKey]) {
        if let Err(e) = self.end_sessions(gone).await {
            warn!(error = %corral_runtime::error_chain(&e), "ending session-bound grants failed");
        }
    }
}

/// Runs the expiry sweep every [`SWEEP_EVERY`] until shutdown.
pub async fn sweep_task(grants: Arc<Grants>, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {
                if let Err(e) = grants.sweep_once(now_unix_nano()).await {
                    warn!(error = %corral_runtime::error_chain(&e), "grant expiry sweep failed");
                }
            }
        }
    }
}
