//! Who is calling: every service names its caller here, one way. Under mTLS a caller is the
//! name its client certificate was issued to; without TLS (loopback only), the user that owns
//! the caller's socket ([`crate::local_peer`]). No header or other field a client sends is
//! ever an identity.

use tonic::Request;

use crate::local_peer::LocalPeer;

/// Who is calling, as grants record and compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The name compared for separation of duties, `--approver` and `--policy-admin`
    /// (certificate name, or the local user owning the caller's socket).
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

/// The caller: its certificate name under mTLS, else the local user owning its socket, else
/// `unknown` (which no `--approver` or `--policy-admin` list can name).
pub fn caller<T>(req: &Request<T>) -> Caller {
    if let Some(certs) = req.peer_certs() {
        return Caller::new(&cert_name(&certs).unwrap_or_default(), req.remote_addr());
    }
    match req.extensions().get::<LocalPeer>() {
        Some(p) => Caller::new(&p.name, Some(p.addr)),
        None => Caller::new("", req.remote_addr()),
    }
}

/// `msg` as if sent by the local user `name` (tests of the services, which call them without
/// a transport).
#[cfg(test)]
pub fn as_local_user<T>(name: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(LocalPeer {
        uid: 4242,
        name: name.to_owned(),
        addr: ([127, 0, 0, 1], 1).into(),
    });
    r
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
    fn without_certificates_the_socket_owner_names_the_caller_never_a_header() {
        let mut req = as_local_user("bob", ());
        req.metadata_mut()
            .insert("x-corral-user", "alice".parse().expect("ascii"));
        assert_eq!(caller(&req).name, "bob");
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("x-corral-user", "alice".parse().expect("ascii"));
        assert_eq!(
            caller(&req).name,
            "unknown",
            "a header is never an identity"
        );
    }
}
