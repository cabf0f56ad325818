//! Plaintext (loopback-only) callers, named by the kernel. A header is never an identity: any
//! process can send any name, but none can own another user's socket. When a connection is
//! accepted, the uid that owns the caller's end (the socket whose local address is our peer
//! address and whose remote address is our listening address) is read from
//! `/proc/net/tcp{,6}` of this network namespace; loopback peers are always in it. A
//! connection whose owner cannot be found is closed: it is never served as "unknown".

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::warn;

/// Who a plaintext caller is: the uid owning its socket and that uid's name (from
/// `/etc/passwd`, else the number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer {
    pub uid: u32,
    pub name: String,
    pub addr: SocketAddr,
}

impl LocalPeer {
    pub fn new(uid: u32, addr: SocketAddr) -> Self {
        Self {
            uid,
            name: user_name(
                uid,
                &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
            ),
            addr,
        }
    }
}

/// An accepted plaintext connection and the peer it belongs to (request extension).
pub struct PeerStream {
    io: TcpStream,
    peer: LocalPeer,
}

impl Connected for PeerStream {
    type ConnectInfo = LocalPeer;

    fn connect_info(&self) -> LocalPeer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The accepted connections of `listener`, each named by its owner; the accept loop ends when
/// the server drops the stream.
pub fn incoming(listener: TcpListener) -> ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (io, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let local = match io.local_addr() {
                Ok(l) => l,
                Err(e) => {
                    warn!(peer = %addr, error = %e, "connection closed: no local address");
                    continue;
                }
            };
            let uid = match owner_uid(addr, local) {
                Ok(Some(uid)) => uid,
                Ok(None) => {
                    warn!(peer = %addr, "connection closed: its socket's owner is not in /proc/net/tcp (not a local caller)");
                    continue;
                }
                Err(e) => {
                    warn!(peer = %addr, error = %e, "connection closed: cannot read /proc/net/tcp");
                    continue;
                }
            };
            let _ = io.set_nodelay(true);
            let peer = LocalPeer::new(uid, addr);
            if tx.send(Ok(PeerStream { io, peer })).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The uid owning the socket bound to `peer` and connected to `local`: asked of the kernel for
/// that one socket (`sock_diag`), else found in `/proc/net/tcp{,6}`. The table lists every
/// socket of the namespace, so reading it per connection grows with the sockets open: with a
/// few thousand nodes reconnecting at once it took seconds.
pub fn owner_uid(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
    match crate::sock_diag::owner_uid(peer, local) {
        Ok(uid) => Ok(uid),
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag lookup failed; reading /proc/net/tcp");
            owner_uid_proc(peer, local)
        }
    }
}

fn owner_uid_proc(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
    let file = match peer.ip() {
        IpAddr::V4(_) => "/proc/net/tcp",
        IpAddr::V6(_) => "/proc/net/tcp6",
    };
    Ok(find_owner(&std::fs::read_to_string(file)?, peer, local))
}

/// In a `/proc/net/tcp` table: the uid column of the row with local address `peer` and remote
/// address `local`.
fn find_owner(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (want_local, want_remote) = (proc_addr(peer), proc_addr(local));
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == want_local && f[2] == want_remote)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// An address as the kernel prints it in `/proc/net/tcp{,6}`: each 32-bit word of the
/// network-order address printed as a native-endian number, then the port.
fn proc_addr(a: SocketAddr) -> String {
    let words: Vec<[u8; 4]> = match a.ip() {
        IpAddr::V4(ip) => vec![ip.octets()],
        IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
    };
    let mut s: String = words
        .iter()
        .map(|w| format!("{:08X}", u32::from_ne_bytes(*w)))
        .collect();
    s.push_str(&format!(":{:04X}", a.port()));
    s
}

/// `uid`'s name in a passwd file, else the number.
fn user_name(uid: u32, passwd: &str) -> String {
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            (id == uid && !name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_passwd_else_the_number() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1001::/home/a:/bin/sh\n";
        assert_eq!(user_name(0, passwd), "root");
        assert_eq!(user_name(1001, passwd), "alice");
        assert_eq!(user_name(2002, passwd), "2002");
    }

    #[tokio::test]
    async fn a_loopback_connection_is_owned_by_this_process_uid() -> anyhow::Result<()> {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(bind).await else {
                continue; // no IPv6 loopback in this namespace
            };
            let addr = l.local_addr()?;
            let client = TcpStream::connect(addr).await?;
            let (server_side, peer) = l.accept().await?;
            assert_eq!(peer, client.local_addr()?);
            let uid =
                std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))?;
            assert_eq!(
                owner_uid(peer, server_side.local_addr()?)?,
                Some(uid),
                "{bind}"
            );
            // The server's own end is not the caller's.
            let other: SocketAddr = if peer.is_ipv4() {
                "127.0.0.1:1".parse()?
            } else {
                "[::1]:1".parse()?
            };
            assert_eq!(owner_uid(other, addr)?, None);
        }
        Ok(())
    }

    #[test]
    fn addresses_print_as_the_kernel_prints_them() {
        let a: SocketAddr = "127.0.0.1:7443".parse().expect("addr");
        assert_eq!(proc_addr(a), "0100007F:1D13");
        let a: SocketAddr = "[::1]:80".parse().expect("addr");
        assert_eq!(proc_addr(a), "00000000000000000000000001000000:0050");
    }
}
