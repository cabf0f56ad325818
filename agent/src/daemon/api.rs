//! The local API: `AgentService` over the unix socket, authorized by the socket's peer
//! credentials and pidfd (see `peer`). Only root (or the configured group) may enrol; a
//! caller whose cgroup is a principal's (or inside one, or attributed to one after leaving
//! its cgroup) is refused everything that changes state, the event stream and `Explain`, and
//! its `Status` shows its own principal only.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
};

use corral_events::hub::{Filter, FilterError};
use corral_policy::{
    eval::ConnectCall,
    explain::{Call, Target, explain, explain_name, parse_target},
};
use corral_proto::v1::{self as pb, agent_service_server::AgentService};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::{
    Shared,
    containers::{self, ContainerError},
    peer::PeerInfo,
    pipeline::{grant_could_help, reason_pb, verdict_pb},
    registry::{RegistryError, opt_outs, random_session},
    status,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("permission denied: {0}")]
    Denied(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("bad --connect value `{0}`: write ADDR:PORT[/tcp|udp], IPv6 as [ADDR]:PORT")]
    Connect(String),
    #[error("explain needs a connect or an exec")]
    NoCall,
    #[error("no policy is enforced yet")]
    NoPolicy,
    #[error(transparent)]
    Container(#[from] super::containers::ContainerError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = corral_runtime::error_chain(&e);
        match e {
            ApiError::Denied(_) => Status::permission_denied(msg),
            ApiError::Registry(
                RegistryError::Identity(_) | RegistryError::Session(_) | RegistryError::OptOut(_),
            )
            | ApiError::Filter(_)
            | ApiError::Connect(_)
            | ApiError::NoCall
            | ApiError::Container(
                ContainerError::Identity(_)
                | ContainerError::Scope { .. }
                | ContainerError::Session(_),
            ) => Status::invalid_argument(msg),
            ApiError::Container(_) => Status::failed_precondition(msg),
            ApiError::Registry(RegistryError::Full) => Status::resource_exhausted(msg),
            ApiError::NoPolicy => Status::failed_precondition(msg),
            ApiError::Registry(_) => Status::internal(msg),
        }
    }
}

/// Who is calling: the socket's peer, taken when the connection was accepted.
type Peer = PeerInfo;

fn peer<T>(req: &Request<T>) -> Result<Peer, ApiError> {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| ApiError::Denied("the caller's credentials are unknown".into()))
}

/// Where a caller stands.
pub(super) enum Standing {
    /// Outside every principal: its pid.
    Outside(i32),
    /// Inside a principal (its record, if it is still enrolled), with the reason.
    Inside(Option<Arc<super::registry::PrincipalRecord>>, String),
}

/// The cgroup v2 directory of `pid` (absolute, under `root`).
fn cgroup_of(root: &Path, pid: i32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = s.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim().trim_start_matches('/')))
}

/// Supplementary groups of `pid`.
fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// `s` as a caller inside principal `rec` may see it: its own principal and its own grants;
/// no other principal, grant or pod.
fn own_view(s: &mut pb::AgentStatus, rec: Option<&super::registry::PrincipalRecord>) {
    let mine = |identity: &str, session: &str| {
        rec.is_some_and(|r| r.identity == identity && (session.is_empty() || r.session == session))
    };
    s.principals.retain(|p| {
        p.principal
            .as_ref()
            .is_some_and(|pr| rec.is_some_and(|r| r.cgroup_id == pr.cgroup_id))
    });
    s.grants.retain(|g| mine(&g.identity, &g.session));
    s.unenrolled_pods.clear();
}

pub struct Api {
    pub shared: Arc<Shared>,
}

impl Api {
    /// Where the caller stands: outside every principal, or inside one (in its cgroup or
    /// below, or attributed to it stickily after leaving the cgroup). The caller's process
    /// must still be alive once this is read (its pidfd says so), so a pid reused by another
    /// process in between is never taken for the caller.
    pub(super) fn standing(&self, p: &Peer) -> Result<Standing, ApiError> {
        let pid = p
            .pid
            .ok_or_else(|| ApiError::Denied("the caller's pid is unknown".into()))?;
        let cg = cgroup_of(&self.shared.resolved.cgroup_root, pid).ok_or_else(|| {
            ApiError::Denied(format!("the cgroup of caller pid {pid} cannot be read"))
        })?;
        let records = self.shared.registry.list();
        // The sticky map (behind the enforcer lock) only when the cgroup did not decide.
        let sticky = || {
            let tgid = u32::try_from(pid).unwrap_or(u32::MAX);
            self.shared.enforcer().maps().sticky_cgroup(tgid)
        };
        let standing = if self.shared.registry.is_inside_principal(&cg) {
            let rec = records.iter().find(|r| cg.starts_with(&r.cgroup)).cloned();
            Standing::Inside(
                rec,
                format!(
                    "pid {pid} runs inside an enrolled principal ({})",
                    cg.display()
                ),
            )
        } else if let Some(rec) = sticky().and_then(|id| records.iter().find(|r| r.cgroup_id == id))
        {
            Standing::Inside(
                Some(rec.clone()),
                format!(
                    "pid {pid} belongs to an enrolled principal (cgroup id {}; it left the \
                     cgroup)",
                    rec.cgroup_id
                ),
            )
        } else {
            Standing::Outside(pid)
        };
        if p.alive() == Some(false) {
            return Err(ApiError::Denied(format!(
                "caller pid {pid} exited while it was checked (its pid may be another \
                 process's now)"
            )));
        }
        Ok(standing)
    }

    /// `SPIFFE_ENDPOINT_SOCKET` for the agent's Workload API socket, if it serves one.
    fn workload_endpoint(&self) -> String {
        match self.shared.resolved.config.workload_socket.as_deref() {
            Some(p) if !p.as_os_str().is_empty() => format!("unix://{}", p.display()),
            _ => String::new(),
        }
    }

    /// The caller's pid, if the caller is outside every principal. `what` names the refused
    /// action.
    fn outside_principals(&self, p: &Peer, what: &str) -> Result<i32, ApiError> {
        match self.standing(p)? {
            Standing::Outside(pid) => Ok(pid),
            Standing::Inside(_, why) => Err(ApiError::Denied(format!("{why} and may not {what}"))),
        }
    }

    /// Enrols through `enroll` (given the policy slot governing `identity` now), then brings
    /// the kernel's grants in line, before the caller starts anything in the principal.
    fn enroll_under_policy(
        &self,
        identity: &str,
        enroll: impl FnOnce(
            &super::registry::Registry,
            Option<u32>,
            &mut crate::ebpf::PolicyMaps,
        ) -> Result<Arc<super::registry::PrincipalRecord>, RegistryError>,
    ) -> Result<Arc<super::registry::PrincipalRecord>, ApiError> {
        let mut enf = self.shared.enforcer();
        let slot = self
            .shared
            .policy_state()
            .current()
            .and_then(|g| g.compiled.policy_for(identity));
        let rec = enroll(&self.shared.registry, slot, enf.maps())?;
        self.shared.reconcile_grants(enf.maps());
        drop(enf);
        // Its DNS proxy address listens before anything runs in the principal.
        if let Some(d) = &self.shared.dns
            && let Err(e) = d.ensure(&self.shared, rec.index)
        {
            tracing::warn!(index = rec.index, error = %e, "cannot listen for the principal's DNS");
        }
        Ok(rec)
    }

    /// A container without `corral.dev/identity` whose cgroup is inside a principal already
    /// (a pod enrolled by its sandbox's hook or by the pod watch): it is that principal's, and
    /// its files are where the principal's exec rules are resolved for it. Anywhere else it is
    /// not Corral's (`enrolled: false`).
    fn join_container(
        &self,
        r: &pb::EnrollContainerRequest,
    ) -> Result<pb::EnrollContainerResponse, ApiError> {
        let pid = i32::try_from(r.pid).unwrap_or(-1);
        let root = &self.shared.resolved.cgroup_root;
        let Ok(cgroup) = containers::cgroup_to_enrol(root, pid, None) else {
            return Ok(pb::EnrollContainerResponse::default());
        };
        let Some(rec) = self.shared.registry.principal_containing(&cgroup) else {
            return Ok(pb::EnrollContainerResponse::default());
        };
        self.record_container(r, &rec, "joined")
    }

    /// The last steps of a container's enrolment (`action`: `enrolled`, `joined`): its view
    /// recorded and the exec rules of its principal resolved in it, before it may start;
    /// counted and published.
    fn record_container(
        &self,
        r: &pb::EnrollContainerRequest,
        rec: &super::registry::PrincipalRecord,
        action: &str,
    ) -> Result<pb::EnrollContainerResponse, ApiError> {
        let pid = i32::try_from(r.pid).unwrap_or(-1);
        let rootfs = (!r.rootfs.is_empty()).then(|| std::path::PathBuf::from(&r.rootfs));
        self.shared
            .container_views
            .record(
                &r.container_id,
                &rec.identity,
                &rec.cgroup,
                pid,
                rootfs.as_deref(),
            )
            .map_err(|e| ContainerError::Files {
                pid,
                reason: e.to_string(),
            })?;
        self.shared.resolve_container_exec_rules(&rec.identity)?;
        // A container with a network of its own: its DNS proxy address listens there before
        // it starts (its DNS fails closed otherwise, until the scan binds it).
        if let Some(d) = &self.shared.dns
            && let Err(e) = d.ensure_in(&self.shared, rec.index, pid)
        {
            tracing::warn!(index = rec.index, pid, error = %e, "cannot listen for the container's DNS in its network namespace");
        }
        self.shared
            .containers
            .enrolled
            .fetch_add(1, Ordering::Relaxed);
        info!(identity = %rec.identity, session = %rec.session, cgroup = %rec.cgroup.display(), action, "container enrolled by its OCI hook");
        self.shared.publish_container(
            pb::ContainerChange {
                container_id: r.container_id.clone(),
                action: action.into(),
                pid: r.pid,
                cgroup_path: rec.cgroup.display().to_string(),
                reason: String::new(),
            },
            Some(rec.to_pb()),
            crate::clock::unix_now_ns(),
        );
        Ok(pb::EnrollContainerResponse {
            enrolled: true,
            principal: Some(rec.to_pb()),
            cgroup_path: rec.cgroup.display().to_string(),
        })
    }

    /// A state-changing call: the caller must be root or in the enrol group, and must not
    /// run inside a principal.
    fn authorize_change(&self, p: &Peer) -> Result<(), ApiError> {
        let pid = self.outside_principals(p, "change agent state")?;
        let group_ok = self
            .shared
            .resolved
            .config
            .enroll_gid
            .is_some_and(|g| p.gid == g || groups_of(pid).contains(&g));
        if p.uid != 0 && !group_ok {
            return Err(ApiError::Denied(format!(
                "uid {} may not enrol: only root or the agent's enrol group may",
                p.uid
            )));
        }
        Ok(())
    }
}

/// The grant template that would allow an explained connect that is denied by a rule or the
/// default, as the event of that connect would name it.
fn explain_grant_available(
    generation: &super::policy::Generation,
    identity: &str,
    c: &ConnectCall,
    d: &corral_policy::eval::Decision,
) -> Option<String> {
    if !grant_could_help(d.verdict, d.reason) {
        return None;
    }
    let slot = generation.compiled.policy_for(identity)?;
    generation
        .grant_available(slot, d.zone?, c.port, c.proto)
        .map(str::to_owned)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

fn parse_connect(s: &str) -> Result<Target, ApiError> {
    parse_target(s).map_err(|_| ApiError::Connect(s.into()))
}

/// The addresses `name` resolves to from the agent (the resolver its DNS proxy forwards to,
/// when set; else the system's), IPv4-mapped as IPv4, deduplicated.
async fn resolve_for_explain(shared: &super::Shared, name: &str) -> Result<Vec<IpAddr>, ApiError> {
    let bad =
        |e: String| ApiError::Connect(format!("{name}: cannot resolve it from the agent: {e}"));
    let mut out: Vec<IpAddr> = match shared.dns.as_ref().and_then(|d| d.settings.upstream) {
        Some(up) => super::dns::upstream::resolve_a(up, name)
            .await
            .map_err(|e| bad(e.to_string()))?,
        None => tokio::net::lookup_host((name, 0))
            .await
            .map_err(|e| bad(e.to_string()))?
            .map(|sa| sa.ip())
            .collect(),
    };
    for a in &mut out {
        if let IpAddr::V6(v6) = a
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            *a = IpAddr::V4(v4);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[tonic::async_trait]
impl AgentService for Api {
    #[instrument(skip_all, fields(identity = %req.get_ref().identity, session = %req.get_ref().session))]
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let p = peer(&req)?;
        if let Err(e) = self.authorize_change(&p) {
            info!(uid = p.uid, pid = ?p.pid, "enrol refused: {e}");
            return Err(e.into());
        }
        let r = req.into_inner();
        let opt_outs = opt_outs(&r.user, &r.caps, r.no_seccomp).map_err(ApiError::from)?;
        if !opt_outs.is_empty() {
            info!(identity = %r.identity, opt_outs = ?opt_outs, "containment opt-outs");
        }
        let session = if r.session.is_empty() {
            random_session()
        } else {
            r.session
        };
        let rec = self.enroll_under_policy(&r.identity, |registry, slot, maps| {
            registry.enroll(
                &r.identity,
                &session,
                &opt_outs,
                p.pidfd.clone(),
                slot,
                maps,
            )
        })?;
        // `corral run` in a network namespace of its own: the proxy listens there too before
        // the command starts.
        if let (Some(d), Some(pid)) = (&self.shared.dns, p.pid)
            && let Err(e) = d.ensure_in(&self.shared, rec.index, pid)
        {
            tracing::warn!(index = rec.index, pid, error = %e, "cannot listen for the principal's DNS in its network namespace");
        }
        Ok(Response::new(pb::EnrollResponse {
            principal: Some(rec.to_pb()),
            cgroup_path: rec.cgroup.display().to_string(),
            workload_endpoint: self.workload_endpoint(),
        }))
    }

    #[instrument(skip_all, fields(container = %req.get_ref().container_id, pid = req.get_ref().pid))]
    async fn enroll_container(
        &self,
        req: Request<pb::EnrollContainerRequest>,
    ) -> Result<Response<pb::EnrollContainerResponse>, Status> {
        let p = peer(&req)?;
        self.outside_principals(&p, "enrol containers")?;
        if p.uid != 0 {
            return Err(ApiError::Denied(format!(
                "uid {} may not enrol containers: only root (the container runtime) may",
                p.uid
            ))
            .into());
        }
        let r = req.into_inner();
        let resolved = &self.shared.resolved;
        let mapping = resolved.config.k8s.mapping(&resolved.node).ok().flatten();
        let Some(who) = containers::who(&r.container_id, &r.annotations, mapping.as_ref())
            .map_err(ApiError::from)?
        else {
            return self
                .join_container(&r)
                .map(Response::new)
                .map_err(Into::into);
        };
        let pid = i32::try_from(r.pid).unwrap_or(-1);
        let root = &resolved.cgroup_root;
        let cgroup = containers::cgroup_to_enrol(root, pid, who.pod_uid.as_deref())
            .map_err(ApiError::from)?;
        // Never a cgroup holding the agent itself (a runtime without cgroups leaves its
        // containers in the root cgroup): that would police the whole node.
        let own = cgroup_of(root, i32::try_from(std::process::id()).unwrap_or(-1));
        if cgroup == *root || own.as_ref().is_some_and(|o| o.starts_with(&cgroup)) {
            return Err(ApiError::Denied(format!(
                "container pid {pid} runs in {}, which holds the agent (or every process): \
                 give the container a cgroup of its own",
                cgroup.display()
            ))
            .into());
        }
        let rec = self.enroll_under_policy(&who.identity, |registry, slot, maps| {
            registry.enroll_cgroup(&who.identity, &who.session, &cgroup, slot, maps)
        })?;
        Ok(Response::new(self.record_container(&r, &rec, "enrolled")?))
    }

    type WatchEventsStream = EventStream;

    #[instrument(skip_all, fields(follow = req.get_ref().follow))]
    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Every principal's decisions are in the stream: a principal may not watch them (it
        // would learn what its neighbours do, and which of its own probes were denied).
        self.outside_principals(&peer(&req)?, "watch events")?;
        let r = req.into_inner();
        let filter = Filter::new(r.filter).map_err(ApiError::from)?;
        let sub = self.shared.hub.subscribe(filter, r.follow);
        // The hub's events are encoded once; each subscriber sends the shared bytes.
        let history = tokio_stream::iter(
            sub.history
                .into_iter()
                .map(|e| Ok(pb::WatchEventsResponse::shared(e.encoded.clone(), 0))),
        );
        let stream: EventStream = match sub.rx {
            Some(rx) => {
                let dropped = sub.dropped;
                let live = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |e| {
                    Ok(pb::WatchEventsResponse::shared(
                        e.encoded.clone(),
                        dropped.load(Ordering::Relaxed),
                    ))
                });
                Box::pin(history.chain(live))
            }
            None => Box::pin(history),
        };
        Ok(Response::new(stream))
    }

    #[instrument(skip_all)]
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::AgentStatus>, Status> {
        let standing = self.standing(&peer(&req)?)?;
        let mut s = status::build(&self.shared);
        if let Standing::Inside(rec, _) = standing {
            // A principal sees its own principal and grants, nobody else's.
            own_view(&mut s, rec.as_deref());
        }
        Ok(Response::new(s))
    }

    #[instrument(skip_all, fields(identity = %req.get_ref().identity))]
    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        // Explaining is reading the policies: not for a principal (it could map what any
        // identity may do).
        self.outside_principals(&peer(&req)?, "explain policies")?;
        let r = req.into_inner();
        corral_policy::identity::validate_id(&r.identity)
            .map_err(|e| ApiError::Registry(RegistryError::Identity(e)))?;
        let mut named: Option<(String, Vec<ConnectCall>)> = None;
        let call = match r.call {
            Some(pb::explain_request::Call::Connect(c)) => match parse_connect(&c)? {
                Target::Addr(c) => Call::Connect(c),
                Target::Name { name, port, proto } => {
                    let addrs = resolve_for_explain(&self.shared, &name).await?;
                    let calls: Vec<ConnectCall> = addrs
                        .into_iter()
                        .map(|addr| ConnectCall { addr, port, proto })
                        .collect();
                    let first = *calls
                        .first()
                        .ok_or_else(|| ApiError::Connect(format!("{name}: no address")))?;
                    named = Some((name, calls));
                    Call::Connect(first)
                }
            },
            Some(pb::explain_request::Call::Exec(p)) => {
                let resolved = std::fs::canonicalize(&p)
                    .map(|x| x.display().to_string())
                    .unwrap_or_else(|_| p.clone());
                Call::Exec { given: p, resolved }
            }
            None => return Err(ApiError::NoCall.into()),
        };
        let generation = self
            .shared
            .policy_state()
            .current()
            .cloned()
            .ok_or(ApiError::NoPolicy)?;
        let (x, text) = match &named {
            Some((name, calls)) => {
                let all: Vec<_> = calls
                    .iter()
                    .map(|c| explain_name(&generation.compiled, &r.identity, name, *c))
                    .collect();
                let text = all
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n\n");
                (all[0].clone(), text)
            }
            None => {
                let x = explain(&generation.compiled, &r.identity, call.clone());
                let text = x.to_string();
                (x, text)
            }
        };
        let grant_available = match &call {
            Call::Connect(c) => explain_grant_available(&generation, &r.identity, c, &x.decision),
            Call::Exec { .. } => None,
        };
        Ok(Response::new(pb::ExplainResponse {
            decision: Some(pb::Decision {
                verdict: verdict_pb(x.decision.verdict) as i32,
                reason: reason_pb(x.decision.reason) as i32,
                policy: x.policy.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                revision: generation.revision,
                rule_index: x.decision.rule,
                grant_id: String::new(),
                grant_available: grant_available.unwrap_or_default(),
            }),
            zone: x.zone.clone().unwrap_or_default(),
            rule_location: x.rule_at.clone().unwrap_or_default(),
            explanation: text,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Result<ConnectCall, ApiError> {
        match parse_connect(s)? {
            Target::Addr(c) => Ok(c),
            Target::Name { .. } => Err(ApiError::Connect(s.into())),
        }
    }

    #[test]
    fn connect_values_parse_like_the_cli_documents() -> Result<(), ApiError> {
        let c = addr("127.0.0.1:9090")?;
        assert_eq!(c.port, 9090);
        assert_eq!(c.proto, agent_common::PROTO_TCP);
        let c = addr("[::ffff:10.0.0.1]:53/udp")?;
        assert_eq!(c.addr, "10.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(c.proto, agent_common::PROTO_UDP);
        assert!(parse_connect("1.2.3.4:1/sctp").is_err());
        assert!(parse_connect("1.2.3.4").is_err());
        Ok(())
    }

    #[test]
    fn explain_names_the_grant_that_would_allow_a_denied_connect() -> Result<(), ApiError> {
        let src = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: p }\nspec:\n  identities: [spiffe://t/a]\n  zones:\n    db: { cidrs: [10.20.0.0/16] }\n  connect:\n    - { action: allow, zones: [db], ports: [5432] }\n  grants:\n    - { name: db-write, zones: [db], ports: [5433], maxTtl: 15m, approval: required }\n";
        let generation = super::super::policy::Generation {
            revision: 1,
            compiled: Arc::new(corral_policy::compile_str("p.yaml", src, 1).expect("valid")),
        };
        let ask = |identity: &str, to: &str| -> Result<Option<String>, ApiError> {
            let c = addr(to)?;
            let x = explain(&generation.compiled, identity, Call::Connect(c));
            Ok(explain_grant_available(
                &generation,
                identity,
                &c,
                &x.decision,
            ))
        };
        assert_eq!(
            ask("spiffe://t/a", "10.20.0.1:5433")?.as_deref(),
            Some("db-write")
        );
        // Allowed, or no template for that port, or no policy for the identity: none.
        assert_eq!(ask("spiffe://t/a", "10.20.0.1:5432")?, None);
        assert_eq!(ask("spiffe://t/a", "10.20.0.1:5434")?, None);
        assert_eq!(ask("spiffe://t/zzz", "10.20.0.1:5433")?, None);
        Ok(())
    }

    #[test]
    fn errors_map_to_real_codes() {
        let s: Status = ApiError::Denied("x".into()).into();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        let s: Status = ApiError::Registry(RegistryError::Session("a/b".into())).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: Status = ApiError::NoPolicy.into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    }
}
