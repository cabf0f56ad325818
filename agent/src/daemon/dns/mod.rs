//! The DNS proxy for zones by host name. The kernel sends every DNS call (port 53, UDP or
//! TCP) of a principal under a policy with `hosts:` zones to `127.64.0.0/10` + the principal's
//! index, port `--dns-port` (see `agent-ebpf/src/dns.rs`); this proxy listens there, one UDP
//! socket and one TCP listener per principal, so the address a query arrives at says whose it
//! is. For each query:
//! - a name in no zone of the principal's policy is answered REFUSED (unless
//!   `spec.dns.allowUnlisted`, or the policy is in audit mode: then forwarded and recorded);
//! - otherwise it is forwarded to the upstream resolver, the CNAME chain in the answer is
//!   followed, and every address of the chain is written into `LEARNED` for this principal,
//!   in the zone of the name asked (or of the first name of the chain in a zone), until the
//!   answer's TTL, at least `--dns-ttl-floor-secs`, has passed, *before* the answer is
//!   released: the connect right after it is decided with the address already known;
//! - every query is a `dns` event.
//!
//! A principal whose processes are in a network namespace of their own (a pod, a container
//! with its own network) has its proxy address bound in that namespace too: when a container
//! is enrolled by its OCI hook (before it starts), and by a scan of the principals' processes
//! every second and on every enrolment (pods enrolled by the pod watch, processes that moved).
//! Such a binding ends when no process of the principal is left in the namespace.
//!
//! - [`message`]: parsing and building DNS messages (hickory-proto).
//! - [`upstream`]: the resolver queries are forwarded to.
//! - [`netns`]: sockets in other network namespaces.

pub mod message;
pub mod netns;
pub mod upstream;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use corral_policy::compiled::Mode;
use corral_proto::v1 as pb;
use hickory_proto::op::ResponseCode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    task::AbortHandle,
};
use tracing::{debug, info, warn};

use super::Shared;

/// Largest DNS message over UDP the proxy reads (EDNS0 sizes included).
const UDP_MAX: usize = 4096;

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    /// The node's resolver.
    pub upstream: Option<SocketAddr>,
    /// `upstream` was given (`--dns-upstream`): every principal's queries go there, pods'
    /// included, instead of their own `resolv.conf`'s resolver.
    pub upstream_given: bool,
    pub ttl_floor: Duration,
    /// Most addresses one principal keeps open by name at once.
    pub max_learned: u32,
}

/// How often principals' processes are scanned for network namespaces of their own.
const NETNS_SCAN: Duration = Duration::from_secs(1);

/// A principal's proxy binding: its index, and the network namespace (`None`: the agent's).
type BindKey = (u32, Option<netns::NetnsId>);

/// The tasks serving one binding, and when it was made.
#[derive(Debug)]
struct Binding {
    tasks: Vec<AbortHandle>,
    since: std::time::Instant,
}

impl Binding {
    fn new(tasks: Vec<AbortHandle>) -> Self {
        Self {
            tasks,
            since: std::time::Instant::now(),
        }
    }

    fn stop(&self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub queries: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    pub learned: std::sync::atomic::AtomicU64,
    /// Upstream failures (answered SERVFAIL) and addresses that could not be written.
    pub failures: std::sync::atomic::AtomicU64,
    /// Addresses not opened: the principal had `max_learned` open.
    pub capped: std::sync::atomic::AtomicU64,
}

/// The addresses principals' answers opened: (principal index, address) -> (the name asked,
/// expiry in boot-time ns), and how many each principal has.
#[derive(Debug, Default)]
struct Names {
    by_addr: HashMap<(u32, IpAddr), (Arc<str>, u64)>,
    per_principal: HashMap<u32, u32>,
}

impl Names {
    fn count(&self, index: u32) -> u32 {
        self.per_principal.get(&index).copied().unwrap_or(0)
    }

    fn insert(&mut self, index: u32, addr: IpAddr, name: &str, expires: u64) {
        if self
            .by_addr
            .insert((index, addr), (Arc::from(name), expires))
            .is_none()
        {
            *self.per_principal.entry(index).or_default() += 1;
        }
    }

    fn retain(&mut self, keep: impl Fn(u32, u64) -> bool) {
        self.by_addr
            .retain(|(index, _), (_, expires)| keep(*index, *expires));
        self.per_principal.clear();
        for (index, _) in self.by_addr.keys() {
            *self.per_principal.entry(*index).or_default() += 1;
        }
    }
}

/// The running proxy: its settings, the sockets bound per principal, and the name each
/// opened address was learned from.
#[derive(Debug)]
pub struct DnsProxy {
    pub settings: Settings,
    bound: Mutex<HashMap<BindKey, Binding>>,
    /// The threads in other network namespaces, by namespace.
    workers: Mutex<HashMap<netns::NetnsId, Arc<netns::Worker>>>,
    /// The agent's own network namespace (`None`: unreadable; no other is bound then).
    own_netns: Option<netns::NetnsId>,
    /// (principal index, address) -> (the name asked, expiry in boot-time ns): connect events
    /// to the address carry the name. Bounded like the kernel map (swept with it).
    names: Mutex<Names>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl DnsProxy {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            bound: Mutex::new(HashMap::new()),
            workers: Mutex::new(HashMap::new()),
            own_netns: netns::own().ok(),
            names: Mutex::new(Names::default()),
            counters: Counters::default(),
        }
    }

    fn bound(&self) -> std::sync::MutexGuard<'_, HashMap<BindKey, Binding>> {
        self.bound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name principal `index` learned `addr` from, if it did.
    pub fn name_of(&self, index: u32, addr: IpAddr) -> Option<Arc<str>> {
        self.names()
            .by_addr
            .get(&(index, addr))
            .map(|(n, _)| n.clone())
    }

    /// Principals' bindings in network namespaces other than the agent's.
    pub fn namespaces(&self) -> u32 {
        self.bound().keys().filter(|k| k.1.is_some()).count() as u32
    }

    /// Forgets the names of addresses expired at `now` (boot-time ns) or of principals gone.
    pub fn sweep_names(&self, now: u64, live: impl Fn(u32) -> bool) {
        self.names()
            .retain(|index, expires| expires > now && live(index));
    }

    /// The proxy address of principal `index`.
    pub fn addr(&self, index: u32) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(agent_common::dns::proxy_addr(index))),
            self.settings.port,
        )
    }

    /// Listens at principal `index`'s proxy address (UDP and TCP), if not yet. Called when a
    /// principal is enrolled, before the enrolment is answered, and for every principal the
    /// registry holds (see [`run`]). Must run inside the runtime.
    pub fn ensure(self: &Arc<Self>, shared: &Arc<Shared>, index: u32) -> std::io::Result<()> {
        let mut bound = self.bound();
        if bound.contains_key(&(index, None)) {
            return Ok(());
        }
        let addr = self.addr(index);
        let (udp, tcp) = bind(addr)?;
        let up = upstream::Route::Node(self.settings.upstream);
        bound.insert(
            (index, None),
            Binding::new(self.serve(shared, index, udp, tcp, up)?),
        );
        debug!(index, %addr, "DNS proxy listening for principal");
        Ok(())
    }

    /// Listens at principal `index`'s proxy address in the network namespace of process
    /// `pid` too, if that is not the agent's and not yet bound. Called when a container is
    /// enrolled (before it starts) and by the scan ([`run`]). Must run inside the runtime.
    pub fn ensure_in(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        index: u32,
        pid: i32,
    ) -> Result<(), NetnsBindError> {
        let Some(own) = self.own_netns else {
            return Ok(());
        };
        let id = netns::of_pid(pid).map_err(|_| netns::NetnsError::NoProcess(pid))?;
        if id == own {
            return Ok(());
        }
        self.bind_in(shared, index, id, pid)
    }

    /// [`Self::ensure_in`] for process `pid`, known to be in namespace `id` (not the agent's).
    fn bind_in(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        index: u32,
        id: netns::NetnsId,
        pid: i32,
    ) -> Result<(), NetnsBindError> {
        if self.bound().contains_key(&(index, Some(id))) {
            return Ok(());
        }
        let worker = self.worker(id, pid)?;
        let addr = self.addr(index);
        let (udp, tcp) = worker
            .run(move || bind(addr))
            .map_err(|source| NetnsBindError::Bind { addr, source })?;
        let up = if self.settings.upstream_given {
            upstream::Route::Node(self.settings.upstream)
        } else {
            upstream::Route::Netns {
                worker: worker.clone(),
                node: self.settings.upstream,
            }
        };
        let handles = self
            .serve(shared, index, udp, tcp, up)
            .map_err(|source| NetnsBindError::Bind { addr, source })?;
        self.bound()
            .insert((index, Some(worker.id)), Binding::new(handles));
        info!(index, netns = %worker.id, pid, %addr, "DNS proxy listening for principal in its network namespace");
        Ok(())
    }

    /// The thread in network namespace `id`, that of process `pid` (started by it if there is
    /// none).
    fn worker(
        &self,
        id: netns::NetnsId,
        pid: i32,
    ) -> Result<Arc<netns::Worker>, netns::NetnsError> {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = workers.get(&id) {
            return Ok(w.clone());
        }
        let w = Arc::new(netns::Worker::enter(pid)?);
        workers.insert(w.id, w.clone());
        Ok(w)
    }

    /// Serves the sockets bound for principal `index`.
    fn serve(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        index: u32,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        up: upstream::Route,
    ) -> std::io::Result<Vec<AbortHandle>> {
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let up = Arc::new(up);
        let u = tokio::spawn(serve_udp(
            self.clone(),
            shared.clone(),
            index,
            udp,
            up.clone(),
        ));
        let t = tokio::spawn(serve_tcp(self.clone(), shared.clone(), index, tcp, up));
        Ok(vec![u.abort_handle(), t.abort_handle()])
    }

    /// Stops listening for principals not in `keep`, and in namespaces where they have no
    /// process left (`seen`: the bindings in other namespaces found by the scan that started
    /// at `scanned`; one made since, by an enrolment, stays).
    fn retain(&self, keep: &HashSet<u32>, seen: &HashSet<BindKey>, scanned: std::time::Instant) {
        self.bound().retain(|key, b| {
            let live = keep.contains(&key.0)
                && (key.1.is_none() || seen.contains(key) || b.since >= scanned);
            if !live {
                b.stop();
                if let Some(ns) = key.1 {
                    info!(index = key.0, netns = %ns, "DNS proxy no longer listening in a network namespace (no process of the principal left there)");
                }
            }
            live
        });
        let used: HashSet<netns::NetnsId> = self.bound().keys().filter_map(|k| k.1).collect();
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| used.contains(id));
    }

    /// Binds principals' proxy addresses in the network namespaces their processes are in;
    /// returns the bindings that should stay.
    async fn scan(self: &Arc<Self>, shared: &Arc<Shared>) -> HashSet<BindKey> {
        let Some(own) = self.own_netns else {
            return HashSet::new();
        };
        let list = shared.registry.list();
        let cgroups: Vec<(u32, std::path::PathBuf)> =
            list.iter().map(|p| (p.index, p.cgroup.clone())).collect();
        let found = tokio::task::spawn_blocking(move || {
            cgroups
                .into_iter()
                .map(|(i, cg)| (i, netns::members(&cg, own)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut seen = HashSet::new();
        for (index, members) in found {
            for (id, pid) in members {
                if let Some(w) = self
                    .workers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&id)
                {
                    w.seen(pid);
                }
                match self.bind_in(shared, index, id, pid) {
                    Ok(()) => {
                        seen.insert((index, Some(id)));
                    }
                    Err(e) => {
                        debug!(index, pid, error = %e, "no DNS proxy in a principal's network namespace")
                    }
                }
            }
        }
        seen
    }

    fn stop_all(&self) {
        for (_, b) in self.bound().drain() {
            b.stop();
        }
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Answers one query of principal `index`; `None`: not a query (dropped).
    async fn handle(
        &self,
        shared: &Shared,
        index: u32,
        q: &[u8],
        t: Transport,
        route: &upstream::Route,
    ) -> Option<Vec<u8>> {
        let (msg, question) = message::query(q).ok()?;
        bump(&self.counters.queries);
        let Some(ctx) = Context::of(shared, index) else {
            bump(&self.counters.refused);
            return message::reply(&msg, ResponseCode::Refused).ok();
        };
        let policy = ctx.policy();
        let asked_zone = policy.zone_of_name(&question.name).map(|h| h.zone);
        let audit = policy.mode == Mode::Audit;
        let mut event = pb::DnsQuery {
            name: question.name.clone(),
            r#type: question.qtype.clone(),
            transport: t.name().into(),
            ..pb::DnsQuery::default()
        };
        if asked_zone.is_none() && !policy.dns_allow_unlisted && !audit {
            bump(&self.counters.refused);
            event.rcode = "REFUSED".into();
            event.chain = vec![question.name.clone()];
            ctx.publish(shared, event, pb::Verdict::Deny);
            return message::reply(&msg, ResponseCode::Refused).ok();
        }
        let verdict = if asked_zone.is_none() && !policy.dns_allow_unlisted {
            pb::Verdict::AuditDeny
        } else {
            pb::Verdict::Allow
        };
        let up = match route.upstream() {
            Some(u) => upstream::ask(&u, q, t == Transport::Tcp).await,
            None => Err(upstream::UpstreamError::None),
        };
        let up = match up {
            Ok(b) => b,
            Err(e) => {
                bump(&self.counters.failures);
                warn!(name = %question.name, error = %e, "DNS upstream failed: answered SERVFAIL");
                event.rcode = "SERVFAIL".into();
                ctx.publish(shared, event, verdict);
                return message::reply(&msg, ResponseCode::ServFail).ok();
            }
        };
        let Ok(answer) = message::answer(&up, &question.name) else {
            bump(&self.counters.failures);
            event.rcode = "SERVFAIL".into();
            ctx.publish(shared, event, verdict);
            return message::reply(&msg, ResponseCode::ServFail).ok();
        };
        let zone = asked_zone.or_else(|| {
            answer
                .chain
                .iter()
                .find_map(|n| policy.zone_of_name(n).map(|h| h.zone))
        });
        if let Some(zone) = zone {
            self.learn(shared, index, &ctx, zone, &question.name, &answer.addrs);
            event.zone = policy
                .zones
                .get(zone as usize)
                .map(|z| z.name.clone())
                .unwrap_or_default();
        }
        event.rcode = answer.rcode.clone();
        event.chain = answer.chain.clone();
        event.answers = answer.addrs.iter().map(|(a, _)| a.to_string()).collect();
        ctx.publish(shared, event, verdict);
        Some(up)
    }

    /// Opens the answer's addresses for the principal, before the answer is released.
    fn learn(
        &self,
        shared: &Shared,
        index: u32,
        ctx: &Context,
        zone: u32,
        name: &str,
        addrs: &[(IpAddr, u32)],
    ) {
        let Ok(now) = crate::clock::boottime_ns() else {
            bump(&self.counters.failures);
            return;
        };
        let floor = self.settings.ttl_floor.as_secs();
        let key = agent_common::policy_key(ctx.generation, ctx.slot);
        let mut enf = shared.enforcer();
        let mut names = self.names();
        for (addr, ttl) in addrs {
            let secs = u64::from(*ttl).max(floor);
            let expires = now.saturating_add(secs.saturating_mul(1_000_000_000));
            let known = names.by_addr.contains_key(&(index, *addr));
            // A principal at its cap opens nothing new (the node's map is shared): counted,
            // and the connect to the address is denied.
            if !known && names.count(index) >= self.settings.max_learned {
                bump(&self.counters.capped);
                debug!(index, %addr, name, "principal at --dns-max-learned: address not opened");
                continue;
            }
            match enf.maps().dns().learn(index, *addr, key, zone, expires) {
                Ok(()) => {
                    bump(&self.counters.learned);
                    if known || names.by_addr.len() < agent_common::maps::limits::LEARNED as usize {
                        names.insert(index, *addr, name, expires);
                    }
                }
                Err(e) => {
                    bump(&self.counters.failures);
                    warn!(%addr, error = %corral_runtime::error_chain(&e), "a DNS answer's address could not be opened (the connect to it will be denied)");
                }
            }
        }
    }
}

/// Whose query, under which policy.
struct Context {
    principal: pb::Principal,
    generation: u32,
    slot: u32,
    applied: Arc<super::policy::Generation>,
}

impl Context {
    fn of(shared: &Shared, index: u32) -> Option<Self> {
        let rec = shared.registry.get(index)?;
        let st = shared.policy_state();
        let generation = st.live?;
        let applied = st.current()?.clone();
        let slot = applied.compiled.policy_for(&rec.identity)?;
        Some(Self {
            principal: rec.to_pb(),
            generation,
            slot,
            applied,
        })
    }

    fn policy(&self) -> &corral_policy::CompiledPolicy {
        &self.applied.compiled.policies[self.slot as usize]
    }

    fn publish(&self, shared: &Shared, dns: pb::DnsQuery, verdict: pb::Verdict) {
        let reason = if dns.zone.is_empty() {
            pb::Reason::Default
        } else {
            pb::Reason::Rule
        };
        let e = pb::Event {
            seq: 0,
            time_unix_nano: crate::clock::unix_now_ns(),
            node: shared.resolved.node.clone(),
            principal: Some(self.principal.clone()),
            process: None,
            call: Some(pb::event::Call::Dns(dns)),
            decision: Some(pb::Decision {
                verdict: verdict.into(),
                reason: reason.into(),
                policy: self.policy().name.clone(),
                revision: self.applied.revision,
                ..pb::Decision::default()
            }),
            suppressed: 0,
            repeats: 0,
        };
        shared
            .hub
            .publish(&[Arc::new(corral_events::hub::HubEvent::from_pb(&e))]);
    }
}

/// A principal's listeners at `addr`: UDP and TCP, non-blocking.
fn bind(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(addr)?;
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}

/// Why a principal's proxy address could not be bound in another network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsBindError {
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

async fn serve_udp(
    proxy: Arc<DnsProxy>,
    shared: Arc<Shared>,
    index: u32,
    sock: Arc<UdpSocket>,
    up: Arc<upstream::Route>,
) {
    let mut buf = vec![0u8; UDP_MAX];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let q = buf[..n].to_vec();
        let (proxy, shared, sock, up) = (proxy.clone(), shared.clone(), sock.clone(), up.clone());
        tokio::spawn(async move {
            if let Some(r) = proxy.handle(&shared, index, &q, Transport::Udp, &up).await {
                let _ = sock.send_to(&r, from).await;
            }
        });
    }
}

async fn serve_tcp(
    proxy: Arc<DnsProxy>,
    shared: Arc<Shared>,
    index: u32,
    l: TcpListener,
    up: Arc<upstream::Route>,
) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let (proxy, shared, up) = (proxy.clone(), shared.clone(), up.clone());
        tokio::spawn(async move {
            let _ = serve_conn(&proxy, &shared, index, conn, &up).await;
        });
    }
}

/// DNS over TCP: length-prefixed messages, answered in turn until the client closes.
async fn serve_conn(
    proxy: &DnsProxy,
    shared: &Shared,
    index: u32,
    mut conn: TcpStream,
    up: &upstream::Route,
) -> std::io::Result<()> {
    loop {
        let len = match tokio::time::timeout(Duration::from_secs(10), conn.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            _ => return Ok(()),
        };
        let mut q = vec![0u8; len];
        conn.read_exact(&mut q).await?;
        let Some(r) = proxy.handle(shared, index, &q, Transport::Tcp, up).await else {
            return Ok(());
        };
        let n = u16::try_from(r.len()).map_err(std::io::Error::other)?;
        conn.write_u16(n).await?;
        conn.write_all(&r).await?;
    }
}

/// Keeps a proxy address bound for every enrolled principal, in the agent's network namespace
/// and in every other one its processes are in, until shutdown.
pub async fn run(
    proxy: Arc<DnsProxy>,
    shared: Arc<Shared>,
    mut stop: corral_runtime::shutdown::ShutdownSignal,
) {
    let mut changes = shared.registry.subscribe();
    let mut tick = tokio::time::interval(NETNS_SCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let list = shared.registry.list();
        let keep: HashSet<u32> = list.iter().map(|p| p.index).collect();
        for p in &list {
            if let Err(e) = proxy.ensure(&shared, p.index) {
                warn!(index = p.index, addr = %proxy.addr(p.index), error = %e, "cannot listen for a principal's DNS (its queries fail)");
            }
        }
        let scanned = std::time::Instant::now();
        let seen = proxy.scan(&shared).await;
        proxy.retain(&keep, &seen, scanned);
        tokio::select! {
            _ = stop.wait() => break,
            _ = tick.tick() => {}
            r = changes.changed() => if r.is_err() { break },
        }
    }
    proxy.stop_all();
}
