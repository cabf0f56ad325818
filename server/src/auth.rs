//! Who is calling: every service names its caller here, one way. Under mTLS a caller is the
//! name its client certificate was issued to; without TLS (loopback only), the
//! `x-corral-user` header the CLI sends.

use tonic::Request;

/// The metadata key the CLI puts its user name in (recorded as `applied_by`; without mTLS,
/// also the caller's name).
pub const USER_HEADER: &str = "x-corral-user";

/// Who is calling, as grants record and compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The name compared for separation of duties and `--approver` (certificate name, or
    /// the user header).
    pub name: String,
    /// As recorded (`requested_by`, `decided_by`, history actors): the name, plus the peer
    /// address when known.
    pub display: String,
}

impl Caller {
    pub fn new(name: &str, peer: Option<std::net::SocketAddr>) -> Self {
        let name = if name.is_empty() { "unknown" } else { name };
        Self {
            name: name.to_owned(),
            display: peer.map_or_else(|| name.to_owned(), |a| format!("{name} from {a}")),
        }
    }
}

/// The name a client certificate is issued to: its first DNS, else its first URI, subject
/// alternative name.
pub fn cert_name(certs: &[rustls_pki_types::CertificateDer<'static>]) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(certs.first()?).ok()?;
    let name = cert
        .valid_dns_names()
        .next()
        .or_else(|| cert.valid_uri_names().next())?;
    Some(name.to_owned())
}

/// The caller: its certificate name under mTLS, else the `x-corral-user` header.
pub fn caller<T>(req: &Request<T>) -> Caller {
    let name = match req.peer_certs() {
        Some(certs) => cert_name(&certs).unwrap_or_default(),
        None => req
            .metadata()
            .get(USER_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    Caller::new(&name, req.remote_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_show_their_peer() {
        let c = Caller::new("alice", "127.0.0.1:9".parse().ok());
        assert_eq!(
            (c.name.as_str(), c.display.as_str()),
            ("alice", "alice from 127.0.0.1:9")
        );
        assert_eq!(Caller::new("", None).display, "unknown");
    }

    #[test]
    fn without_certificates_the_header_names_the_caller() {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert(USER_HEADER, " bob ".parse().expect("ascii"));
        assert_eq!(caller(&req).name, "bob");
        assert_eq!(caller(&Request::new(())).name, "unknown");
    }
}
