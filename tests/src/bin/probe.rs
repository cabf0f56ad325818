//! `corral-probe`: a real process for the privileged tests. It optionally joins a cgroup, then
//! performs operations and prints one line per operation: `ok` or the errno name (`EPERM`, ...).
//!
//! Usage: `corral-probe [--cgroup DIR] [--out FILE] OP...`; OP is one of
//! - `tcp:ADDR:PORT`: TCP connect; `udp:ADDR:PORT`: UDP connect;
//! - `sendto:ADDR:PORT`: unconnected UDP sendto;
//! - `tfo:ADDR:PORT`: TCP fast open (sendto with MSG_FASTOPEN on an unconnected socket);
//! - `unix:PATH`: connect a SOCK_STREAM unix socket; `unixdgram:PATH`: sendto on an unbound,
//!   unconnected SOCK_DGRAM unix socket (PATH `@name`: the abstract name `name`);
//! - `unixjunk:PATH`: connect a SOCK_STREAM unix socket to `PATH\0JUNK` with the address
//!   length covering the junk (the kernel stops at the NUL); `unixnonul:PATH`: connect with
//!   the address length ending right after PATH, no NUL passed (the kernel adds it);
//! - `socket:FAMILY:TYPE:PROTO`: `socket()` with these numbers, then close it;
//! - `ipopts:HEX`: `setsockopt(IP_OPTIONS)` with the bytes HEX on an IPv4 UDP socket;
//! - `rthdr6:HEX`: `setsockopt(IPV6_RTHDR)` with the bytes HEX on an IPv6 UDP socket;
//! - `unixabsnul:NAME`: connect a SOCK_STREAM unix socket to the abstract name `NAME\0` (one
//!   trailing NUL byte, passed in the address length: a different socket from `@NAME`);
//! - `movecg:DIR`: move this process into the cgroup DIR (e.g. the cgroup v2 root);
//! - `forkout:DIR=OP`: fork (no exec); the child moves itself into the cgroup DIR, runs OP and
//!   prints its outcome; the parent waits for it;
//! - `leaderout:DIR=OP`: the main thread exits; another thread, once the leader is a zombie,
//!   moves the process into the cgroup DIR, runs OP, prints its outcome and ends the process
//!   (no later operation runs);
//! - `subcg:NAME`: create a sub-cgroup of the current cgroup and move into it;
//! - `daemon`: double-fork and setsid (via `setsid -f`), the grandchild runs the remaining
//!   operations and writes its lines to `--out` (required);
//! - `repeat:N:OP`: run OP N times, print `ok=<n> <ERR>=<n>...` counts;
//! - `until:FILE:OP`: run OP in a loop until FILE exists, print counts as for `repeat`;
//! - `spawn:PATH`: fork+exec PATH (no arguments) and wait for it;
//! - `time:N:OP`: run OP N times, print `ns=<mean nanoseconds per op> ok=<n>` (benchmarks);
//! - `loop:N:connect:ADDR:PORT`, `loop:N:sendto:ADDR:PORT`: N `connect()`s, or N one-byte
//!   `sendto()`s, on one UDP socket created first; print `ns=<mean per call> ok=<n>` and
//!   `<ERR>=<n>` counts (benchmarks: the syscall's marginal cost, no socket setup);
//! - `watch:US:OP`: run OP every US microseconds until stdin reaches EOF (or the probe is
//!   killed); print `<CLOCK_MONOTONIC ns> <outcome>` for the first outcome and for each change
//!   (latency benchmarks: `corral_tests::harness::Prober`);
//! - `session`: read commands from stdin (see `probe/session.rs`): hold sockets open across a
//!   change the test makes;
//! - `lsrrmsg:ADDR:PORT`: UDP `sendmsg()` to ADDR:PORT with a loose source route through
//!   127.0.0.1 in an `IP_RETOPTS` control message (no `setsockopt()`);
//! - `ping:ADDR`: an ICMP echo request from a ping socket (`SOCK_DGRAM` + `IPPROTO_ICMP`, or
//!   `IPPROTO_ICMPV6` for `[ADDR]`): `socket()`'s or `sendto()`'s outcome;
//! - `rthdrmsg6:ADDR:PORT:HEX`: UDP `sendmsg()` with the routing header HEX in an
//!   `IPV6_RTHDR` control message.
//!
//! - `dns:NAME@ADDR:PORT`, `dnsc:...`, `dnstcp:...`, `dnsconn:PORT:NAME@ADDR:PORT`: DNS
//!   queries as a client sends them (see `probe/dns.rs`);
//! - `sleep:MS`: sleep MS milliseconds (prints `ok`).
//!
//! ADDR is `1.2.3.4` or `[::1]`.
use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

#[path = "probe/dns.rs"]
mod dns;
#[path = "probe/session.rs"]
mod session;
use socket2::{Domain, SockAddr, Socket, Type};

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EINPROGRESS) => "EINPROGRESS".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EAFNOSUPPORT) => "EAFNOSUPPORT".into(),
        Some(n) => format!("errno{n}"),
        None if e.kind() == ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => format!("{e}"),
    }
}

fn parse_addr(s: &str) -> std::io::Result<SocketAddr> {
    s.parse()
        .map_err(|e| std::io::Error::other(format!("bad address {s}: {e}")))
}

fn net_op(kind: &str, addr: &str) -> std::io::Result<()> {
    let addr = parse_addr(addr)?;
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    match kind {
        "tcp" => {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            // Close with RST: no TIME_WAIT, so loops of connects do not exhaust local ports.
            Socket::from(s).set_linger(Some(Duration::ZERO))
        }
        "udp" => UdpSocket::bind(any)?.connect(addr),
        "sendto" => UdpSocket::bind(any)?.send_to(b"corral", addr).map(drop),
        "tfo" => {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.send_to_with_flags(b"corral", &SockAddr::from(addr), libc::MSG_FASTOPEN)
                .map(drop)
        }
        _ => Err(std::io::Error::other(format!("unknown op kind {kind}"))),
    }
}

fn unix_addr(path: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => std::os::unix::net::SocketAddr::from_pathname(path),
    }
}

fn unix_op(kind: &str, path: &str) -> std::io::Result<()> {
    use std::os::unix::net::{UnixDatagram, UnixStream};
    let addr = unix_addr(path)?;
    match kind {
        "unix" => UnixStream::connect_addr(&addr).map(drop),
        _ => UnixDatagram::unbound()?
            .send_to_addr(b"corral", &addr)
            .map(drop),
    }
}

/// Connects a SOCK_STREAM unix socket to the raw `sun_path` bytes `path`, passing exactly
/// their length as the address length.
fn unix_raw(path: &[u8]) -> std::io::Result<()> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.len() > sa.sun_path.len() {
        return Err(std::io::Error::other("path too long"));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Bytes past the passed length must not matter: make them non-zero.
    for (d, s) in sa
        .sun_path
        .iter_mut()
        .zip(path.iter().chain(std::iter::repeat(&b'X')))
    {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len();
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    // SAFETY: `sa` is a valid sockaddr_un and `len` does not exceed its size.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            std::ptr::from_ref(&sa).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `socket(family, type, proto)`, closed at once.
fn socket_op(spec: &str) -> std::io::Result<()> {
    let n: Vec<i32> = spec
        .split(':')
        .map(|v| v.parse().map_err(std::io::Error::other))
        .collect::<Result<_, _>>()?;
    let [family, ty, proto] = n[..] else {
        return Err(std::io::Error::other("socket:FAMILY:TYPE:PROTO"));
    };
    // SAFETY: plain syscall with integer arguments; the fd is closed below.
    let fd = unsafe { libc::socket(family, ty, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    Ok(())
}

/// `setsockopt(level, name, HEX bytes)` on a new UDP socket of `domain`.
fn sockopt_op(domain: Domain, level: i32, name: i32, hex: &str) -> std::io::Result<()> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(std::io::Error::other)?;
    let s = Socket::new(domain, Type::DGRAM, None)?;
    // SAFETY: `bytes` outlives the call and its length is passed with it.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            level,
            name,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One ICMP echo request to ADDR from a ping socket.
fn ping(addr: &str) -> std::io::Result<()> {
    let addr = parse_addr(&format!("{addr}:0"))?;
    let (domain, proto, ty) = if addr.is_ipv4() {
        (Domain::IPV4, socket2::Protocol::ICMPV4, 8u8)
    } else {
        (Domain::IPV6, socket2::Protocol::ICMPV6, 128u8)
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(proto))?;
    // Type, code, checksum (the kernel fills it for ping sockets), id, sequence, payload.
    let echo = [ty, 0, 0, 0, 0, 0, 0, 1, b'c', b'o', b'r', b'r', b'a', b'l'];
    sock.send_to(&echo, &SockAddr::from(addr)).map(drop)
}

/// One UDP datagram to ADDR:PORT with an IP-level control message: `lsrrmsg` (an IPv4 loose
/// source route through 127.0.0.1, `IP_RETOPTS`) or `rthdrmsg6` (`IPV6_RTHDR` with HEX).
fn cmsg_send(kind: &str, rest: &str) -> std::io::Result<()> {
    let (addr, data, level, ty) = if kind == "lsrrmsg" {
        // NOP, LSRR (length 7, pointer 4), one hop: 127.0.0.1.
        let opts = vec![1u8, 0x83, 7, 4, 127, 0, 0, 1];
        (rest.to_owned(), opts, libc::IPPROTO_IP, libc::IP_RETOPTS)
    } else {
        let (addr, hex) = rest
            .rsplit_once(':')
            .ok_or_else(|| std::io::Error::other("rthdrmsg6:ADDR:PORT:HEX"))?;
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(std::io::Error::other)?;
        (addr.to_owned(), bytes, libc::IPPROTO_IPV6, libc::IPV6_RTHDR)
    };
    let addr = parse_addr(&addr)?;
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, None)?;
    let dest = SockAddr::from(addr);
    let payload = *b"corral";
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(data.len() as u32) as usize,
            libc::CMSG_LEN(data.len() as u32) as usize,
        )
    };
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dest.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dest.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `control` holds CMSG_SPACE(len) bytes, so the first header and its data fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = len;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
    }
    // SAFETY: a valid socket and a msghdr whose buffers live until the call returns.
    let n = unsafe { libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(&sock), &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn one(op: &str) -> String {
    let Some((kind, rest)) = op.split_once(':') else {
        return format!("bad op {op}");
    };
    if kind == "unixjunk" || kind == "unixnonul" || kind == "unixabsnul" {
        let mut path = rest.as_bytes().to_vec();
        if kind == "unixjunk" {
            path.extend_from_slice(b"\0JUNK");
        }
        if kind == "unixabsnul" {
            path.insert(0, 0);
            path.push(0);
        }
        return match unix_raw(&path) {
            Ok(()) => "ok".into(),
            Err(e) => errno_name(&e),
        };
    }
    if kind == "unix" || kind == "unixdgram" {
        return match unix_op(kind, rest) {
            Ok(()) => "ok".into(),
            Err(e) => errno_name(&e),
        };
    }
    let guarded = match kind {
        "socket" => Some(socket_op(rest)),
        "ipopts" => Some(sockopt_op(
            Domain::IPV4,
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            rest,
        )),
        "rthdr6" => Some(sockopt_op(
            Domain::IPV6,
            libc::IPPROTO_IPV6,
            libc::IPV6_RTHDR,
            rest,
        )),
        _ => None,
    };
    if let Some(r) = guarded {
        return match r {
            Ok(()) => "ok".into(),
            Err(e) => errno_name(&e),
        };
    }
    if kind == "ping" {
        return match ping(rest) {
            Ok(()) => "ok".into(),
            Err(e) => errno_name(&e),
        };
    }
    if kind == "lsrrmsg" || kind == "rthdrmsg6" {
        return match cmsg_send(kind, rest) {
            Ok(()) => "ok".into(),
            Err(e) => errno_name(&e),
        };
    }
    if kind == "sleep" {
        return match rest.parse() {
            Ok(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                "ok".into()
            }
            Err(e) => format!("bad sleep {rest}: {e}"),
        };
    }
    if let Some(r) = dns::op(kind, rest) {
        return r.unwrap_or_else(|e| errno_name(&e));
    }
    if kind == "spawn" {
        return match std::process::Command::new(rest).status() {
            Ok(s) if s.success() => "ok".into(),
            Ok(s) => format!("status:{s}"),
            Err(e) => errno_name(&e),
        };
    }
    match net_op(kind, rest) {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(&e),
    }
}

/// `forkout:DIR=OP`: a forked child (no exec: no exec hook sees it) leaves for cgroup DIR and
/// runs OP; its outcome line goes straight to stdout. Waits for the child.
fn forkout(dir: &str, op: &str) -> anyhow::Result<()> {
    // SAFETY: the child only writes a file, runs one operation, writes to fd 1 and _exits.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let line = match std::fs::write(Path::new(dir).join("cgroup.procs"), "0") {
                Ok(()) => one(op),
                Err(e) => format!("movecg failed: {e}"),
            };
            let bytes = format!("{line}\n");
            // SAFETY: writes a valid buffer to stdout, then ends the child without unwinding.
            unsafe {
                libc::write(1, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0)
            }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Ok(())
        }
    }
}

/// `leaderout:DIR=OP`: the main thread (the thread-group leader) exits first; a second
/// thread waits until the leader is a zombie, moves the process into cgroup DIR, runs OP,
/// prints its outcome and ends the process. Never returns.
fn leaderout(dir: &str, op: &str) -> ! {
    let (dir, op) = (dir.to_owned(), op.to_owned());
    std::thread::spawn(move || {
        let tgid = std::process::id();
        let stat = format!("/proc/{tgid}/task/{tgid}/stat");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let zombie = loop {
            let state = std::fs::read_to_string(&stat).ok().and_then(|s| {
                let after = s.rsplit_once(") ")?.1.to_owned();
                after.split_whitespace().next().map(str::to_owned)
            });
            if state.as_deref() == Some("Z") {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let line = if !zombie {
            "the leader did not exit".to_owned()
        } else {
            match std::fs::write(Path::new(&dir).join("cgroup.procs"), "0") {
                Ok(()) => one(&op),
                Err(e) => format!("movecg failed: {e}"),
            }
        };
        let bytes = format!("{line}\n");
        // SAFETY: writes a valid buffer to stdout, then ends the whole process.
        unsafe {
            libc::write(1, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        }
    });
    // The raw `exit` syscall ends only the calling (main) thread, with no unwinding (which
    // `pthread_exit` would force through Rust frames); the spawned thread keeps the process.
    loop {
        // SAFETY: a plain syscall; it does not return.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
}

fn counts(results: impl Iterator<Item = String>) -> String {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        *m.entry(r).or_default() += 1;
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn current_cgroup() -> anyhow::Result<std::path::PathBuf> {
    let rel = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .context("no cgroup v2 entry in /proc/self/cgroup")?;
    let root = corral_agent::paths::cgroup2_root()?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// `watch:US:OP`: OP in a loop until stdin closes (the parent's end of the pipe: it stops the
/// probe, or the parent died), printing each change of outcome with the time it was seen
/// (CLOCK_MONOTONIC, taken right after the operation returned).
fn watch(op: &str, interval: Duration, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = Arc::clone(&stop);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        stopper.store(true, Ordering::Relaxed);
    });
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        let outcome = one(op);
        let at = corral_tests::harness::monotonic_ns();
        if outcome != last {
            writeln!(out, "{at} {outcome}")?;
            out.flush()?;
            last = outcome;
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

fn run(ops: &[String], out: &mut dyn std::io::Write, out_path: Option<&str>) -> anyhow::Result<()> {
    let mut i = 0;
    while i < ops.len() {
        let op = &ops[i];
        i += 1;
        if let Some(dir) = op.strip_prefix("movecg:") {
            std::fs::write(Path::new(dir).join("cgroup.procs"), "0")
                .with_context(|| format!("move into {dir}"))?;
            writeln!(out, "ok")?;
        } else if let Some(spec) = op.strip_prefix("forkout:") {
            let (dir, child_op) = spec.split_once('=').context("forkout:DIR=OP")?;
            out.flush()?;
            forkout(dir, child_op)?;
        } else if let Some(spec) = op.strip_prefix("leaderout:") {
            let (dir, thread_op) = spec.split_once('=').context("leaderout:DIR=OP")?;
            out.flush()?;
            leaderout(dir, thread_op);
        } else if let Some(name) = op.strip_prefix("subcg:") {
            let sub = current_cgroup()?.join(name);
            std::fs::create_dir_all(&sub).with_context(|| format!("create {}", sub.display()))?;
            std::fs::write(sub.join("cgroup.procs"), "0")
                .with_context(|| format!("join {}", sub.display()))?;
            writeln!(out, "ok")?;
        } else if op == "session" {
            session::run(out)?;
        } else if op == "daemon" {
            let Some(path) = out_path else {
                bail!("daemon needs --out FILE");
            };
            let status = std::process::Command::new("setsid")
                .arg("-f")
                .arg(std::env::current_exe()?)
                .arg("--out")
                .arg(path)
                .args(&ops[i..])
                .status()
                .context("run setsid -f")?;
            if !status.success() {
                bail!("setsid -f failed: {status}");
            }
            return Ok(());
        } else if let Some(rest) = op.strip_prefix("repeat:") {
            let (n, inner) = rest.split_once(':').context("repeat:N:OP")?;
            let n: u64 = n.parse().context("repeat count")?;
            writeln!(out, "{}", counts((0..n).map(|_| one(inner))))?;
        } else if let Some(rest) = op.strip_prefix("time:") {
            let (n, inner) = rest.split_once(':').context("time:N:OP")?;
            let n: u32 = n.parse().context("time count")?;
            let start = std::time::Instant::now();
            let oks = (0..n).filter(|_| one(inner) == "ok").count();
            let ns = start.elapsed().as_nanos() / u128::from(n.max(1));
            writeln!(out, "ns={ns} ok={oks}")?;
        } else if let Some(rest) = op.strip_prefix("loop:") {
            writeln!(out, "{}", looped(rest)?)?;
        } else if let Some(rest) = op.strip_prefix("watch:") {
            let (us, inner) = rest.split_once(':').context("watch:US:OP")?;
            let us: u64 = us.parse().context("watch interval (microseconds)")?;
            watch(inner, Duration::from_micros(us), out)?;
        } else if let Some(rest) = op.strip_prefix("until:") {
            let (file, inner) = rest.split_once(':').context("until:FILE:OP")?;
            let stop = Path::new(file);
            let results = std::iter::from_fn(|| (!stop.exists()).then(|| one(inner)));
            writeln!(out, "{}", counts(results))?;
        } else {
            writeln!(out, "{}", one(op))?;
        }
    }
    Ok(())
}

/// `N:KIND:ADDR:PORT` (see the module docs): one socket, N calls, each timed together.
fn looped(spec: &str) -> anyhow::Result<String> {
    let mut parts = spec.splitn(3, ':');
    let n: u32 = parts.next().context("loop count")?.parse()?;
    let kind = parts.next().context("loop kind")?;
    let addr: SocketAddr = parts.next().context("loop address")?.parse()?;
    let s = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    let start = std::time::Instant::now();
    for _ in 0..n {
        let r = match kind {
            "connect" => s.connect(addr),
            "sendto" => s.send_to(b"c", addr).map(drop),
            other => bail!("loop kind {other}"),
        };
        if let Err(e) = r {
            *outcomes.entry(errno_name(&e)).or_default() += 1;
        }
    }
    let ns = start.elapsed().as_nanos() / u128::from(n.max(1));
    let failed: u32 = outcomes.values().sum();
    let mut line = format!("ns={ns} ok={}", n - failed);
    for (k, v) in outcomes {
        line.push_str(&format!(" {k}={v}"));
    }
    Ok(line)
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut out_path = None;
    loop {
        match args.first().map(String::as_str) {
            Some("--cgroup") if args.len() >= 2 => {
                let dir = args[1].clone();
                std::fs::write(format!("{dir}/cgroup.procs"), "0")
                    .with_context(|| format!("join cgroup {dir}"))?;
                args.drain(..2);
            }
            Some("--out") if args.len() >= 2 => {
                out_path = Some(args[1].clone());
                args.drain(..2);
            }
            _ => break,
        }
    }
    match out_path.as_deref() {
        // The daemonised grandchild: write to a temp file, then rename, so the reader never
        // sees a partial result.
        Some(path) if !args.iter().any(|a| a == "daemon") => {
            let tmp = format!("{path}.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            run(&args, &mut f, None)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        }
        other => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            run(&args, &mut lock, other)
        }
    }
}
