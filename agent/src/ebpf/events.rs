//! Reading decisions from the ring buffer and decoding them into typed values.

use std::net::IpAddr;

use agent_common::{
    ConnectEvent, EventHeader, KIND_CONNECT, REASON_CHAINING, REASON_DEFAULT, REASON_GRANT,
    REASON_NO_POLICY, REASON_RULE, VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_DENY,
};
use aya::maps::{MapData, RingBuf};

use super::maps::{MapError, PolicyMaps};
use crate::compiled::addr_from_words;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    AuditDeny,
}

impl TryFrom<u8> for Verdict {
    type Error = DecodeError;
    fn try_from(v: u8) -> Result<Self, DecodeError> {
        match v {
            VERDICT_ALLOW => Ok(Self::Allow),
            VERDICT_DENY => Ok(Self::Deny),
            VERDICT_AUDIT_DENY => Ok(Self::AuditDeny),
            other => Err(DecodeError::Field {
                field: "verdict",
                value: other.into(),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rule,
    Default,
    Chaining,
    Grant,
    NoPolicy,
}

impl TryFrom<u8> for Reason {
    type Error = DecodeError;
    fn try_from(v: u8) -> Result<Self, DecodeError> {
        match v {
            REASON_RULE => Ok(Self::Rule),
            REASON_DEFAULT => Ok(Self::Default),
            REASON_CHAINING => Ok(Self::Chaining),
            REASON_GRANT => Ok(Self::Grant),
            REASON_NO_POLICY => Ok(Self::NoPolicy),
            other => Err(DecodeError::Field {
                field: "reason",
                value: other.into(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {len} bytes is too short")]
    Short { len: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("bad {field} value {value}")]
    Field { field: &'static str, value: u64 },
}

/// A decoded connect/sendmsg decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectDecision {
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
    pub zone: Option<u32>,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub hook: u8,
    pub grant_id: u64,
    pub suppressed: u32,
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

impl KernelEvent {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let h: EventHeader = read(bytes)?;
        match h.kind {
            KIND_CONNECT => {
                let e: ConnectEvent = read(bytes)?;
                let v6 = addr_from_words(&e.addr);
                let addr = match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                };
                Ok(Self::Connect(ConnectDecision {
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
                    zone: opt(e.zone),
                    addr,
                    port: e.port,
                    proto: e.proto,
                    hook: e.hook,
                    grant_id: e.grant_id,
                    suppressed: h.suppressed,
                }))
            }
            k => Err(DecodeError::Kind(k)),
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Self::Connect(c) => c.seq,
        }
    }
}

/// The ring buffer reader. Wrap its fd in `tokio::io::unix::AsyncFd` to wait for data.
pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Events that could not be decoded (a version skew between kernel and agent).
    pub undecodable: u64,
}

impl EventReader {
    pub fn take(maps: &mut PolicyMaps) -> Result<Self, MapError> {
        let name = agent_common::maps::EVENTS;
        let map = maps.events.take().ok_or(MapError::Missing { name })?;
        let ring = RingBuf::try_from(map).map_err(|source| MapError::Type { name, source })?;
        Ok(Self {
            ring,
            undecodable: 0,
        })
    }

    /// Drains what is in the ring now.
    pub fn drain(&mut self, out: &mut Vec<KernelEvent>) {
        while let Some(item) = self.ring.next() {
            match KernelEvent::decode(&item) {
                Ok(e) => out.push(e),
                Err(_) => self.undecodable += 1,
            }
        }
    }

    pub fn ring(&self) -> &RingBuf<MapData> {
        &self.ring
    }
}
