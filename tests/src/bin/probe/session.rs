//! `session`: commands read from stdin, one output line each, so a test can hold sockets open
//! across a change it makes (a revocation, a policy swap) and use them afterwards.
//!
//! - `open NAME tcp|udp ADDR:PORT`: connect a socket, kept as NAME;
//! - `send NAME`: write one byte on it;
//! - `recv NAME`: read with a 300 ms timeout (`ok` if a byte came, `EAGAIN` if none did);
//! - `op OP`: any single probe operation;
//! - `udp NAME`: an unconnected UDP socket (IPv4), kept as NAME;
//! - `calls NAME connect|sendto ADDR:PORT N`: N `connect()`s, or N one-byte `sendto()`s, on
//!   socket NAME, answered as `ok=K` followed by ` ERRNO=M` for each failure kind (the same
//!   socket each time: the kernel's repeat cache is per socket);
//! - `close NAME`: close socket NAME;
//! - `fd NAME`: the file descriptor number of UDP socket NAME;
//! - `steal NAME PID FD`: a duplicate of process PID's file descriptor FD (a UDP socket), taken
//!   with `pidfd_getfd` and kept as NAME (another process using a socket it did not open);
//! - `movecg DIR`: move this process into the cgroup DIR (e.g. the cgroup v2 root);
//! - `exit`: end the session (so does the end of stdin).

use std::{
    collections::HashMap,
    io::{BufRead as _, Read as _, Write as _},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

enum Held {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

fn outcome(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "EAGAIN".into(),
        Err(e) => super::errno_name(&e),
    }
}

fn open(kind: &str, addr: &str) -> std::io::Result<Held> {
    let addr = super::parse_addr(addr)?;
    match kind {
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(Held::Tcp),
        "udp" => {
            let any = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let s = UdpSocket::bind(any)?;
            s.connect(addr)?;
            Ok(Held::Udp(s))
        }
        _ => Err(std::io::Error::other(format!("unknown socket kind {kind}"))),
    }
}

fn send(h: &Held) -> std::io::Result<()> {
    match h {
        Held::Tcp(s) => (&*s).write_all(b"x"),
        Held::Udp(s) => s.send(b"x").map(drop),
    }
}

fn recv(h: &Held) -> std::io::Result<()> {
    let mut b = [0u8; 64];
    let timeout = Some(Duration::from_millis(300));
    let n = match h {
        Held::Tcp(s) => {
            s.set_read_timeout(timeout)?;
            (&*s).read(&mut b)?
        }
        Held::Udp(s) => {
            s.set_read_timeout(timeout)?;
            s.recv(&mut b)?
        }
    };
    if n == 0 {
        return Err(std::io::Error::other("EOF"));
    }
    Ok(())
}

fn command(line: &str, held: &mut HashMap<String, Held>) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let missing = || Some(format!("no socket in: {line}"));
    Some(match words.as_slice() {
        ["open", name, kind, addr] => match open(kind, addr) {
            Ok(h) => {
                held.insert((*name).to_owned(), h);
                "ok".into()
            }
            Err(e) => outcome(Err(e)),
        },
        ["send", name] => match held.get(*name) {
            Some(h) => outcome(send(h)),
            None => return missing(),
        },
        ["recv", name] => match held.get(*name) {
            Some(h) => outcome(recv(h)),
            None => return missing(),
        },
        ["op", op] => super::one(op),
        ["udp", name] => match UdpSocket::bind("0.0.0.0:0") {
            Ok(s) => {
                held.insert((*name).to_owned(), Held::Udp(s));
                "ok".into()
            }
            Err(e) => outcome(Err(e)),
        },
        ["calls", name, kind, addr, n] => {
            match (held.get(*name), super::parse_addr(addr), n.parse()) {
                (Some(Held::Udp(s)), Ok(addr), Ok(n)) => calls(s, kind, addr, n),
                (Some(_), ..) => format!("bad command: {line}"),
                (None, ..) => return missing(),
            }
        }
        ["fd", name] => match held.get(*name) {
            Some(Held::Udp(s)) => {
                use std::os::fd::AsRawFd as _;
                s.as_raw_fd().to_string()
            }
            _ => return missing(),
        },
        ["steal", name, pid, fd] => match (pid.parse(), fd.parse()) {
            (Ok(pid), Ok(fd)) => match steal(pid, fd) {
                Ok(s) => {
                    held.insert((*name).to_owned(), Held::Udp(s));
                    "ok".into()
                }
                Err(e) => outcome(Err(e)),
            },
            _ => format!("bad command: {line}"),
        },
        ["movecg", dir] => outcome(std::fs::write(
            std::path::Path::new(dir).join("cgroup.procs"),
            "0",
        )),
        ["close", name] => match held.remove(*name) {
            Some(_) => "ok".into(),
            None => return missing(),
        },
        ["exit"] => return None,
        _ => format!("bad command: {line}"),
    })
}

/// A duplicate of process `pid`'s descriptor `fd`, as a UDP socket.
fn steal(pid: i32, fd: i32) -> std::io::Result<UdpSocket> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: pidfd_open with a pid and no flags; a non-negative result is a new fd we own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just returned by the kernel, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd as _;
    // SAFETY: pidfd_getfd with an open pidfd, a descriptor number and no flags.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just made for us; the caller says it is a UDP socket.
    Ok(unsafe { UdpSocket::from_raw_fd(got as i32) })
}

/// `n` calls of `kind` to `addr` on `s`: `ok=K` and a count per failure kind.
fn calls(s: &UdpSocket, kind: &str, addr: std::net::SocketAddr, n: u32) -> String {
    let mut failed: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = match kind {
            "connect" => s.connect(addr),
            "sendto" => s.send_to(b"c", addr).map(drop),
            other => return format!("bad call kind {other}"),
        };
        if let Err(e) = r {
            *failed.entry(super::errno_name(&e)).or_default() += 1;
        }
    }
    let mut line = format!("ok={}", n - failed.values().sum::<u32>());
    for (k, v) in failed {
        line.push_str(&format!(" {k}={v}"));
    }
    line
}

/// Runs commands from stdin until `exit` or the end of stdin.
pub fn run(out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let mut held = HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let Some(reply) = command(&line, &mut held) else {
            break;
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}
