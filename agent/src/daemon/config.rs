//! The daemon's one configuration struct: flags (clap), environment overrides with the
//! `CORRAL_` prefix, documented defaults. Host paths that are discovered (cgroup2, bpffs) are
//! resolved in [`Config::resolve`] through [`crate::paths`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::paths;

pub use corral_runtime::logging::LogFormat;

/// `corral-agent`: Corral's node daemon.
#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(name = "corral-agent", version, about = "Corral node agent")]
pub struct Config {
    /// Standalone mode: enforce the policies in this YAML file, reloaded when it changes.
    #[arg(
        long,
        env = "CORRAL_POLICY",
        required_unless_present = "server",
        conflicts_with = "server"
    )]
    pub policy: Option<PathBuf>,

    /// Managed mode: take policy from this corral-server (NodeSync), e.g.
    /// http://127.0.0.1:7443 (plaintext is accepted for loopback servers only). Replicas: a
    /// comma-separated list; the agent syncs with one and moves to the next when it is lost.
    #[arg(long, env = "CORRAL_SERVER", value_name = "URL[,URL...]")]
    pub server: Option<String>,

    /// Node limit: a policy set with more connect and exec rules than this is rejected on
    /// this node (a server snapshot over it is NACKed) [default: no limit beyond the maps'].
    #[arg(long, env = "CORRAL_MAX_RULES")]
    pub max_rules: Option<usize>,

    /// mTLS to the server (required for an `https://` --server).
    #[command(flatten)]
    pub tls: corral_runtime::tls::TlsFiles,

    /// The SPIFFE Workload API's socket, served to enrolled principals' processes (`corral
    /// run` points them at it with SPIFFE_ENDPOINT_SOCKET); empty: not served.
    #[arg(long, env = "CORRAL_WORKLOAD_SOCKET", default_value = paths::WORKLOAD_SOCKET)]
    pub workload_socket: Option<PathBuf>,

    /// Lifetime of the X.509-SVIDs the Workload API issues (rotated at half of it); at least 10.
    #[arg(long, env = "CORRAL_SVID_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub svid_ttl_secs: u64,

    /// Lifetime of the JWT-SVIDs the Workload API issues; at least 10.
    #[arg(long, env = "CORRAL_JWT_TTL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(10..))]
    pub jwt_ttl_secs: u64,

    /// Local API socket (gRPC over a unix socket).
    #[arg(long, env = "CORRAL_SOCKET", default_value = paths::AGENT_SOCKET)]
    pub socket: PathBuf,

    /// Where programs, links and maps are pinned [default: <bpffs mount>/corral].
    #[arg(long, env = "CORRAL_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,

    /// Agent state: principals, policy revision, last-known-good policy.
    #[arg(long, env = "CORRAL_STATE_DIR", default_value = paths::STATE_DIR)]
    pub state_dir: PathBuf,

    /// Parent cgroup of the principals' cgroups [default: <cgroup2 root>/corral].
    #[arg(long, env = "CORRAL_CGROUP_DIR")]
    pub cgroup_dir: Option<PathBuf>,

    /// Prometheus metrics on this loopback address (e.g. 127.0.0.1:9464); off when unset.
    #[arg(long, env = "CORRAL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "CORRAL_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,

    /// On shutdown, remove the pins (detaching enforcement) instead of leaving it in force.
    #[arg(long, env = "CORRAL_UNINSTALL")]
    pub uninstall: bool,

    /// Node name reported in events and status [default: the host name].
    #[arg(long, env = "CORRAL_NODE_NAME")]
    pub node_name: Option<String>,

    /// Besides root, members of this group may enrol principals (the socket is made
    /// group-accessible to it).
    #[arg(long, env = "CORRAL_ENROLL_GID")]
    pub enroll_gid: Option<u32>,

    /// Optional JSON-lines audit log of every decision.
    #[arg(long, env = "CORRAL_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Size at which the audit log is rotated to `<file>.1`.
    #[arg(long, env = "CORRAL_AUDIT_LOG_MAX_BYTES", default_value_t = 64 << 20)]
    pub audit_log_max_bytes: u64,

    /// Policy file poll interval, in milliseconds.
    #[arg(long, env = "CORRAL_POLICY_POLL_MS", default_value_t = 200)]
    pub policy_poll_ms: u64,

    /// Events kept for `corral events` without `--follow`.
    #[arg(long, env = "CORRAL_EVENT_HISTORY", default_value_t = 10_000)]
    pub event_history: usize,

    /// Queue depth per event subscriber; a subscriber that falls this far behind loses
    /// events (counted and reported to it), never slowing anyone else.
    #[arg(long, env = "CORRAL_SUBSCRIBER_QUEUE", default_value_t = 16_384)]
    pub subscriber_queue: usize,

    /// In-kernel limit on allow events per second per principal (0: unlimited). Deny and
    /// audit-deny events are never limited; suppressed allow events are counted and carried
    /// on the principal's next event (`suppressed`), and summed in status and metrics.
    #[arg(long, env = "CORRAL_ALLOW_EVENT_RATE", default_value_t = 0)]
    pub allow_event_rate: u32,

    /// Allow events a principal may emit back to back before the rate applies (0: one
    /// second's worth).
    #[arg(long, env = "CORRAL_ALLOW_EVENT_BURST", default_value_t = 0)]
    pub allow_event_burst: u32,

    /// The DNS proxy's port on every principal's proxy address (127.64.0.0/10 + its index):
    /// the DNS of principals under a policy with zones by host name goes there. 0: no proxy
    /// (a policy with `hosts:` zones then opens nothing by name).
    #[arg(long, env = "CORRAL_DNS_PORT", default_value_t = 15353)]
    pub dns_port: u16,

    /// The resolver the DNS proxy forwards to [default: the first nameserver of
    /// /etc/resolv.conf].
    #[arg(long, env = "CORRAL_DNS_UPSTREAM")]
    pub dns_upstream: Option<SocketAddr>,

    /// Shortest time an address from a DNS answer stays open for new connections, whatever
    /// the answer's TTL (clients keep answers longer than their TTL).
    #[arg(long, env = "CORRAL_DNS_TTL_FLOOR_SECS", default_value_t = 30)]
    pub dns_ttl_floor_secs: u64,

    /// Most addresses one principal's DNS answers keep open at once, so that no principal can
    /// fill the node's map (131,072 entries) for the others. Past it, an answer's new
    /// addresses are not opened (counted as `capped`; connects to them are denied) until
    /// some of the principal's expire.
    #[arg(long, env = "CORRAL_DNS_MAX_LEARNED", default_value_t = 16_384)]
    pub dns_max_learned: u32,

    /// `--kubernetes` and its settings.
    #[command(flatten)]
    pub k8s: super::k8s::K8sArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("find host paths")]
    Paths(#[from] paths::PathError),
    #[error("--metrics-addr {addr} is not a loopback address")]
    MetricsNotLoopback { addr: SocketAddr },
    #[error(
        "--server {url}: use https:// with --tls-cert, --tls-key and --tls-ca (plaintext \
         http:// only to a loopback address)"
    )]
    ServerUrl { url: String },
    #[error(transparent)]
    K8s(#[from] super::k8s::K8sError),
}

/// The configuration with discovered paths filled in.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    pub cgroup_root: PathBuf,
    pub cgroup_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub node: String,
}

impl Config {
    pub fn resolve(self) -> Result<Resolved, ConfigError> {
        if let Some(addr) = self.metrics_addr
            && !addr.ip().is_loopback()
        {
            return Err(ConfigError::MetricsNotLoopback { addr });
        }
        if let Some(list) = &self.server {
            for url in super::sync::server_urls(list) {
                if !(corral_runtime::tls::plaintext_loopback(&url)
                    || (url.starts_with("https://") && self.tls.is_set()))
                {
                    return Err(ConfigError::ServerUrl { url });
                }
            }
        }
        let cgroup_root = paths::cgroup2_root()?;
        let cgroup_dir = match &self.cgroup_dir {
            Some(d) => d.clone(),
            None => paths::principals_cgroup(&cgroup_root),
        };
        let pin_dir = match &self.pin_dir {
            Some(d) => d.clone(),
            None => paths::bpffs_pin_dir(&paths::find_mount("bpf")?),
        };
        let node = match &self.node_name {
            Some(n) => n.clone(),
            None => hostname(),
        };
        self.k8s.mapping(&node)?;
        Ok(Resolved {
            config: self,
            cgroup_root,
            cgroup_dir,
            pin_dir,
            node,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

impl Resolved {
    pub fn state_file(&self, name: &str) -> PathBuf {
        self.config.state_dir.join(name)
    }

    /// The policy file (standalone mode only).
    pub fn policy_path(&self) -> Option<&Path> {
        self.config.policy.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_are_documented_paths() {
        let c = Config::try_parse_from(["corral-agent", "--policy", "p.yaml"]).expect("parse");
        assert_eq!(c.socket, PathBuf::from(paths::AGENT_SOCKET));
        assert_eq!(c.state_dir, PathBuf::from(paths::STATE_DIR));
        assert_eq!(c.log_format, LogFormat::Plain);
        assert_eq!(c.policy_poll_ms, 200);
        assert!(!c.uninstall);
    }

    #[test]
    fn server_mode_excludes_the_policy_file_and_needs_loopback_plaintext() {
        let c = Config::try_parse_from(["corral-agent", "--server", "http://127.0.0.1:7443"])
            .expect("parse");
        assert!(c.policy.is_none());
        assert!(
            Config::try_parse_from(["corral-agent", "--server", "http://x", "--policy", "p"])
                .is_err()
        );
        assert!(Config::try_parse_from(["corral-agent"]).is_err());
        let c = Config::try_parse_from(["corral-agent", "--server", "http://192.0.2.1:1"])
            .expect("parse");
        assert!(matches!(c.resolve(), Err(ConfigError::ServerUrl { .. })));
        let c = Config::try_parse_from(["corral-agent", "--server", "https://192.0.2.1:1"])
            .expect("parse");
        assert!(
            matches!(c.resolve(), Err(ConfigError::ServerUrl { .. })),
            "https needs the TLS files"
        );
        // Every replica's URL is checked, not only the first.
        let c = Config::try_parse_from([
            "corral-agent",
            "--server",
            "http://127.0.0.1:1, http://192.0.2.1:1",
        ])
        .expect("parse");
        assert!(
            matches!(c.resolve(), Err(ConfigError::ServerUrl { url }) if url == "http://192.0.2.1:1")
        );
    }

    #[test]
    fn metrics_must_be_loopback() {
        let c = Config::try_parse_from([
            "corral-agent",
            "--policy",
            "p.yaml",
            "--metrics-addr",
            "0.0.0.0:9464",
        ])
        .expect("parse");
        assert!(matches!(
            c.resolve(),
            Err(ConfigError::MetricsNotLoopback { .. })
        ));
    }
}
