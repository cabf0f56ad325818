//! The trust domain's CA for the SPIFFE Workload API in managed mode (`--workload-ca-cert`,
//! `--workload-ca-key`, PEM; replicas mount the same files). Over NodeSync it certifies each
//! node's workload-signing key as a short-lived intermediate CA (path length 0,
//! `--intermediate-ttl-secs`, 24 h), so nodes issue SVIDs locally, also while the server is
//! briefly unreachable, until the intermediate expires. rcgen signs; no crypto written here.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SignatureAlgorithm,
};

#[derive(Debug, thiserror::Error)]
pub enum WorkloadCaError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the workload CA ({what})")]
    Load {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the node's key is not a P-256 public key ({len} bytes)")]
    BadKey { len: usize },
    #[error("sign an intermediate")]
    Sign(#[source] rcgen::Error),
}

pub struct WorkloadCa {
    issuer: Issuer<'static, KeyPair>,
    root: Vec<u8>,
    ttl: Duration,
}

/// A node's public key as rcgen takes it.
struct NodeKey(Vec<u8>);

impl PublicKeyData for NodeKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl WorkloadCa {
    pub fn open(cert: &PathBuf, key: &PathBuf, ttl: Duration) -> Result<Self, WorkloadCaError> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|source| WorkloadCaError::Read {
                path: p.clone(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let key = KeyPair::from_pem(&key_pem).map_err(|source| WorkloadCaError::Load {
            what: "key",
            source,
        })?;
        let root = {
            use rustls_pki_types::pem::PemObject as _;
            rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|_| WorkloadCaError::Load {
                    what: "certificate",
                    source: rcgen::Error::CouldNotParseCertificate,
                })?
                .to_vec()
        };
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| WorkloadCaError::Load {
                what: "certificate",
                source,
            })?;
        Ok(Self { issuer, root, ttl })
    }

    /// The trust bundle (the root, DER).
    pub fn root(&self) -> &[u8] {
        &self.root
    }

    /// An intermediate CA certificate for `node`'s key; its expiry (Unix seconds).
    pub fn certify(
        &self,
        node: &str,
        public_key: &[u8],
    ) -> Result<(Vec<u8>, u64), WorkloadCaError> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(WorkloadCaError::BadKey {
                len: public_key.len(),
            });
        }
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(WorkloadCaError::Sign)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Corral");
        dn.push(DnType::CommonName, format!("Corral node {node}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + self.ttl;
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = not_after.into();
        let cert = p
            .signed_by(&NodeKey(public_key.to_vec()), &self.issuer)
            .map_err(WorkloadCaError::Sign)?;
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok((cert.der().to_vec(), secs))
    }
}
