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
//! - `FetchJWTSVID` signs a JWT-SVID for the requested audience (`jwt.rs`), `FetchJWTBundles`
//!   streams the JWKS keyed by the trust domain's SPIFFE ID, and `ValidateJWTSVID` checks a
//!   token's signature, audience and expiry, and that its session still exists: a session's
//!   tokens stop validating when it ends.

pub mod ca;
pub mod jwt;

use std::{collections::HashMap, sync::Arc, time::Duration};

use corral_proto::spiffe::{self as pb, spiffe_workload_api_server::SpiffeWorkloadApi};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::{Shared, api, registry::PrincipalRecord};

#[derive(Clone)]
pub struct Workload {
    shared: Arc<Shared>,
    ca: Arc<ca::Ca>,
    ttl: Duration,
    jwt: Arc<jwt::JwtKey>,
    jwt_ttl: Duration,
}

impl Workload {
    pub fn new(
        shared: Arc<Shared>,
        ca: Arc<ca::Ca>,
        ttl: Duration,
        jwt: jwt::JwtKey,
        jwt_ttl: Duration,
    ) -> Self {
        Self {
            shared,
            ca,
            ttl,
            jwt: Arc::new(jwt),
            jwt_ttl,
        }
    }

    /// The ids of the grants active now for `rec`'s session (or all its identity's sessions).
    fn grants_of(&self, rec: &PrincipalRecord) -> Vec<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.shared
            .grants
            .grants()
            .into_iter()
            .filter(|g| {
                g.identity == rec.identity
                    && (g.session.is_empty() || g.session == rec.session)
                    && g.expires_unix_ns > now
            })
            .map(|g| g.id.to_string())
            .collect()
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

    /// Whether `rec`'s session is still enrolled (not removed, and its index not reused).
    fn enrolled(&self, rec: &PrincipalRecord) -> bool {
        self.shared
            .registry
            .live(rec.index)
            .is_some_and(|r| r.cgroup_id == rec.cgroup_id && r.session == rec.session)
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
                bundle: self.ca.bundle(),
                hint: String::new(),
            }],
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        })
    }

    /// Waits `d` (`true`), or until the stream is closed (`false`) or the session ends (an
    /// error sent, `false`). The session is looked at again on every change of the registry
    /// (`changes`, subscribed before the stream's first message), not polled.
    async fn wait<T>(
        &self,
        rec: &PrincipalRecord,
        tx: &mpsc::Sender<Result<T, Status>>,
        changes: &mut watch::Receiver<u64>,
        d: Duration,
    ) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            if !self.enrolled(rec) {
                info!(identity = %rec.identity, session = %rec.session, "session ended: nothing more is issued for it");
                let _ = tx
                    .send(Err(Status::permission_denied("the session ended")))
                    .await;
                return false;
            }
            tokio::select! {
                () = tx.closed() => return false,
                () = tokio::time::sleep_until(until) => return true,
                r = changes.changed() => if r.is_err() {
                    // The registry is gone: the agent is stopping.
                    return false;
                },
            }
        }
    }
}

impl Workload {
    /// A stream of `msg` once, held open until the client goes or the session ends: the
    /// bundles do not change while the agent runs.
    fn held<T: Send + 'static>(&self, rec: Arc<PrincipalRecord>, msg: T) -> Stream<T> {
        let (tx, rx) = mpsc::channel(2);
        let me = self.clone();
        let mut changes = self.shared.registry.subscribe();
        tokio::spawn(async move {
            if tx.send(Ok(msg)).await.is_ok() {
                while me
                    .wait(&rec, &tx, &mut changes, Duration::from_secs(3600))
                    .await
                {}
            }
        });
        ReceiverStream::new(rx)
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
        let mut changes = self.shared.registry.subscribe();
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
                if !me.wait(&rec, &tx, &mut changes, me.ttl / 2).await {
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
        let msg = pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: HashMap::from([(trust_domain_id(&rec.identity), self.ca.bundle())]),
        };
        Ok(Response::new(self.held(rec, msg)))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let rec = self.principal(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !r.spiffe_id.is_empty() && r.spiffe_id != rec.identity {
            return Err(Status::permission_denied(format!(
                "{} is not this workload's identity",
                r.spiffe_id
            )));
        }
        let iat = jwt::now_secs();
        let claims = jwt::Claims {
            sub: rec.identity.clone(),
            aud: r.audience,
            iat,
            exp: iat + self.jwt_ttl.as_secs(),
            corral_session: rec.session.clone(),
            corral_grants: self.grants_of(&rec),
        };
        let token = self
            .jwt
            .sign(&claims)
            .map_err(|e| Status::internal(corral_runtime::error_chain(&e)))?;
        info!(identity = %rec.identity, session = %rec.session, aud = ?claims.aud, grants = ?claims.corral_grants, "JWT-SVID issued");
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: rec.identity.clone(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let rec = self.principal(&req)?;
        let msg = pb::JwtBundlesResponse {
            bundles: HashMap::from([(trust_domain_id(&rec.identity), self.jwt.jwks.clone())]),
        };
        Ok(Response::new(self.held(rec, msg)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        self.principal(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let claims = self
            .jwt
            .validate(&r.svid, &r.audience)
            .map_err(|e| Status::invalid_argument(format!("the JWT-SVID is not valid: {e}")))?;
        let alive = self
            .shared
            .registry
            .list()
            .iter()
            .any(|p| p.identity == claims.sub && p.session == claims.corral_session);
        if !alive {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID's session {} of {} has ended",
                claims.corral_session, claims.sub
            )));
        }
        let json = serde_json::to_value(&claims).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: claims.sub,
            claims: match to_struct(json) {
                prost_types::value::Kind::StructValue(s) => Some(s),
                _ => None,
            },
        }))
    }
}

/// JSON as protobuf's `Struct`/`Value`.
fn to_struct(v: serde_json::Value) -> prost_types::value::Kind {
    use prost_types::value::Kind;
    match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a
                .into_iter()
                .map(|v| prost_types::Value {
                    kind: Some(to_struct(v)),
                })
                .collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        prost_types::Value {
                            kind: Some(to_struct(v)),
                        },
                    )
                })
                .collect(),
        }),
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
