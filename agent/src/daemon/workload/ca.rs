//! The node's SPIFFE certificate authority (standalone mode): a P-256 key and a self-signed CA
//! certificate kept in `--state-dir` (`workload-ca-key.pem`, 0600, and `workload-ca.pem`),
//! made on first use and reused after, so SVIDs a restarted agent issued before stay
//! verifiable. It signs short-lived X.509-SVIDs (rcgen; no crypto written here):
//! - the leaf has exactly one URI SAN, the principal's SPIFFE ID, as the X.509-SVID standard
//!   requires, no DNS names, `digitalSignature` and client/server auth usages;
//! - in managed mode the server certifies a signing key of this node as an intermediate of the
//!   trust domain's CA ([`Ca::set_intermediate`]); from then on leaves are signed with it, the
//!   chain is (leaf, intermediate) and the bundle is the trust domain's root. Until it comes,
//!   or once it has expired, the node's own CA signs (the standalone behaviour);
//! - the session is in a non-critical extension of its own, [`SESSION_OID`], holding the
//!   session id as a DER UTF8String: a second URI SAN would make it no SVID at all.

use std::{
    path::{Path, PathBuf},
    sync::{PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// `1.3.6.1.4.1.59999.1.1`: Corral's session-id extension (a private-arc OID; see the module
/// documentation).
pub const SESSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59999, 1, 1];

/// The CA certificate's lifetime.
const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Issued certificates start this far in the past (clock skew between machines).
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the workload CA in {path} cannot be used")]
    Load {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("issue a certificate")]
    Issue(#[source] rcgen::Error),
    #[error("the intermediate from the server")]
    Intermediate(#[source] rcgen::Error),
    #[error("{id:?} is not a SPIFFE ID usable in a certificate")]
    BadId { id: String },
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, DER: the trust bundle.
    own_bundle: Vec<u8>,
    /// The key the server certifies (managed mode), PKCS#8 DER; made at start.
    inter_key: Vec<u8>,
    inter_public: Vec<u8>,
    intermediate: RwLock<Option<Intermediate>>,
}

/// A server-certified intermediate in use.
struct Intermediate {
    issuer: Issuer<'static, KeyPair>,
    cert: Vec<u8>,
    root: Vec<u8>,
    not_after: SystemTime,
}

/// One issued X.509-SVID.
pub struct Svid {
    /// The chain, DER certificates one after another, the leaf first (then the intermediate,
    /// in managed mode).
    pub cert: Vec<u8>,
    /// Its private key, PKCS#8 DER.
    pub key: Vec<u8>,
    pub not_after: SystemTime,
}

fn ca_params(node: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Corral");
    dn.push(DnType::CommonName, format!("Corral workload CA {node}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl Ca {
    /// Loads the CA kept in `dir`, or makes one there.
    pub fn open(dir: &Path, node: &str) -> Result<Self, CaError> {
        let (key_path, cert_path) = (dir.join("workload-ca-key.pem"), dir.join("workload-ca.pem"));
        let load = |source| CaError::Load {
            path: key_path.clone(),
            source,
        };
        let params = ca_params(node).map_err(load)?;
        if key_path.exists() && cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(load)?;
            let bundle = {
                use rustls_pki_types::pem::PemObject as _;
                rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
                    .map_err(|_| CaError::Load {
                        path: cert_path.clone(),
                        source: rcgen::Error::CouldNotParseCertificate,
                    })?
                    .to_vec()
            };
            return Self::with(Issuer::new(params, key), bundle);
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let key = KeyPair::generate().map_err(CaError::Issue)?;
        let mut p = params.clone();
        let now = SystemTime::now();
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + CA_LIFETIME).into();
        let cert = p.self_signed(&key).map_err(CaError::Issue)?;
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&cert_path, cert.pem()).map_err(io("write", &cert_path))?;
        tracing::info!(path = %cert_path.display(), "workload CA created");
        Self::with(Issuer::new(params, key), cert.der().to_vec())
    }

    fn with(issuer: Issuer<'static, KeyPair>, own_bundle: Vec<u8>) -> Result<Self, CaError> {
        let k = KeyPair::generate().map_err(CaError::Issue)?;
        Ok(Self {
            issuer,
            own_bundle,
            inter_public: k.public_key_raw().to_vec(),
            inter_key: k.serialize_der(),
            intermediate: RwLock::new(None),
        })
    }

    /// The public key the server is asked to certify (P-256 point).
    pub fn intermediate_key(&self) -> Vec<u8> {
        self.inter_public.clone()
    }

    /// Signs with `cert` (the server's certificate for [`Ca::intermediate_key`]) from now on;
    /// `root` becomes the bundle.
    pub fn set_intermediate(&self, cert: &[u8], root: &[u8]) -> Result<(), CaError> {
        let key = KeyPair::try_from(self.inter_key.as_slice()).map_err(CaError::Intermediate)?;
        let issuer = Issuer::from_ca_cert_der(&cert.into(), key).map_err(CaError::Intermediate)?;
        let not_after = not_after_of(cert).unwrap_or(SystemTime::UNIX_EPOCH);
        *self
            .intermediate
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Intermediate {
            issuer,
            cert: cert.to_vec(),
            root: root.to_vec(),
            not_after,
        });
        Ok(())
    }

    /// The trust bundle workloads get: the trust domain's root with an intermediate in use,
    /// else the node's own CA.
    pub fn bundle(&self) -> Vec<u8> {
        match &*self
            .intermediate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(i) if i.not_after > SystemTime::now() => i.root.clone(),
            _ => self.own_bundle.clone(),
        }
    }

    /// An X.509-SVID for `spiffe_id` in `session`, valid for `ttl`.
    pub fn issue(&self, spiffe_id: &str, session: &str, ttl: Duration) -> Result<Svid, CaError> {
        let bad = || CaError::BadId {
            id: spiffe_id.to_owned(),
        };
        if !spiffe_id.starts_with("spiffe://") || spiffe_id.contains(['*', ' ']) {
            return Err(bad());
        }
        let key = KeyPair::generate().map_err(CaError::Issue)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(CaError::Issue)?;
        p.subject_alt_names = vec![SanType::URI(
            spiffe_id.to_owned().try_into().map_err(|_| bad())?,
        )];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Corral");
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            SESSION_OID,
            der_utf8(session),
        )];
        let now = SystemTime::now();
        p.not_before = (now - BACKDATE).into();
        let guard = self
            .intermediate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (cert, chain_rest, not_after) = match &*guard {
            Some(i) if i.not_after > now => {
                // Never outliving the intermediate that signs it.
                let not_after = (now + ttl).min(i.not_after);
                p.not_after = not_after.into();
                let c = p.signed_by(&key, &i.issuer).map_err(CaError::Issue)?;
                (c, i.cert.clone(), not_after)
            }
            _ => {
                let not_after = now + ttl;
                p.not_after = not_after.into();
                let c = p.signed_by(&key, &self.issuer).map_err(CaError::Issue)?;
                (c, Vec::new(), not_after)
            }
        };
        let mut chain = cert.der().to_vec();
        chain.extend_from_slice(&chain_rest);
        Ok(Svid {
            cert: chain,
            key: key.serialize_der(),
            not_after,
        })
    }
}

/// A DER UTF8String.
fn der_utf8(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = vec![0x0c];
    match b.len() {
        n @ 0..=127 => out.push(n as u8),
        n @ 128..=255 => out.extend([0x81, n as u8]),
        n => {
            let n = u16::try_from(n).unwrap_or(u16::MAX);
            out.push(0x82);
            out.extend(n.to_be_bytes());
        }
    }
    out.extend_from_slice(&b[..b.len().min(usize::from(u16::MAX))]);
    out
}

/// Writes `text` readable by root only.
pub(super) fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("write", path))?;
    f.write_all(text.as_bytes()).map_err(io("write", path))
}

/// A certificate's expiry.
fn not_after_of(der: &[u8]) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}
