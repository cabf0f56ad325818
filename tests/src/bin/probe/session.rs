//! `session`: commands read from stdin, one output line each, so a test can hold sockets open
//! across a change it makes (a revocation, a policy swap) and use them afterwards.
//!
//! - `open NAME tcp|udp ADDR:PORT`: connect a socket, kept as NAME;
//! - `send NAME`: write one byte on it;
//! - `recv NAME`: read with a 300 ms timeout (`ok` if a byte came, `EAGAIN` if none did);
//! - `op OP`: any single probe operation;
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
        ["exit"] => return None,
        _ => format!("bad command: {line}"),
    })
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
