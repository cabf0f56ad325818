//! Transport security for Corral's TCP gRPC (agent ↔ server, CLI ↔ server): mutual TLS with
//! rustls (tonic's `tls-ring`), certificates and keys from PEM files. The same three flags on
//! every binary: `--tls-cert` (this side's chain), `--tls-key`, `--tls-ca` (the CA that signs
//! the peer). The server requires a client certificate signed by its CA; clients verify the
//! server against theirs. `cargo xtask certs` writes a development CA and certificates.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// `--tls-cert`, `--tls-key`, `--tls-ca` (all three, or none).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Serialize)]
pub struct TlsFiles {
    /// PEM certificate (chain) this side presents (mTLS).
    #[arg(long = "tls-cert", env = "CORRAL_TLS_CERT", requires_all = ["key", "ca"])]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "CORRAL_TLS_KEY", requires_all = ["cert", "ca"])]
    pub key: Option<PathBuf>,
    /// PEM CA certificate that signs the peer's certificate.
    #[arg(long = "tls-ca", env = "CORRAL_TLS_CA", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("give all of --tls-cert, --tls-key and --tls-ca")]
    Incomplete,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

impl TlsFiles {
    pub fn is_set(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn load(&self) -> Result<(Identity, Certificate), TlsError> {
        let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) else {
            return Err(TlsError::Incomplete);
        };
        Ok((
            Identity::from_pem(read(cert)?, read(key)?),
            Certificate::from_pem(read(ca)?),
        ))
    }

    /// Server side: present the certificate; require a client certificate signed by the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let (id, ca) = self.load()?;
        Ok(ServerTlsConfig::new().identity(id).client_ca_root(ca))
    }

    /// Client side: verify the server against the CA; present the certificate.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let (id, ca) = self.load()?;
        Ok(ClientTlsConfig::new().ca_certificate(ca).identity(id))
    }
}

/// Whether `url` may be used without TLS: `http://` to a loopback address.
pub fn plaintext_loopback(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_to_loopback_is_plaintext() {
        assert!(plaintext_loopback("http://127.0.0.1:7443"));
        assert!(plaintext_loopback("http://[::1]:7443/"));
        assert!(plaintext_loopback("http://localhost"));
        assert!(!plaintext_loopback("http://10.0.0.1:7443"));
        assert!(!plaintext_loopback("https://127.0.0.1:7443"));
    }

    #[test]
    fn all_three_files_are_needed() {
        let t = TlsFiles {
            cert: Some("c".into()),
            ..Default::default()
        };
        assert!(t.is_set());
        assert!(matches!(t.client_config(), Err(TlsError::Incomplete)));
        assert!(matches!(
            TlsFiles {
                cert: Some("/nonexistent/c".into()),
                key: Some("/nonexistent/k".into()),
                ca: Some("/nonexistent/ca".into()),
            }
            .server_config(),
            Err(TlsError::Read { .. })
        ));
    }
}
