//! `corral-probe`: joins a cgroup, then performs network operations and prints one line per
//! operation: `ok` or the errno name (`EPERM`, `ECONNREFUSED`, ...).
//!
//! Usage: `corral-probe [--cgroup DIR] OP...` where OP is
//! `tcp:ADDR:PORT` (connect), `udp:ADDR:PORT` (connect), `sendto:ADDR:PORT` (unconnected UDP).
use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(n) => format!("errno{n}"),
        None if e.kind() == ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => format!("{e}"),
    }
}

fn run(op: &str) -> Result<(), std::io::Error> {
    let (kind, addr) = op
        .split_once(':')
        .ok_or_else(|| std::io::Error::other(format!("bad op {op}")))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("bad address {addr}: {e}")))?;
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    match kind {
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop),
        "udp" => UdpSocket::bind(any)?.connect(addr),
        "sendto" => UdpSocket::bind(any)?.send_to(b"corral", addr).map(drop),
        _ => Err(std::io::Error::other(format!("unknown op kind {kind}"))),
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--cgroup") {
        args.next();
        let dir = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("--cgroup needs a directory"))?;
        std::fs::write(format!("{dir}/cgroup.procs"), "0")
            .map_err(|e| anyhow::anyhow!("join cgroup {dir}: {e}"))?;
    }
    for op in args {
        match run(&op) {
            Ok(()) => println!("ok"),
            Err(e) => println!("{}", errno_name(&e)),
        }
    }
    Ok(())
}
