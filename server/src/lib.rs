//! `corral-server`: the central policy server.
//!
//! - [`config`]: flags and `CORRAL_SERVER_*` environment overrides.
//! - [`store`]: the storage traits ([`store::PolicyStore`], grants, event history) and their
//!   SQLite (embedded, the default) and PostgreSQL (shared by replicas) implementations; full
//!   history, one monotonic revision per change.
//! - [`validate`]: a change is accepted only if the whole resulting policy set compiles with
//!   the node's own compiler (`corral_policy`).
//! - [`fleet`]: the current revision every node should converge to, and each node's state
//!   (connected, acknowledged revision, last NACK).
//! - [`policy_service`]: `PolicyService` (Apply/Delete/List/Get/Status).
//! - [`sync`]: `NodeSync`, one bidirectional stream per node, xDS-style.
//! - [`events`]: `EventService`, the fleet event stream from what agents forward (and the
//!   server's own grant changes).
//! - [`grants`]: `GrantService` (Request/Approve/Deny/Revoke/List), the grant state machine,
//!   the expiry sweep; active grants travel to nodes in the sync snapshots.
//! - [`replicas`]: replicas sharing a PostgreSQL database follow each other's changes.
//! - [`auth`]: who is calling (client certificate name, or the user header on loopback).
//! - [`error`]: the one mapping of errors to gRPC codes.
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod error;
pub mod events;
pub mod fleet;
pub mod grants;
pub mod history;
pub mod local_peer;
pub mod policy_service;
pub mod replicas;
mod sock_diag;
pub mod store;
pub mod sync;
pub mod validate;
pub mod workload_ca;

use std::{sync::Arc, time::Duration};

use corral_proto::v1::{
    event_service_server::EventServiceServer, grant_service_server::GrantServiceServer,
    node_sync_server::NodeSyncServer, policy_service_server::PolicyServiceServer,
};
use corral_runtime::shutdown::{self, Shutdown};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{config::Config, fleet::Fleet, store::PolicyStore};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("load the grants")]
    Grants(#[from] grants::GrantError),
    #[error("listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("load the TLS files")]
    Tls(#[from] corral_runtime::tls::TlsError),
    #[error("configure TLS")]
    TlsConfig(#[source] tonic::transport::Error),
    #[error("install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("load the workload CA")]
    WorkloadCa(#[from] workload_ca::WorkloadCaError),
    #[error("serve gRPC")]
    Serve(#[source] tonic::transport::Error),
}

/// Runs the server until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), RunError> {
    cfg.check()?;
    let db = store::open(&cfg.db).await?;
    let store: Arc<dyn PolicyStore> = db.clone();
    let current = store.current().await?;
    let replica = cfg.replica_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), cfg.listen.port())
    });
    let fleet = Arc::new(Fleet::new(&current, cfg.event_buffer).named(&replica));
    let db_events = db.clone();
    let shared = store::is_postgres(&cfg.db);
    // Replicas on PostgreSQL see each other's nodes.
    let peers = shared.then(|| Arc::new(replicas::Peers::new(db.clone())));
    let registry: Arc<dyn store::nodes::NodeRegistry> = db.clone();
    let mut grants = grants::Grants::new(db, fleet.clone(), &cfg.approvers);
    if let Some(p) = &peers {
        grants = grants.with_peers(p.clone());
    }
    let grants = Arc::new(grants);
    grants.start().await?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RunError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let shutdown = Shutdown::new();
    let mut policy =
        policy_service::Policies::new(store.clone(), fleet.clone(), &cfg.policy_admins);
    if let Some(p) = &peers {
        policy = policy.with_peers(p.clone());
    }
    if cfg.tls.is_set() && cfg.policy_admins.is_empty() {
        warn!(
            "no --policy-admin: every client certificate the CA signed (nodes' included) may \
             apply and delete policies"
        );
    }
    let mut sync =
        sync::Sync::new(fleet.clone(), shutdown.subscribe()).with_sessions(grants.clone());
    if let (Some(cert), Some(key)) = (&cfg.workload_ca_cert, &cfg.workload_ca_key) {
        let ttl = Duration::from_secs(cfg.intermediate_ttl_secs.max(600));
        sync = sync.with_workload_ca(Arc::new(workload_ca::WorkloadCa::open(cert, key, ttl)?));
        info!(cert = %cert.display(), "nodes' workload intermediates are signed by this CA");
    }
    tokio::spawn(grants::service::sweep_task(
        grants.clone(),
        shutdown.subscribe(),
    ));
    if shared {
        tokio::spawn(replicas::register_task(
            registry,
            fleet.clone(),
            shutdown.subscribe(),
        ));
        // Other replicas may share the database: follow their changes.
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(store::postgres_listen::listen_task(
            cfg.db.clone(),
            wake.clone(),
            shutdown.subscribe(),
        ));
        tokio::spawn(replicas::converge_task(
            store.clone(),
            fleet.clone(),
            grants.clone(),
            wake,
            Duration::from_secs(cfg.resync_secs.max(1)),
            shutdown.subscribe(),
        ));
    }
    let grant_api = grants::service::GrantApi::new(grants);
    let log: Arc<dyn store::events::EventLog> = db_events;
    if cfg.event_history > 0 {
        tokio::spawn(history::record_task(
            fleet.clone(),
            log.clone(),
            cfg.event_history,
            shutdown.subscribe(),
        ));
    }
    let events = events::Events::new(fleet.clone(), log, shutdown.subscribe());
    let mut stop = shutdown.subscribe();
    let mut builder = tonic::transport::Server::builder();
    if cfg.tls.is_set() {
        builder = builder
            .tls_config(cfg.tls.server_config()?)
            .map_err(RunError::TlsConfig)?;
    }
    let router = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(PolicyServiceServer::new(policy))
        .add_service(NodeSyncServer::new(sync))
        .add_service(EventServiceServer::new(events))
        .add_service(GrantServiceServer::new(grant_api));
    let stopped = async move { stop.wait().await };
    let mut server = if cfg.tls.is_set() {
        // Snapshots and ACKs are small writes that must not wait for Nagle's algorithm.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
    } else {
        // Plaintext: callers are named by the uid owning their socket (nodelay set there).
        tokio::spawn(router.serve_with_incoming_shutdown(local_peer::incoming(listener), stopped))
    };
    info!(addr = %local, %replica, mtls = cfg.tls.is_set(), db = %store::describe(&cfg.db), revision = current.revision, policies = current.policies.len(), grants = fleet.current().grants.len(), approvers = ?cfg.approvers, policy_admins = ?cfg.policy_admins, "corral-server ready");
    let signal = shutdown::signal();
    tokio::pin!(signal);
    tokio::select! {
        s = &mut signal => info!(signal = s.map_err(RunError::Signals)?, "shutting down"),
        r = &mut server => {
            shutdown.trigger();
            return match r {
                Ok(Err(e)) => Err(RunError::Serve(e)),
                _ => Ok(()),
            };
        }
    }
    shutdown.trigger();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => return Err(RunError::Serve(e)),
        Ok(_) => {}
        Err(_) => warn!("gRPC connections did not drain in 5 s"),
    }
    info!("stopped");
    Ok(())
}
