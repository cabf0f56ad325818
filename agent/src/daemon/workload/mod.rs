//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, `proto/proto/spiffe/`) on a unix socket
//! (`--workload-socket`, `/run/corral/workload.sock` by default), served to the processes of
//! enrolled principals.
//!
//! - Attestation is the kernel's own: the caller's peer credentials and pidfd, taken when the
//!   connection was accepted (`peer.rs`), lead to its cgroup (or its sticky attribution) and
//!   so to its principal, and the process must still be alive once that is read (the pidfd
//!   says so; a reused pid is never taken for the caller). This is the local API's own check
//!   (`api::Api::standing`). A caller outside every principal gets `PermissionDenied`.
//! - Every call must carry `workload.spiffe.io: true` (`InvalidArgument` otherwise), as the
//!   standard requires against server-side request forgery.
//! - `FetchX509SVID` streams the principal's X.509-SVID at once and again at half of its
//!   lifetime; when the principal's session ends, the stream ends with `PermissionDenied` and
//!   nothing more is issued for it.
//! - `FetchX509Bundles` streams the trust bundle (the node CA, `ca.rs`), keyed by the SPIFFE
//!   ID of the principal's trust domain.
//! - The JWT-SVID profile is not served yet: those calls answer `Unimplemented`.

pub mod ca;

use std::{collections::HashMap, sync::Arc, time::Duration};

use corral_proto::spiffe::{self as pb, spiffe_workload_api_server::SpiffeWorkloadApi};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::{Shared, api, registry::PrincipalRecord};

/// How often a stream checks that its session still exists.
const SESSION_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Workload {
    shared: Arc<Shared>,
    ca: Arc<ca::Ca>,
    ttl: Duration,
}

impl Workload {
    pub fn new(shared: Arc<Shared>, ca: ca::Ca, ttl: Duration) -> Self {
        Self {
            shared,
            ca: Arc::new(ca),
            ttl,
        }
    }

    /// The caller's principal, after the header check.
    fn principal<T>(&self, req: &Request<T>) -> Result<Arc<PrincipalRecord>, Status> {
        let header = req
            .metadata()
            .get("workload.spiffe.io")
            .and_then(|v| v.to_str().ok());
        if header != Some("true") {
            return Err(Status::invalid_argument(
                "security header missing from request (workload.spiffe.io: true)",
            ));
        }
        let peer = req
            .extensions()
            .get::<super::peer::PeerInfo>()
            .ok_or_else(|| Status::permission_denied("the caller's credentials are unknown"))?;
        let api = api::Api {
            shared: self.shared.clone(),
        };
        match api.standing(peer) {
            Ok(api::Standing::Inside(Some(rec), why)) => {
                debug!(identity = %rec.identity, session = %rec.session, %why, "workload attested");
                Ok(rec)
            }
            Ok(api::Standing::Inside(None, why)) => Err(Status::permission_denied(format!(
                "{why}, but it is no longer enrolled"
            ))),
            Ok(api::Standing::Outside(pid)) => Err(Status::permission_denied(format!(
                "pid {pid} belongs to no principal: no identity to issue"
            ))),
            Err(e) => Err(Status::permission_denied(e.to_string())),
        }
    }

    /// Whether `rec`'s session is still enrolled.
    fn enrolled(&self, rec: &PrincipalRecord) -> bool {
        self.shared
            .registry
            .list()
            .iter()
            .any(|r| r.cgroup_id == rec.cgroup_id && r.session == rec.session)
    }

    fn svid_response(&self, rec: &PrincipalRecord) -> Result<pb::X509svidResponse, Status> {
        let svid = self
            .ca
            .issue(&rec.identity, &rec.session, self.ttl)
            .map_err(|e| Status::internal(corral_runtime::error_chain(&e)))?;
        info!(identity = %rec.identity, session = %rec.session, ttl = ?self.ttl, "X.509-SVID issued");
        Ok(pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: rec.identity.clone(),
                x509_svid: svid.cert,
                x509_svid_key: svid.key,
                bundle: self.ca.bundle.clone(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        })
    }

    /// Waits `d`, or until the stream is closed (`false`) or the session ends (an error sent,
    /// `false`).
    async fn wait<T>(
        &self,
        rec: &PrincipalRecord,
        tx: &mpsc::Sender<Result<T, Status>>,
        d: Duration,
    ) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                () = tx.closed() => return false,
                () = tokio::time::sleep_until(until) => return true,
                () = tokio::time::sleep(SESSION_CHECK) => {
                    if !self.enrolled(rec) {
                        info!(identity = %rec.identity, session = %rec.session, "session ended: nothing more is issued for it");
                        let _ = tx
                            .send(Err(Status::permission_denied("the session ended")))
                            .await;
                        return false;
                    }
                }
            }
        }
    }
}

/// `spiffe://td/...` → `spiffe://td`.
fn trust_domain_id(id: &str) -> String {
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    format!("spiffe://{}", rest.split('/').next().unwrap_or(rest))
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Workload {
    type FetchX509SVIDStream = Stream<pb::X509svidResponse>;
    type FetchX509BundlesStream = Stream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let rec = self.principal(&req)?;
        let first = self.svid_response(&rec)?;
        let (tx, rx) = mpsc::channel(2);
        let me = self.clone();
        tokio::spawn(async move {
            let mut next = Ok(first);
            loop {
                let stop = next.is_err();
                if tx.send(next).await.is_err() || stop {
                    return;
                }
                // Rotation at half-life.
                if !me.wait(&rec, &tx, me.ttl / 2).await {
                    return;
                }
                next = me.svid_response(&rec);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let rec = self.principal(&req)?;
        let (tx, rx) = mpsc::channel(2);
        let msg = pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: HashMap::from([(trust_domain_id(&rec.identity), self.ca.bundle.clone())]),
        };
        let me = self.clone();
        tokio::spawn(async move {
            if tx.send(Ok(msg)).await.is_ok() {
                // The bundle does not change while the agent runs: held open until the
                // client goes or the session ends.
                while me.wait(&rec, &tx, Duration::from_secs(3600)).await {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        self.principal(&req)?;
        Err(Status::unimplemented(
            "JWT-SVIDs are not issued by this agent yet",
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.principal(&req)?;
        Err(Status::unimplemented(
            "JWT bundles are not served by this agent yet",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        self.principal(&req)?;
        Err(Status::unimplemented(
            "JWT-SVIDs are not validated by this agent yet",
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_trust_domain_of_an_id() {
        assert_eq!(
            super::trust_domain_id("spiffe://e2e.corral/agent/x"),
            "spiffe://e2e.corral"
        );
        assert_eq!(super::trust_domain_id("spiffe://td"), "spiffe://td");
    }
}
