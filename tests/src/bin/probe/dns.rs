//! DNS operations of the probe: a real query over UDP or TCP to a resolver address, as any
//! client sends it, and the reply as the client reads it (rcode, A/AAAA addresses, and the
//! source the reply claims to come from).
//!
//! - `dns:NAME@ADDR:PORT`: A query over UDP with an unconnected socket (`sendto` +
//!   `recvfrom`); prints `RCODE ADDRS from SRC` (`NOERROR 127.0.0.2 from 10.0.0.53:53`,
//!   ADDRS `-` when none), or the errno of the send;
//! - `dnsc:NAME@ADDR:PORT`: the same with a connected UDP socket (`connect` + `send`);
//! - `dnstcp:NAME@ADDR:PORT`: the same over TCP (length-prefixed);
//! - `dnslat:N:NAME@ADDR:PORT`: N UDP queries in turn; prints `p50=NS p99=NS qps=Q ok=N`
//!   (benchmarks: each query's round trip, and queries per second, one client);
//! - `dnsconn:PORT:NAME@ADDR:PORT`: a UDP query, then at once a TCP connect to the first
//!   address of the answer at PORT; prints the connect's outcome (`ok`, `EPERM`, ...), or the
//!   rcode when the answer has no address;
//! - `listen:ADDR:PORT`: a TCP listener at ADDR:PORT, kept until the probe ends (a target in
//!   the probe's own network namespace).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// `NAME@ADDR:PORT`.
fn target(spec: &str) -> std::io::Result<(Name, SocketAddr)> {
    let (name, addr) = spec
        .split_once('@')
        .ok_or_else(|| other(format!("bad dns target {spec}")))?;
    let name = Name::from_ascii(name).map_err(other)?;
    let addr = addr.parse().map_err(other)?;
    Ok((name, addr))
}

fn query(name: &Name) -> std::io::Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name.clone(), RecordType::A));
    m.to_vec().map_err(other)
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ std::process::id()) as u16
}

/// The reply's rcode and A/AAAA addresses.
struct Reply {
    rcode: String,
    addrs: Vec<IpAddr>,
}

fn parse(bytes: &[u8]) -> std::io::Result<Reply> {
    let m = Message::from_vec(bytes).map_err(other)?;
    let addrs = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Ok(Reply {
        rcode: corral_agent::daemon::dns::message::rcode_name(m.response_code()),
        addrs,
    })
}

fn udp(spec: &str, connected: bool) -> std::io::Result<(Reply, SocketAddr)> {
    let (name, server) = target(spec)?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(other)?
    } else {
        "[::]:0".parse().map_err(other)?
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let q = query(&name)?;
    if connected {
        s.connect(server)?;
        s.send(&q)?;
    } else {
        s.send_to(&q, server)?;
    }
    let mut buf = [0u8; 4096];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((parse(&buf[..n])?, from))
}

fn tcp(spec: &str) -> std::io::Result<(Reply, SocketAddr)> {
    let (name, server) = target(spec)?;
    let mut s = TcpStream::connect_timeout(&server, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let q = query(&name)?;
    let len = u16::try_from(q.len()).map_err(other)?;
    s.write_all(&len.to_be_bytes())?;
    s.write_all(&q)?;
    let mut n = [0u8; 2];
    s.read_exact(&mut n)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(n))];
    s.read_exact(&mut buf)?;
    let peer = s.peer_addr()?;
    Ok((parse(&buf)?, peer))
}

fn line((r, from): (Reply, SocketAddr)) -> String {
    let addrs = if r.addrs.is_empty() {
        "-".to_owned()
    } else {
        r.addrs
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{} {addrs} from {from}", r.rcode)
}

/// Runs DNS op `kind` (`dns`, `dnsc`, `dnstcp`, `dnsconn`) on `rest`; `None`: not a DNS op.
pub fn op(kind: &str, rest: &str) -> Option<std::io::Result<String>> {
    Some(match kind {
        "dns" => udp(rest, false).map(line),
        "dnsc" => udp(rest, true).map(line),
        "dnstcp" => tcp(rest).map(line),
        "dnsconn" => conn(rest),
        "dnslat" => latency(rest),
        "listen" => listen(rest),
        _ => return None,
    })
}

fn listen(rest: &str) -> std::io::Result<String> {
    let addr: SocketAddr = rest.parse().map_err(other)?;
    // Kept open for the probe's life.
    std::mem::forget(std::net::TcpListener::bind(addr)?);
    Ok("ok".to_owned())
}

fn conn(rest: &str) -> std::io::Result<String> {
    let (port, spec) = rest
        .split_once(':')
        .ok_or_else(|| other(format!("bad dnsconn {rest}")))?;
    let port: u16 = port.parse().map_err(other)?;
    let (reply, _) = udp(spec, false)?;
    let Some(addr) = reply.addrs.first() else {
        return Ok(reply.rcode);
    };
    TcpStream::connect_timeout(&SocketAddr::new(*addr, port), TIMEOUT).map(|_| "ok".to_owned())
}

fn latency(rest: &str) -> std::io::Result<String> {
    let (n, spec) = rest
        .split_once(':')
        .ok_or_else(|| other(format!("bad dnslat {rest}")))?;
    let n: usize = n.parse().map_err(other)?;
    let (name, server) = target(spec)?;
    let s = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(server)?;
    let q = query(&name)?;
    let mut buf = [0u8; 4096];
    let mut ns: Vec<u64> = Vec::with_capacity(n);
    let start = std::time::Instant::now();
    for _ in 0..n {
        let t = std::time::Instant::now();
        s.send(&q)?;
        let got = s.recv(&mut buf)?;
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        if parse(&buf[..got])?.addrs.is_empty() {
            return Err(other("an answer without addresses"));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    ns.sort_unstable();
    let at = |p: usize| {
        ns.get((ns.len() * p / 100).min(ns.len().saturating_sub(1)))
            .copied()
    };
    Ok(format!(
        "p50={} p99={} qps={:.0} ok={}",
        at(50).unwrap_or(0),
        at(99).unwrap_or(0),
        n as f64 / secs.max(1e-9),
        ns.len()
    ))
}
