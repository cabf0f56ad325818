//! The server's one configuration struct: flags (clap) with `CORRAL_SERVER_*` environment
//! overrides and documented defaults.

use std::net::SocketAddr;

pub use corral_runtime::logging::LogFormat;

/// `corral-server`: Corral's central policy server.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "corral-server",
    version,
    about = "Corral central policy server"
)]
pub struct Config {
    /// Address to listen on (gRPC: PolicyService, NodeSync, EventService, GrantService).
    #[arg(long, env = "CORRAL_SERVER_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,

    /// Where the server keeps its state: a SQLite file (created if missing; WAL mode; one
    /// server), or a PostgreSQL URL, `postgres://user:password@host:port/db` (any number of
    /// replicas sharing it). Put a password in `CORRAL_SERVER_DB`, not on the command line.
    #[arg(
        long,
        env = "CORRAL_SERVER_DB",
        default_value = "/var/lib/corral/server.db"
    )]
    pub db: String,

    /// Serve without TLS: must be asked for, and only on a loopback address.
    #[arg(long, env = "CORRAL_SERVER_PLAINTEXT", conflicts_with = "cert")]
    pub plaintext: bool,

    /// mTLS: the server's certificate and key, and the CA that signs the clients' (agents'
    /// and CLI users') certificates. Required unless --plaintext.
    #[command(flatten)]
    pub tls: corral_runtime::tls::TlsFiles,

    /// Fleet events buffered for `corral events --server` followers; a follower that falls
    /// further behind loses events (counted and logged).
    #[arg(long, env = "CORRAL_SERVER_EVENT_BUFFER", default_value_t = 16_384)]
    pub event_buffer: usize,

    /// Fleet events kept in the database for `corral policy suggest --server` and `corral
    /// policy simulate --server` (the newest are kept; 0: none).
    #[arg(long, env = "CORRAL_SERVER_EVENT_HISTORY", default_value_t = 250_000)]
    pub event_history: u64,

    /// Who may approve and deny grants (repeatable; the env form is comma-separated): client
    /// certificate names under mTLS, else local user names (or uids). Unset: anyone but the
    /// requester may approve. Revoke is open to approvers and to the grant's requester.
    #[arg(
        long = "approver",
        value_name = "NAME",
        env = "CORRAL_SERVER_APPROVERS",
        value_delimiter = ','
    )]
    pub approvers: Vec<String>,

    /// Who may apply and delete policies (repeatable; the env form is comma-separated): client
    /// certificate names under mTLS, else local user names (or uids). Unset: every caller the
    /// transport admits (any certificate the CA signed, nodes' included) — set it in
    /// production so a node's certificate cannot change the fleet's policy.
    #[arg(
        long = "policy-admin",
        value_name = "NAME",
        env = "CORRAL_SERVER_POLICY_ADMINS",
        value_delimiter = ','
    )]
    pub policy_admins: Vec<String>,

    /// With a PostgreSQL `--db`: how often a replica checks the database for changes other
    /// replicas made, besides being told at once (LISTEN/NOTIFY), whose notifications are lost
    /// while its listening connection is down.
    #[arg(long, env = "CORRAL_SERVER_RESYNC_SECS", default_value_t = 5)]
    pub resync_secs: u64,

    /// The trust domain's CA (PEM certificate and key) that certifies each node's SPIFFE
    /// Workload API signing key as an intermediate; unset: nodes use their own CAs.
    #[arg(
        long,
        env = "CORRAL_SERVER_WORKLOAD_CA_CERT",
        requires = "workload_ca_key"
    )]
    pub workload_ca_cert: Option<std::path::PathBuf>,
    #[arg(
        long,
        env = "CORRAL_SERVER_WORKLOAD_CA_KEY",
        requires = "workload_ca_cert"
    )]
    pub workload_ca_key: Option<std::path::PathBuf>,

    /// Lifetime of a node's intermediate (renewed at half of it, and on every reconnect).
    #[arg(
        long,
        env = "CORRAL_SERVER_INTERMEDIATE_TTL_SECS",
        default_value_t = 86_400
    )]
    pub intermediate_ttl_secs: u64,

    /// This replica's name in node status [default: the host name and the listen port].
    #[arg(long, env = "CORRAL_SERVER_REPLICA_NAME")]
    pub replica_name: Option<String>,

    /// Log format.
    #[arg(long, env = "CORRAL_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "transport security is required: give --tls-cert, --tls-key and --tls-ca (mTLS), or \
         --plaintext on a loopback address"
    )]
    NoTransportSecurity,
    #[error("--plaintext is only allowed on a loopback address, not {addr}")]
    PlaintextNotLoopback { addr: SocketAddr },
}

impl Config {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.tls.is_set() {
            return Ok(());
        }
        if !self.plaintext {
            return Err(ConfigError::NoTransportSecurity);
        }
        if !self.listen.ip().is_loopback() {
            return Err(ConfigError::PlaintextNotLoopback { addr: self.listen });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn plaintext_must_be_asked_for_and_loopback() {
        let c = Config::try_parse_from(["corral-server", "--db", "x.db"]).expect("parse");
        assert!(matches!(c.check(), Err(ConfigError::NoTransportSecurity)));
        let c = Config::try_parse_from(["corral-server", "--plaintext", "--listen", "0.0.0.0:1"])
            .expect("parse");
        assert!(matches!(
            c.check(),
            Err(ConfigError::PlaintextNotLoopback { .. })
        ));
        let c = Config::try_parse_from(["corral-server", "--plaintext", "--listen", "[::1]:1"])
            .expect("parse");
        assert!(c.check().is_ok());
        let c = Config::try_parse_from([
            "corral-server",
            "--listen",
            "0.0.0.0:1",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "ca",
        ])
        .expect("parse");
        assert!(c.check().is_ok(), "mTLS on any address");
        assert!(
            Config::try_parse_from(["corral-server", "--plaintext", "--tls-cert", "c"]).is_err()
        );
    }

    #[test]
    fn approvers_are_repeatable_and_comma_separated() {
        let c = Config::try_parse_from(["corral-server", "--approver", "bob", "--approver", "x,y"])
            .expect("parse");
        assert_eq!(c.approvers, ["bob", "x", "y"]);
        let c = Config::try_parse_from(["corral-server"]).expect("parse");
        assert!(c.approvers.is_empty(), "no approvers unless configured");
    }
}
