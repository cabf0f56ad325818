//! The daemon's one configuration struct: flags (clap), environment overrides with the
//! `CORRAL_` prefix, documented defaults. Host paths that are discovered (cgroup2, bpffs) are
//! resolved in [`Config::resolve`] through [`crate::paths`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::paths;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// `corral-agent`: Corral's node daemon.
#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(name = "corral-agent", version, about = "Corral node agent")]
pub struct Config {
    /// Standalone mode: enforce the policies in this YAML file, reloaded when it changes.
    #[arg(long, env = "CORRAL_POLICY")]
    pub policy: PathBuf,

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
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("find host paths")]
    Paths(#[from] paths::PathError),
    #[error("--metrics-addr {addr} is not a loopback address")]
    MetricsNotLoopback { addr: SocketAddr },
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

    pub fn policy_path(&self) -> &Path {
        &self.config.policy
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
