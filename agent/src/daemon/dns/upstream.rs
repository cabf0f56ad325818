//! The resolver the proxy forwards to: `--dns-upstream` for every principal; without it, a
//! principal in a network namespace of its own (a pod) has its queries asked from that
//! namespace, of the first `nameserver` of the `resolv.conf` its processes see (as they would
//! have asked: the cluster DNS, or a runtime's resolver on the pod's own loopback), and
//! otherwise the first `nameserver` of the node's `/etc/resolv.conf`. A query goes over the
//! transport it came in on (a UDP answer with the truncated bit is passed on as is: the
//! client asks again over TCP).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream, UdpSocket},
};

use super::netns::Worker;

/// A resolver, and the network namespace it is asked from (`None`: the agent's own).
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub netns: Option<Arc<Worker>>,
}

/// Which resolver a principal's proxy binding asks, chosen per query.
#[derive(Debug)]
pub enum Route {
    /// The node's resolver (or the one given), asked from the agent's namespace.
    Node(Option<SocketAddr>),
    /// A namespace's own resolver (its processes' `resolv.conf`), asked from inside it; the
    /// node's when they name none.
    Netns {
        worker: Arc<Worker>,
        node: Option<SocketAddr>,
    },
}

impl Route {
    pub fn upstream(&self) -> Option<Upstream> {
        match self {
            Self::Node(a) => a.map(Upstream::here),
            Self::Netns { worker, node } => match worker.resolver() {
                Some(addr) => Some(Upstream {
                    addr,
                    netns: Some(worker.clone()),
                }),
                None => node.map(Upstream::here),
            },
        }
    }
}

impl Upstream {
    pub fn here(addr: SocketAddr) -> Self {
        Self { addr, netns: None }
    }

    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let Some(w) = &self.netns else {
            return TcpStream::connect(self.addr).await;
        };
        let v4 = self.addr.is_ipv4();
        let s = w
            .call(move || {
                if v4 {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
            })
            .await?;
        s.connect(self.addr).await
    }

    async fn udp(&self) -> std::io::Result<UdpSocket> {
        let local: SocketAddr = if self.addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let s = match &self.netns {
            None => std::net::UdpSocket::bind(local)?,
            Some(w) => w.call(move || std::net::UdpSocket::bind(local)).await?,
        };
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    }
}

/// How long the upstream resolver has to answer.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream resolver (give --dns-upstream, or a nameserver in /etc/resolv.conf)")]
    None,
    #[error("upstream {0} did not answer in {TIMEOUT:?}")]
    Timeout(SocketAddr),
    #[error("upstream answer: {0}")]
    Answer(#[from] super::message::MessageError),
    #[error("upstream answered {0}")]
    Rcode(String),
    #[error("upstream {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The first `nameserver` of resolv.conf text, port 53.
pub fn from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// Forwards the query `q` to `up` and returns the answer.
pub async fn ask(up: &Upstream, q: &[u8], tcp: bool) -> Result<Vec<u8>, UpstreamError> {
    let addr = up.addr;
    let io = |source| UpstreamError::Io { addr, source };
    let work = async {
        if tcp {
            let mut s = up.tcp().await.map_err(io)?;
            let n = u16::try_from(q.len()).map_err(|e| io(std::io::Error::other(e)))?;
            s.write_u16(n).await.map_err(io)?;
            s.write_all(q).await.map_err(io)?;
            let len = usize::from(s.read_u16().await.map_err(io)?);
            let mut r = vec![0u8; len];
            s.read_exact(&mut r).await.map_err(io)?;
            Ok(r)
        } else {
            let s = up.udp().await.map_err(io)?;
            s.connect(addr).await.map_err(io)?;
            s.send(q).await.map_err(io)?;
            let mut r = vec![0u8; super::UDP_MAX];
            loop {
                let n = s.recv(&mut r).await.map_err(io)?;
                // The answer to this query (same id), not a stray datagram.
                if n >= 2 && q.len() >= 2 && r[..2] == q[..2] {
                    r.truncate(n);
                    return Ok(r);
                }
            }
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| UpstreamError::Timeout(addr))?
}

/// The IPv4 addresses `name` resolves to at `upstream` (CNAME chains followed), as the proxy
/// would see them; for `explain`.
pub async fn resolve_a(
    upstream: SocketAddr,
    name: &str,
) -> Result<Vec<std::net::IpAddr>, UpstreamError> {
    let q = super::message::a_query(name, std::process::id() as u16)?;
    let r = ask(&Upstream::here(upstream), &q, false).await?;
    let a = super::message::answer(&r, name)?;
    if a.rcode != "NOERROR" {
        return Err(UpstreamError::Rcode(a.rcode));
    }
    Ok(a.addrs.into_iter().map(|(ip, _)| ip).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_nameserver_is_taken() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n";
        assert_eq!(from_resolv_conf(text), "10.0.2.3:53".parse().ok());
        assert_eq!(
            from_resolv_conf("nameserver ::1\n"),
            "[::1]:53".parse().ok()
        );
        assert_eq!(from_resolv_conf("search x\n"), None);
    }
}
