//! One TCP socket's owner, asked of the kernel by its addresses: a `SOCK_DIAG_BY_FAMILY`
//! request for exactly that socket (`inet_diag_req_v2` without `NLM_F_DUMP`) on a netlink
//! socket, answered with its `inet_diag_msg` (or `ENOENT`). Plain bytes, no unsafe code.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketType, netlink, recv, sendto, sockopt,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const IPPROTO_TCP: u8 = 6;
/// `inet_diag_msg`: family, state, timer, retrans (4), id (48), expires, rqueue, wqueue (12),
/// then the uid.
const UID_AT: usize = 16 + 4 + 48 + 12;

/// The uid owning the TCP socket whose local address is `src` and remote address `dst`;
/// `None` if there is no such socket.
pub fn owner_uid(src: SocketAddr, dst: SocketAddr) -> io::Result<Option<u32>> {
    let fd = rustix::net::socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(1)))?;
    let req = request(src, dst);
    sendto(
        &fd,
        &req,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )?;
    let mut buf = vec![0u8; 8192];
    let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty())?;
    parse(&buf[..n])
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 2,
        IpAddr::V6(_) => 10,
    }
}

/// The address as `inet_diag_sockid` holds it: four network-order words, IPv4 in the first.
fn words(ip: IpAddr) -> [u8; 16] {
    let mut w = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => w[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => w.copy_from_slice(&v6.octets()),
    }
    w
}

fn request(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut b = Vec::with_capacity(72);
    // nlmsghdr
    b.extend_from_slice(&72u32.to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states (all)
    b.extend_from_slice(&[family(src.ip()), IPPROTO_TCP, 0, 0]);
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports in network order, addresses, interface, no cookie
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b.extend_from_slice(&words(src.ip()));
    b.extend_from_slice(&words(dst.ip()));
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    b.extend_from_slice(&u32::MAX.to_ne_bytes());
    b
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse(b: &[u8]) -> io::Result<Option<u32>> {
    let short = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer");
    let kind = b
        .get(4..6)
        .map(|t| u16::from_ne_bytes([t[0], t[1]]))
        .ok_or_else(short)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(b, 16).ok_or_else(short)? as i32;
        return match -errno {
            0 | 2 => Ok(None), // ENOENT: no such socket
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag message type {kind}"),
        ));
    }
    u32_at(b, UID_AT).map(Some).ok_or_else(short)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_the_owner_of_a_connected_socket_and_nothing_else() -> std::io::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let c = TcpStream::connect(l.local_addr()?)?;
        let (_s, peer) = l.accept()?;
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(super::owner_uid(peer, l.local_addr()?)?, Some(me));
        assert_eq!(peer, c.local_addr()?);
        // No socket with these addresses.
        let gone = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(super::owner_uid(gone, l.local_addr()?)?, None);
        Ok(())
    }
}
