//! Reading decisions from the ring buffer and decoding them into typed values.

use std::net::{IpAddr, Ipv6Addr};

use agent_common::{
    ConnectEvent, EXEC_F_NO_IDENTITY, EventHeader, ExecEvent, KIND_CONNECT, KIND_EXEC, KIND_SOCKET,
    KIND_UNIX, SocketEvent, UnixEvent, UnknownValue,
};
use aya::maps::{MapData, RingBuf};

use super::{map_access::MapError, maps::PolicyMaps};
use corral_policy::compiled::{addr_from_words, unix_name_from_bytes};

pub use agent_common::{Reason, Verdict};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {len} bytes is too short")]
    Short { len: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error(transparent)]
    Field(#[from] UnknownValue),
}

/// What every decision carries: the decoded [`EventHeader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionHeader {
    pub seq: u64,
    pub time_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub principal: u32,
    pub verdict: Verdict,
    pub reason: Reason,
    /// Generation-qualified policy key, or `None`.
    pub policy: Option<u32>,
    pub rule: Option<u32>,
    /// Allow events of this principal suppressed by rate limiting since its previous event.
    pub suppressed: u32,
}

impl TryFrom<&EventHeader> for DecisionHeader {
    type Error = DecodeError;
    fn try_from(h: &EventHeader) -> Result<Self, DecodeError> {
        Ok(Self {
            seq: h.seq,
            time_ns: h.time_ns,
            cgroup_id: h.cgroup_id,
            pid: h.pid,
            tid: h.tid,
            uid: h.uid,
            principal: h.principal,
            verdict: h.verdict.try_into()?,
            reason: h.reason.try_into()?,
            policy: opt(h.policy),
            rule: opt(h.rule),
            suppressed: h.suppressed,
        })
    }
}

/// A decoded connect/sendmsg decision, on an IP or (hooks `connect_unix`/`sendmsg_unix`) a
/// unix-socket destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectDecision {
    pub header: DecisionHeader,
    pub zone: Option<u32>,
    /// The IP destination; `::` for a unix-socket destination.
    pub addr: IpAddr,
    /// 0 for a unix-socket destination.
    pub port: u16,
    /// 0 (any) for a unix-socket destination.
    pub proto: u8,
    pub hook: u8,
    pub grant_id: u64,
    /// The unix-socket destination (`@name` for an abstract one), or `None` for an IP one.
    pub unix_path: Option<String>,
    /// Identical allowed calls on the same socket before this one, reported with it: the
    /// event stands for `1 + repeats` calls.
    pub repeats: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Connect(ConnectDecision),
}

fn opt(v: u32) -> Option<u32> {
    (v != agent_common::NONE).then_some(v)
}

fn read<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    agent_common::read_unaligned(bytes).ok_or(DecodeError::Short { len: bytes.len() })
}

/// The destination part of a connect decision, IP or unix socket.
struct Dest {
    zone: u32,
    addr: IpAddr,
    port: u16,
    proto: u8,
    hook: u8,
    grant_id: u64,
    unix_path: Option<String>,
    repeats: u32,
}

fn connect_decision(h: &EventHeader, d: Dest) -> Result<ConnectDecision, DecodeError> {
    Ok(ConnectDecision {
        header: h.try_into()?,
        zone: opt(d.zone),
        addr: d.addr,
        port: d.port,
        proto: d.proto,
        hook: d.hook,
        grant_id: d.grant_id,
        unix_path: d.unix_path,
        repeats: d.repeats,
    })
}

impl KernelEvent {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let h: EventHeader = read(bytes)?;
        let dest = match h.kind {
            KIND_CONNECT => {
                let e: ConnectEvent = read(bytes)?;
                let v6 = addr_from_words(&e.addr);
                let addr = match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                };
                Dest {
                    zone: e.zone,
                    addr,
                    port: e.port,
                    proto: e.proto,
                    hook: e.hook,
                    grant_id: e.grant_id,
                    unix_path: None,
                    repeats: e.repeats,
                }
            }
            KIND_UNIX => {
                let e: UnixEvent = read(bytes)?;
                let len = usize::from(e.path_len).min(e.path.len());
                Dest {
                    zone: e.zone,
                    addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    port: 0,
                    proto: 0,
                    hook: e.hook,
                    grant_id: e.grant_id,
                    unix_path: Some(unix_name_from_bytes(&e.path[..len])),
                    repeats: 0,
                }
            }
            k => return Err(DecodeError::Kind(k)),
        };
        Ok(Self::Connect(connect_decision(&h, dest)?))
    }

    pub fn seq(&self) -> u64 {
        match self {
            Self::Connect(c) => c.header.seq,
        }
    }
}

/// A decoded exec decision (see `agent_common::exec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecDecision {
    pub header: DecisionHeader,
    /// Exec id of the new image; 0 when the exec never happened (LSM deny).
    pub exec_id: u64,
    /// Exec id of the image that exec'd or forked this process; 0 if unknown.
    pub parent_exec_id: u64,
    /// Identity of the file that decided (kernel dev encoding; for a `#!` script the script
    /// unless `EXEC_F_BY_INTERPRETER`), `None` if it could not be read.
    pub file: Option<(u32, u64)>,
    /// The path as passed to execve (best effort, at most `EXEC_PATH_BYTES - 1` bytes).
    pub path: String,
    pub argv: Vec<String>,
    /// `EXEC_HOOK_*`: which program decided.
    pub hook: u8,
    /// `EXEC_F_*` bits (truncation, missing argv or identity).
    pub flags: u8,
}

impl ExecDecision {
    fn decode(h: &EventHeader, bytes: &[u8]) -> Result<Self, DecodeError> {
        let e: ExecEvent = read(bytes)?;
        let path_len = usize::from(e.path_len).min(e.path.len());
        let argv_len = usize::from(e.argv_len).min(e.argv.len());
        let mut argv: Vec<String> = e.argv[..argv_len]
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // Every captured argument ends with a NUL: drop the empty tail after the last one.
        if argv.last().is_some_and(String::is_empty) {
            argv.pop();
        }
        Ok(Self {
            header: h.try_into()?,
            exec_id: e.exec_id,
            parent_exec_id: e.parent_exec_id,
            file: (e.flags & EXEC_F_NO_IDENTITY == 0).then_some((e.dev, e.ino)),
            path: String::from_utf8_lossy(&e.path[..path_len]).into_owned(),
            argv,
            hook: e.hook,
            flags: e.flags,
        })
    }
}

/// A containment guard's decision on a socket (see `agent_common::SocketEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketDecision {
    pub header: DecisionHeader,
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u16,
    /// `HOOK_SOCK_CREATE` or `HOOK_SETSOCKOPT`.
    pub hook: u8,
    /// `setsockopt()` level and option name (0 for `socket()`).
    pub level: u32,
    pub optname: u32,
}

impl SocketDecision {
    fn decode(h: &EventHeader, bytes: &[u8]) -> Result<Self, DecodeError> {
        let e: SocketEvent = read(bytes)?;
        Ok(Self {
            header: h.try_into()?,
            family: e.family,
            sock_type: e.sock_type,
            protocol: e.protocol,
            hook: e.hook,
            level: e.level,
            optname: e.optname,
        })
    }
}

/// Every kind of kernel event. ([`KernelEvent`] predates exec events and carries connect
/// decisions only; fold the two when its users are updated.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connect(ConnectDecision),
    Exec(ExecDecision),
    Socket(SocketDecision),
}

impl Event {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let h: EventHeader = read(bytes)?;
        match h.kind {
            KIND_EXEC => Ok(Self::Exec(ExecDecision::decode(&h, bytes)?)),
            KIND_SOCKET => Ok(Self::Socket(SocketDecision::decode(&h, bytes)?)),
            _ => match KernelEvent::decode(bytes)? {
                KernelEvent::Connect(c) => Ok(Self::Connect(c)),
            },
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Self::Connect(c) => c.header.seq,
            Self::Exec(e) => e.header.seq,
            Self::Socket(s) => s.header.seq,
        }
    }
}

/// The ring buffer reader. Wrap its fd in `tokio::io::unix::AsyncFd` to wait for data.
pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Events that could not be decoded (a version skew between kernel and agent).
    pub undecodable: u64,
    /// Exec and socket events consumed by [`Self::drain`], which returns connect decisions
    /// only.
    pub exec_skipped: u64,
}

impl EventReader {
    pub fn take(maps: &mut PolicyMaps) -> Result<Self, MapError> {
        let name = agent_common::maps::EVENTS;
        let map = maps.events.take().ok_or(MapError::Missing { name })?;
        let ring = RingBuf::try_from(map).map_err(|source| MapError::Type { name, source })?;
        Ok(Self {
            ring,
            undecodable: 0,
            exec_skipped: 0,
        })
    }

    /// Drains what is in the ring now: connect decisions (exec events are counted in
    /// `exec_skipped`; [`Self::drain_all`] returns them).
    pub fn drain(&mut self, out: &mut Vec<KernelEvent>) {
        while let Some(item) = self.ring.next() {
            match KernelEvent::decode(&item) {
                Ok(e) => out.push(e),
                Err(DecodeError::Kind(KIND_EXEC | KIND_SOCKET)) => self.exec_skipped += 1,
                Err(_) => self.undecodable += 1,
            }
        }
    }

    /// Drains what is in the ring now, every kind.
    pub fn drain_all(&mut self, out: &mut Vec<Event>) {
        while let Some(item) = self.ring.next() {
            match Event::decode(&item) {
                Ok(e) => out.push(e),
                Err(_) => self.undecodable += 1,
            }
        }
    }

    /// Reads at most `max` events (every kind) into `out`: bounded batches, so a consumer can
    /// publish while the ring is still filling.
    pub fn drain_some(&mut self, out: &mut Vec<Event>, max: usize) {
        for _ in 0..max {
            let Some(item) = self.ring.next() else { break };
            match Event::decode(&item) {
                Ok(e) => out.push(e),
                Err(_) => self.undecodable += 1,
            }
        }
    }

    /// Drains the ring and returns its connect decisions (other kinds are counted in
    /// `exec_skipped` as by [`Self::drain`]).
    pub fn drain_connects(&mut self) -> Vec<ConnectDecision> {
        let mut v = Vec::new();
        self.drain(&mut v);
        v.into_iter()
            .map(|e| match e {
                KernelEvent::Connect(c) => c,
            })
            .collect()
    }

    pub fn ring(&self) -> &RingBuf<MapData> {
        &self.ring
    }
}
