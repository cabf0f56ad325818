//! `corral-agent --policy FILE` (standalone) or `--server URL` (managed): the node daemon.
//!
//! - [`config`]: the one configuration struct (flags, `CORRAL_*` env, defaults).
//! - [`registry`]: principals (identity + session + cgroup), persisted in the state dir.
//! - [`policy`]: compile, apply atomically, keep the previous policy on rejection.
//! - [`pipeline`]: ring buffer → enrichment → the event hub (`corral_events::hub`).
//! - [`api`]: `AgentService` on the unix socket; [`status`] and [`metrics`].
//! - [`k8s`]: `--kubernetes`: the pods on this node that opt in, enrolled as principals.
//! - [`containers`]: containers enrolled synchronously by the OCI hook, and the hook's
//!   fail-open records; [`container_views`]: their mount namespaces, where their exec rules
//!   are resolved.
//! - [`sync`]: with `--server`, the node side of `NodeSync` (snapshots, ACK/NACK, events,
//!   the principals report).
//! - [`grants`]: the grants in force (from the server's snapshots), kept in the kernel's
//!   grant map for the principals enrolled now.
//!
//! Start: load (or adopt) the pinned programs, read the principals the previous agent left,
//! apply the policy (or the last-known-good one), then serve. Stop: the tasks drain, and the
//! pins stay (enforcement continues) unless `--uninstall`.

pub mod api;
pub mod config;
pub mod container_views;
pub mod containers;
pub mod dns;
pub mod exec_watch;
pub mod grants;
pub mod k8s;
pub mod metrics;
#[expect(
    unsafe_code,
    reason = "SO_PEERPIDFD and pidfd_send_signal; SAFETY notes inside"
)]
pub mod peer;
pub mod pipeline;
pub mod policy;
pub mod registry;
pub mod status;
pub mod sync;
pub mod workload;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::Ordering,
    },
    time::Duration,
};

use corral_events::hub::{self, Hub};
use corral_policy::CompiledSet;
use corral_proto::v1::{self as pb, agent_service_server::AgentServiceServer};
use corral_runtime::{
    shutdown::{self, Shutdown, ShutdownSignal},
    tls,
};
use tokio::net::UnixListener;
use tracing::{error, info, warn};

use self::{
    config::Resolved,
    pipeline::{AuditLog, Counters},
    policy::{ApplyError, LastKnownGood, PolicyState},
    registry::{Registry, RegistryError},
};
use crate::ebpf::{
    Enforcer, ExecMode, LoadError, MapError, PinDir, events::EventReader, pins::PinError,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("create state directory {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load principals")]
    Registry(#[from] RegistryError),
    #[error("load and attach the kernel programs")]
    Load(#[from] LoadError),
    #[error("take the event ring buffer")]
    Events(#[source] MapError),
    #[error("socket {path}: another agent is serving it")]
    SocketInUse { path: std::path::PathBuf },
    #[error("bind the local API socket {path}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind the metrics address {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("open the audit log {path}")]
    Audit {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("serve the local API")]
    Serve(#[source] tonic::transport::Error),
    #[error("load the TLS files")]
    Tls(#[source] tls::TlsError),
    #[error("uninstall pins")]
    Uninstall(#[from] PinError),
}

/// State every task shares.
pub struct Shared {
    pub resolved: Resolved,
    enforcer: Mutex<Enforcer>,
    pub registry: Registry,
    policy: RwLock<PolicyState>,
    pub lkg: LastKnownGood,
    pub hub: Hub,
    pub counters: Counters,
    pub exec_mode: ExecMode,
    /// The link to the policy server (`--server`); unused in standalone mode.
    pub sync: Arc<sync::SyncStatus>,
    /// Just-in-time grants from the server; always empty in standalone mode.
    pub grants: grants::GrantBook,
    /// `--kubernetes`: opted-in pods that are not enrolled (status and metrics).
    pub k8s_pods: k8s::PodReport,
    /// Containers the OCI hook enrolled, and those it let start unpoliced (`--fail-open`).
    pub containers: containers::Tally,
    /// The views of the containers the OCI hook enrolled (exec rules are resolved in them).
    pub container_views: container_views::ContainerViews,
    /// The DNS proxy (zones by host name); `None` with `--dns-port 0`.
    pub dns: Option<Arc<dns::DnsProxy>>,
}

impl Shared {
    /// The enforcer (lock order: enforcer, then policy state, then registry).
    pub fn enforcer(&self) -> MutexGuard<'_, Enforcer> {
        self.enforcer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn policy_state(&self) -> RwLockReadGuard<'_, PolicyState> {
        self.policy.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn policy_state_mut(&self) -> RwLockWriteGuard<'_, PolicyState> {
        self.policy.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Brings the kernel's grant entries in line with the grant book, the live policy and the
    /// principals enrolled now. The caller holds the enforcer (lock order: enforcer, policy
    /// state, grant book, registry).
    pub fn reconcile_grants(&self, maps: &mut crate::ebpf::PolicyMaps) {
        let generation = self.policy_state().current().cloned();
        let principals = self.registry.list();
        if let Err(e) = self.grants.reconcile(
            maps,
            &principals,
            generation.as_ref().map(|g| g.compiled.as_ref()),
        ) {
            warn!(error = %corral_runtime::error_chain(&e), "update the kernel grant map; retried on the next change");
        }
    }

    /// Re-reads the policy file; applies it if its text changed since the last attempt.
    fn reload(&self) {
        let Some(path) = self.resolved.policy_path() else {
            return;
        };
        let source = match policy::read_source(path) {
            Ok(s) => s,
            Err(e) => {
                let mut st = self.policy_state_mut();
                let msg = e.to_string();
                if st.last_error.as_deref() != Some(msg.as_str()) {
                    policy::record_error(&mut st, &ApplyError::Invalid(e));
                    st.last_source = None;
                }
                return;
            }
        };
        if self.policy_state().last_source.as_deref() == Some(source.as_str()) {
            return;
        }
        let mut enf = self.enforcer();
        let mut st = self.policy_state_mut();
        let file = path.display().to_string();
        if let Err(e) = policy::apply_source(
            &file,
            &source,
            &mut st,
            &self.lkg,
            enf.maps(),
            &self.registry,
            &self.grants,
            &self.resolved.cgroup_root,
        ) {
            policy::record_error(&mut st, &e);
        }
        st.last_source = Some(source);
    }

    /// Resolves the exec rules of the policy governing `identity` again, in the agent's view
    /// and the views of the containers it governs, and installs the change: called when a
    /// container of `identity` was just recorded, before it may start.
    pub fn resolve_container_exec_rules(
        &self,
        identity: &str,
    ) -> Result<(), containers::ContainerError> {
        let mut enf = self.enforcer();
        let exec = enf.maps().exec();
        exec.set_containers(self.container_views.live());
        let st = self.policy_state();
        let (Some(generation), Some(g)) = (st.live, st.current()) else {
            return Ok(());
        };
        let Some(slot) = g.compiled.policy_for(identity) else {
            return Ok(());
        };
        let views = exec.views_for(|id| g.compiled.policy_for(id) == Some(slot));
        let n = exec
            .refresh_in(agent_common::policy_key(generation, slot), views)
            .map_err(|e| containers::ContainerError::ExecMaps(corral_runtime::error_chain(&e)))?;
        info!(
            identity,
            entries = n,
            "exec rules resolved in the container's files"
        );
        Ok(())
    }

    /// The containers OCI hooks let start unpoliced while this agent was unreachable: each
    /// is counted, logged and published as a `container` event (`failed-open`).
    fn report_fail_open(&self) {
        let dir = corral_runtime::oci::fail_open_dir(&self.resolved.config.socket);
        for r in containers::take_fail_open(&dir) {
            self.containers.failed_open.fetch_add(1, Ordering::Relaxed);
            warn!(container = %r.container_id, pid = r.pid, identity = %r.identity, reason = %r.reason, "a container started UNPOLICED: its OCI hook could not reach the agent (--fail-open)");
            self.publish_container(
                pb::ContainerChange {
                    container_id: r.container_id,
                    action: "failed-open".into(),
                    pid: r.pid,
                    cgroup_path: String::new(),
                    reason: r.reason,
                },
                Some(pb::Principal {
                    identity: r.identity,
                    ..pb::Principal::default()
                }),
                r.time_unix_nano,
            );
        }
    }

    /// Publishes a `container` event (not from the kernel: `seq` 0).
    pub fn publish_container(
        &self,
        change: pb::ContainerChange,
        principal: Option<pb::Principal>,
        time_unix_nano: u64,
    ) {
        let pid = change.pid;
        let e = pb::Event {
            seq: 0,
            time_unix_nano,
            node: self.resolved.node.clone(),
            principal,
            process: Some(pb::Process {
                pid,
                ..pb::Process::default()
            }),
            call: Some(pb::event::Call::Container(change)),
            decision: None,
            suppressed: 0,
            repeats: 0,
        };
        self.hub
            .publish(&[Arc::new(corral_events::hub::HubEvent::from_pb(&e))]);
    }

    /// First apply at start: the file, else the last-known-good policy, else (fresh pins)
    /// the empty set, under which enrolled principals are denied everything.
    fn initial_apply(&self, adopted: bool) {
        self.reload();
        if self.policy_state().current().is_some() {
            return;
        }
        let file = self
            .resolved
            .policy_path()
            .map_or_else(|| "last-known-good".into(), |p| p.display().to_string());
        let mut enf = self.enforcer();
        let mut st = self.policy_state_mut();
        let fallback = match self.lkg.compiled(&file) {
            Some((revision, _, c)) => {
                warn!(
                    revision,
                    "enforcing the last-known-good policy until the file is fixed"
                );
                Some(c)
            }
            None if adopted => {
                warn!("no valid policy: the pinned policy of the previous agent stays in force");
                None
            }
            None => Some(CompiledSet::default()),
        };
        if let Some(c) = fallback {
            let err = st.last_error.clone();
            if let Err(e) = policy::apply_compiled(
                c,
                &mut st,
                enf.maps(),
                &self.registry,
                &self.grants,
                &self.resolved.cgroup_root,
            ) {
                policy::record_error(&mut st, &ApplyError::Maps(e));
            } else {
                // Still report why the file itself was not applied.
                st.last_error = err;
            }
        }
    }
}

/// The Workload API's socket: any process may connect (attestation decides what it gets).
fn workload_api(path: &Path) -> Result<UnixListener, DaemonError> {
    let l = bind_socket(path, None)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|source| {
        DaemonError::Bind {
            path: path.into(),
            source,
        }
    })?;
    Ok(l)
}

fn bind_socket(path: &Path, gid: Option<u32>) -> Result<UnixListener, DaemonError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse { path: path.into() });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| DaemonError::Bind {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(bind_err)?;
    }
    Ok(l)
}

async fn watch_policy(shared: Arc<Shared>, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval(Duration::from_millis(
        shared.resolved.config.policy_poll_ms.max(10),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {
                let s = shared.clone();
                // Map writes and file reads are blocking syscalls: off the async workers.
                if let Err(e) = tokio::task::spawn_blocking(move || s.reload()).await {
                    error!(error = %e, "policy reload task failed");
                }
            }
        }
    }
}

/// Keeps the kernel grants in line with the enrolled principals: a new principal (local
/// enrolment, a pod) gets the grants of its identity and session at once; a removed one's are
/// already gone from the kernel (`remove_principal`).
async fn follow_registry(shared: Arc<Shared>, mut stop: ShutdownSignal) {
    let mut changes = shared.registry.subscribe();
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                changes.borrow_and_update();
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let mut enf = s.enforcer();
                    s.reconcile_grants(enf.maps());
                })
                .await;
            }
        }
    }
}

/// How often principals whose processes all exited are looked for.
const SWEEP: Duration = Duration::from_millis(250);

/// Every this many sweeps, the node's own addresses (`LOCAL_ADDRS`: decided as loopback) and
/// its dynamic loaders (`LOADERS`) are read again: an address added to an interface is local,
/// and a replaced loader known, within a second.
const LOCAL_ADDRS_EVERY: u32 = 4;

async fn sweep_principals(shared: Arc<Shared>, mut stop: ShutdownSignal) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {
                let s = shared.clone();
                n = n.wrapping_add(1);
                let addrs = n.is_multiple_of(LOCAL_ADDRS_EVERY);
                let _ = tokio::task::spawn_blocking(move || {
                    let mut enf = s.enforcer();
                    s.registry.sweep(enf.maps());
                    if addrs {
                        refresh_node_facts(enf.maps());
                        sweep_learned(&s, enf.maps());
                    }
                    drop(enf);
                    if addrs {
                        s.report_fail_open();
                    }
                })
                .await;
            }
        }
    }
}

/// Removes the DNS-learned addresses that have expired or whose principal is gone.
fn sweep_learned(shared: &Shared, maps: &mut crate::ebpf::PolicyMaps) {
    let Ok(now) = crate::clock::boottime_ns() else {
        return;
    };
    let live: std::collections::HashSet<u32> =
        shared.registry.list().iter().map(|p| p.index).collect();
    if let Some(d) = &shared.dns {
        d.sweep_names(now, |p| live.contains(&p));
    }
    let n = maps.dns().sweep(now, |p| live.contains(&p));
    if n > 0 {
        tracing::debug!(removed = n, "expired DNS-learned addresses removed");
    }
}

fn refresh_node_facts(maps: &mut crate::ebpf::PolicyMaps) {
    let result = crate::ebpf::local_addrs::node_addresses()
        .map_err(|e| e.to_string())
        .and_then(|a| maps.set_local_addrs(&a).map_err(|e| e.to_string()));
    match result {
        Ok(0) => {}
        Ok(n) => tracing::info!(changed = n, "the node's own addresses changed"),
        Err(e) => tracing::warn!(error = %e, "cannot refresh the node's own addresses"),
    }
    let loaders = crate::ebpf::loaders::loader_identities();
    match maps.exec().set_loaders(&loaders) {
        Ok(0) => {}
        Ok(n) => tracing::info!(changed = n, "the node's dynamic loaders changed"),
        Err(e) => tracing::warn!(error = %e, "cannot refresh the node's dynamic loaders"),
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(resolved: Resolved) -> Result<(), DaemonError> {
    // First, so that a SIGTERM at any point of the start still shuts down cleanly.
    let mut signals = shutdown::Signals::install().map_err(DaemonError::Signals)?;
    let cfg = &resolved.config;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| DaemonError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let registry = Registry::load(
        &resolved.cgroup_root,
        &resolved.cgroup_dir,
        &resolved.state_file("principals.json"),
    )?;
    let pins = PinDir::new(&resolved.pin_dir);
    let mut enforcer = Enforcer::start(&resolved.cgroup_root, Some(&pins))?;
    let adopted = enforcer.adopted();
    let exec_mode = enforcer.exec_mode();
    info!(
        pins = %resolved.pin_dir.display(),
        adopted,
        exec = status::exec_enforcement(exec_mode),
        lsm_unavailable = enforcer.exec_lsm_error().unwrap_or(""),
        "kernel programs attached"
    );
    let reader = EventReader::take(enforcer.maps()).map_err(DaemonError::Events)?;
    let audit =
        match &cfg.audit_log {
            Some(p) => Some(AuditLog::open(p.clone(), cfg.audit_log_max_bytes).map_err(
                |source| DaemonError::Audit {
                    path: p.clone(),
                    source,
                },
            )?),
            None => None,
        };
    let listener = bind_socket(&cfg.socket, cfg.enroll_gid)?;
    let metrics = match cfg.metrics_addr {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let dns = (cfg.dns_port != 0).then(|| {
        let upstream = cfg.dns_upstream.or_else(|| {
            std::fs::read_to_string("/etc/resolv.conf")
                .ok()
                .and_then(|t| dns::upstream::from_resolv_conf(&t))
        });
        if upstream.is_none() {
            warn!("no DNS upstream (--dns-upstream, /etc/resolv.conf): names in zones will not resolve");
        }
        Arc::new(dns::DnsProxy::new(dns::Settings {
            port: cfg.dns_port,
            upstream,
            upstream_given: cfg.dns_upstream.is_some(),
            max_learned: cfg.dns_max_learned,
            ttl_floor: std::time::Duration::from_secs(cfg.dns_ttl_floor_secs),
        }))
    });
    if let Err(e) = enforcer.maps().dns().set_proxy_port(cfg.dns_port) {
        warn!(error = %corral_runtime::error_chain(&e), "cannot set the DNS proxy port: principals' DNS is not redirected");
    }
    // Containers enrolled before this start: their views are in place for the first apply.
    let container_views = container_views::ContainerViews::load(&cfg.state_dir);
    enforcer
        .maps()
        .exec()
        .set_containers(container_views.live());
    let shared = Arc::new(Shared {
        lkg: LastKnownGood::new(&cfg.state_dir),
        hub: Hub::new(cfg.event_history, cfg.subscriber_queue),
        counters: Counters::default(),
        enforcer: Mutex::new(enforcer),
        registry,
        policy: RwLock::new(PolicyState::default()),
        exec_mode,
        sync: Arc::default(),
        grants: match &cfg.server {
            Some(_) => grants::GrantBook::managed(resolved.state_file("grants.json")),
            None => grants::GrantBook::standalone(),
        },
        k8s_pods: k8s::PodReport::default(),
        containers: containers::Tally::default(),
        container_views,
        dns,
        resolved: resolved.clone(),
    });
    {
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || s.initial_apply(adopted)).await;
    }

    let shutdown = Shutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(pipeline::run(
        shared.clone(),
        reader,
        audit,
        shutdown.subscribe(),
    ));
    if cfg.policy.is_some() {
        tasks.spawn(watch_policy(shared.clone(), shutdown.subscribe()));
    }
    // The Workload API's keys, made before the sync task: in managed mode the server
    // certifies the CA's signing key. Fail closed: without them no credentials are served;
    // enforcement goes on.
    let workload_socket = cfg
        .workload_socket
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty());
    let workload_keys = workload_socket.and_then(|_| {
        let keys = workload::ca::Ca::open(&cfg.state_dir, &resolved.node)
            .map_err(|e| corral_runtime::error_chain(&e))
            .and_then(|ca| {
                workload::jwt::JwtKey::open(&cfg.state_dir)
                    .map(|jwt| (Arc::new(ca), jwt))
                    .map_err(|e| corral_runtime::error_chain(&e))
            });
        keys.map_err(|error| warn!(%error, "the SPIFFE Workload API is not served"))
            .ok()
    });
    if let Some(url) = &cfg.server {
        // Subscribed before the sync task starts, so no event is missed while connecting;
        // the hub's bounded queue is the forwarding buffer (its drops are counted).
        let events = shared.hub.subscribe(hub::Filter::default(), true).rx;
        let mut client = sync::ClientConfig::new(url, &resolved.node);
        if cfg.tls.is_set() {
            client.tls = Some(cfg.tls.client_config().map_err(DaemonError::Tls)?);
        }
        tasks.spawn(sync::run(
            client,
            Arc::new(sync::AgentSink {
                shared: shared.clone(),
                workload_ca: workload_keys.as_ref().map(|(ca, _)| ca.clone()),
            }),
            events,
            shared.sync.clone(),
            shutdown.subscribe(),
        ));
    }
    tasks.spawn(sweep_principals(shared.clone(), shutdown.subscribe()));
    tasks.spawn(exec_watch::run(shared.clone(), shutdown.subscribe()));
    tasks.spawn(follow_registry(shared.clone(), shutdown.subscribe()));
    if let Some(d) = &shared.dns {
        tasks.spawn(dns::run(d.clone(), shared.clone(), shutdown.subscribe()));
    }
    if let Some(l) = metrics {
        tasks.spawn(metrics::serve(l, shared.clone(), shutdown.subscribe()));
    }
    if let Ok(Some(mapping)) = cfg.k8s.mapping(&resolved.node) {
        // Not ready (no local API, which the readiness probe asks) until the pods on this
        // node are synced.
        let (ready, synced) = tokio::sync::oneshot::channel();
        let ns = cfg.k8s.namespace_opt_in;
        tasks.spawn(k8s::run(
            shared.clone(),
            mapping,
            ns,
            ready,
            shutdown.subscribe(),
        ));
        // A signal during the first sync (the API server may not answer) ends the wait.
        if let Err(sig) = signals.until(synced).await {
            warn!(
                signal = sig,
                "signal before the pods on this node were synced"
            );
        }
    }
    let mut api_stop = shutdown.subscribe();
    // Each connection carries its peer's credentials and pidfd (see `peer`).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |s| s.and_then(peer::PeerStream::new),
    );
    let server = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(api::Api {
            shared: shared.clone(),
        }))
        .serve_with_incoming_shutdown(incoming, async move { api_stop.wait().await });
    let server = tokio::spawn(server);
    if let (Some(path), Some((ca, jwt))) = (workload_socket, workload_keys) {
        match workload_api(path) {
            Ok(listener) => {
                let mut stop = shutdown.subscribe();
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    |s| s.and_then(peer::PeerStream::new),
                );
                let ttl = Duration::from_secs(cfg.svid_ttl_secs);
                let jwt_ttl = Duration::from_secs(cfg.jwt_ttl_secs);
                let svc = workload::Workload::new(shared.clone(), ca, ttl, jwt, jwt_ttl);
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(
                            corral_proto::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(svc),
                        )
                        .serve_with_incoming_shutdown(incoming, async move {
                            stop.wait().await;
                        }),
                );
                info!(socket = %path.display(), "SPIFFE Workload API served");
            }
            Err(e) => {
                warn!(error = %corral_runtime::error_chain(&e), "the SPIFFE Workload API is not served")
            }
        }
    }
    info!(socket = %cfg.socket.display(), policy = ?cfg.policy, server = ?cfg.server, node = %resolved.node, "corral-agent ready");

    let sig = tokio::select! {
        s = signals.recv() => s,
        r = tasks.join_next() => {
            warn!(?r, "a daemon task ended early");
            "task-exit"
        }
    };
    info!(signal = sig, "shutting down");
    shutdown.trigger();
    shared.hub.close();
    // Streams to followers end when the hub's senders go; do not wait on them forever.
    let served = tokio::time::timeout(Duration::from_secs(5), server).await;
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&cfg.socket);
    match served {
        Ok(Ok(Err(e))) => error!(error = %corral_runtime::error_chain(&e), "local API"),
        Err(_) => warn!("local API did not drain in 5 s"),
        _ => {}
    }
    drop(shared);
    if cfg.uninstall {
        pins.uninstall()?;
        info!("uninstalled: enforcement removed");
    } else {
        info!(pins = %resolved.pin_dir.display(), "stopped; enforcement stays in force through the pins");
    }
    Ok(())
}
