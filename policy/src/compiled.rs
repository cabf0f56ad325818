//! The compiled policy: a plain Rust value, produced from YAML by the policy compiler, one
//! [`CompiledPolicy`] per policy holding everything it says (connect, exec, unix, grants and
//! where each item was written), and written into the kernel maps by the agent's map layer
//! (`PolicyMaps::apply`) through [`expand`].

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use agent_common::{
    ACTION_ALLOW, ACTION_DENY, ANY_PORT, ANY_PROTO, Addr, ChainKey, GrantKey, MODE_AUDIT,
    MODE_ENFORCE, NONE, PolicyMeta, RuleKey, RuleValue, SKIP_ANY_ANY, SKIP_ANY_PROTO, SKIP_CHAIN,
    SKIP_PORT_ANY, SKIP_PORT_PROTO, UnixKey, ZoneKey, ZoneValue, maps::limits, zone_prefix_len,
};

use crate::{diag::Pos, identity::IdentityPattern};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Action {
    Allow,
    /// The default: fail closed.
    #[default]
    Deny,
}

impl Action {
    pub fn to_kernel(self) -> u8 {
        match self {
            Self::Allow => ACTION_ALLOW,
            Self::Deny => ACTION_DENY,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    pub fn to_kernel(self) -> u8 {
        match self {
            Self::Enforce => MODE_ENFORCE,
            Self::Audit => MODE_AUDIT,
        }
    }
}

/// A network prefix, IPv4 held as IPv4-mapped IPv6 (prefix + 96), host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: Ipv6Addr,
    bits: u8,
}

impl Net {
    /// `None` if `bits` is too long for the address family.
    pub fn new(addr: IpAddr, bits: u8) -> Option<Self> {
        let (v6, bits) = match addr {
            IpAddr::V4(a) if bits <= 32 => (a.to_ipv6_mapped(), bits + 96),
            IpAddr::V6(a) if bits <= 128 => (a, bits),
            _ => return None,
        };
        let mask = if bits == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(bits))
        };
        Some(Self {
            addr: Ipv6Addr::from(u128::from(v6) & mask),
            bits,
        })
    }

    /// Prefix length in the 128-bit (mapped) space.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let v6 = to_mapped(ip);
        let mask = if self.bits == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.bits))
        };
        u128::from(v6) & mask == u128::from(self.addr)
    }

    /// The address as the kernel stores it (network-order words).
    pub fn kernel_addr(&self) -> Addr {
        addr_words(self.addr)
    }
}

/// IPv4 and IPv4-mapped IPv6 in one space.
pub fn to_mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// An address as four network-order words, as in `bpf_sock_addr.user_ip6`.
pub fn addr_words(a: Ipv6Addr) -> Addr {
    let o = a.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Inverse of [`addr_words`].
pub fn addr_from_words(a: &Addr) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    pub nets: Vec<Net>,
}

/// One connect rule. Empty `ports`/`protocols` mean any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRule {
    /// Stable index within the policy, reported in events.
    pub index: u32,
    pub action: Action,
    /// Indices into [`CompiledPolicy::zones`].
    pub zones: Vec<u32>,
    pub ports: Vec<u16>,
    pub protocols: Vec<u8>,
}

/// After contacting any of `after`, connects to any of `deny` are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRule {
    pub after: Vec<u32>,
    pub deny: Vec<u32>,
}

/// Where a policy's compiled items were written, for `explain` and events. Empty for a
/// policy built in code rather than compiled from a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    pub file: String,
    pub policy: Pos,
    /// By connect rule index.
    pub connect: Vec<Pos>,
    /// By exec rule index.
    pub exec: Vec<Pos>,
    /// By compiled zone index.
    pub zones: Vec<Pos>,
    /// By chaining rule index.
    pub chaining: Vec<Pos>,
    /// By grant template index.
    pub grants: Vec<Pos>,
    /// By identity pattern index.
    pub identities: Vec<Pos>,
}

impl Sources {
    /// `file:line:col` of `pos`.
    pub fn at(&self, pos: Pos) -> String {
        format!("{}:{pos}", self.file)
    }
}

/// One policy, compiled: everything it says, in one value.
#[derive(Debug, Clone, Default)]
pub struct CompiledPolicy {
    pub name: String,
    pub identities: Vec<IdentityPattern>,
    pub mode: Mode,
    pub default_action: Action,
    pub zones: Vec<Zone>,
    pub connect: Vec<ConnectRule>,
    pub chaining: Vec<ChainRule>,
    pub exec: Vec<ExecRule>,
    pub grants: Vec<GrantTemplate>,
    /// The unix-socket destinations of its zones.
    pub unix: Vec<UnixDest>,
    /// The host names of its zones.
    pub hosts: Vec<HostZone>,
    /// `spec.dns.allowUnlisted`: a name in no zone is resolved (its addresses open nothing)
    /// instead of answered REFUSED.
    pub dns_allow_unlisted: bool,
    pub source: Sources,
}

/// A host pattern of a zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostZone {
    pub zone: u32,
    pub pattern: crate::hosts::HostPattern,
}

impl CompiledPolicy {
    /// The zone a DNS name (normalized, see [`crate::hosts::normalize`]) belongs to, and the
    /// pattern that put it there: the most specific matching pattern.
    pub fn zone_of_name(&self, name: &str) -> Option<&HostZone> {
        self.hosts
            .iter()
            .filter(|h| h.pattern.matches(name))
            .max_by_key(|h| h.pattern.specificity())
    }

    /// Whether any zone lists host names: the policy's principals' DNS goes through the
    /// agent's proxy.
    pub fn has_hosts(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// Whether an allow rule names protocol `icmp`: the policy's principals may open ping
    /// sockets (`POLICY_F_ICMP`), whose echoes are decided by destination.
    pub fn allows_ping(&self) -> bool {
        self.connect
            .iter()
            .any(|r| r.action == Action::Allow && r.protocols.contains(&agent_common::PROTO_ICMP))
    }

    /// Whether an allow rule names `vsock`: the policy's principals may create AF_VSOCK
    /// sockets (`POLICY_F_VSOCK`; the kernel cannot decide their destinations).
    pub fn allows_vsock(&self) -> bool {
        self.connect
            .iter()
            .any(|r| r.action == Action::Allow && r.protocols.contains(&agent_common::PROTO_VSOCK))
    }
}

/// Everything the node enforces at one revision.
#[derive(Debug, Clone, Default)]
pub struct CompiledSet {
    pub revision: u64,
    pub policies: Vec<CompiledPolicy>,
}

impl CompiledSet {
    /// No policies at `revision`: enrolled principals are denied everything.
    pub fn empty(revision: u64) -> Self {
        Self {
            revision,
            policies: Vec::new(),
        }
    }

    /// The policy that governs `identity` (see [`Self::policy_for`]).
    pub fn governing(&self, identity: &str) -> Option<&CompiledPolicy> {
        self.policy_for(identity)
            .and_then(|slot| self.policies.get(slot as usize))
    }

    /// Index of the policy that governs `identity`: the most specific matching pattern.
    pub fn policy_for(&self, identity: &str) -> Option<u32> {
        self.policies
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.identities.iter().map(move |pat| (i, pat)))
            .filter(|(_, pat)| pat.matches(identity))
            .max_by_key(|(_, pat)| pat.specificity())
            .and_then(|(i, _)| u32::try_from(i).ok())
    }
}

/// Whether a grant needs a person's approval before it is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// A person approves each request.
    Required,
    /// Issued at once, still audited.
    Auto,
}

/// One exec rule. Paths are plain data for the exec side: exact paths, and directory prefixes
/// (each ending in `/`, written `/dir/**` in the policy) that match everything below them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRule {
    /// Stable index within the policy's exec list, reported in events.
    pub index: u32,
    pub action: Action,
    pub exact: Vec<String>,
    pub prefixes: Vec<String>,
}

impl ExecRule {
    pub fn matches(&self, path: &str) -> bool {
        self.exact.iter().any(|p| p == path) || self.prefixes.iter().any(|p| path.starts_with(p))
    }
}

/// A grant that may be requested at run time; issuing it installs [`grant_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTemplate {
    pub name: String,
    /// Indices into [`CompiledPolicy::zones`].
    pub zones: Vec<u32>,
    /// Empty: any.
    pub ports: Vec<u16>,
    /// Empty: any.
    pub protocols: Vec<u8>,
    pub max_ttl: Duration,
    pub approval: Approval,
}

impl GrantTemplate {
    /// Whether issuing this grant would allow a connect to `zone` (an index into the policy's
    /// zones), `port` and `proto`: the zone is one of its zones, and its ports and protocols
    /// are empty (any) or contain the call's.
    pub fn covers(&self, zone: u32, port: u16, proto: u8) -> bool {
        self.zones.contains(&zone)
            && (self.ports.is_empty() || self.ports.contains(&port))
            && (self.protocols.is_empty() || self.protocols.contains(&proto))
    }
}

/// The first of `templates` (policy order) that would allow a connect to `zone`, `port`,
/// `proto`: what a denied event names as `grant_available`.
pub fn grant_available(
    templates: &[GrantTemplate],
    zone: u32,
    port: u16,
    proto: u8,
) -> Option<&GrantTemplate> {
    templates.iter().find(|t| t.covers(zone, port, proto))
}

/// A unix-socket destination of a zone (abstract names start with `@`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixDest {
    /// Index into [`CompiledPolicy::zones`].
    pub zone: u32,
    pub path: String,
}

impl UnixDest {
    /// The `UNIX_ZONES` key of this destination under policy key `policy` (`None` if the name
    /// does not fit `sun_path`; validation rejects such names).
    pub fn kernel_key(&self, policy: u32) -> Option<UnixKey> {
        UnixKey::new(policy, &unix_name_bytes(&self.path))
    }
}

/// The bytes of a unix-socket name in `sun_path`: a path as is, `@name` as a NUL byte then
/// `name` (the abstract namespace).
pub fn unix_name_bytes(name: &str) -> Vec<u8> {
    match name.strip_prefix('@') {
        Some(abs) => std::iter::once(0).chain(abs.bytes()).collect(),
        None => name.as_bytes().to_vec(),
    }
}

/// Inverse of [`unix_name_bytes`], for events: the first `len` bytes of `sun_path`, an
/// abstract name shown as `@name` (any byte that is not UTF-8 replaced).
pub fn unix_name_from_bytes(path: &[u8]) -> String {
    match path.split_first() {
        Some((0, abs)) => format!("@{}", String::from_utf8_lossy(abs)),
        _ => String::from_utf8_lossy(path).into_owned(),
    }
}

/// The kernel map entries of one policy slot: the single expansion used both to fill the
/// kernel maps and by the userspace model of the kernel lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPolicy {
    pub meta: PolicyMeta,
    /// LPM entries: (prefix length of the whole key, key, value).
    pub zones: Vec<(u32, ZoneKey, ZoneValue)>,
    pub rules: HashMap<RuleKey, RuleValue>,
    pub chain: HashMap<ChainKey, u64>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExpandError {
    #[error(
        "policy {policy}: zone index {zone} cannot take part in chaining (at most {max} zones)"
    )]
    ChainZone { policy: String, zone: u32, max: u32 },
    #[error("policy {policy}: too many zones")]
    ZoneCount { policy: String },
}

fn any_or<T: Copy>(v: &[T], any: T) -> Vec<T> {
    if v.is_empty() { vec![any] } else { v.to_vec() }
}

/// Expands `policy` into the entries of policy slot `key` (generation-qualified), at `revision`.
/// Rules become one entry per (zone, port, protocol), holding the lowest allow and the lowest
/// deny rule index; chaining becomes, per denied zone, the bitmask of zones that trigger it.
pub fn expand(
    key: u32,
    policy: &CompiledPolicy,
    revision: u64,
) -> Result<KernelPolicy, ExpandError> {
    let mut zones = Vec::new();
    for (zi, zone) in policy.zones.iter().enumerate() {
        let z = u32::try_from(zi)
            .ok()
            .filter(|z| *z != NONE)
            .ok_or_else(|| ExpandError::ZoneCount {
                policy: policy.name.clone(),
            })?;
        for net in &zone.nets {
            zones.push((
                zone_prefix_len(u32::from(net.bits())),
                ZoneKey {
                    policy: key,
                    addr: net.kernel_addr(),
                },
                ZoneValue { zone: z },
            ));
        }
    }
    let mut rules: HashMap<RuleKey, RuleValue> = HashMap::new();
    for r in &policy.connect {
        let ports = any_or(&r.ports, ANY_PORT);
        let protos = any_or(&r.protocols, ANY_PROTO);
        for &zone in &r.zones {
            for &port in &ports {
                for &proto in &protos {
                    let e = rules
                        .entry(RuleKey {
                            policy: key,
                            zone,
                            port,
                            proto,
                            _pad: 0,
                        })
                        .or_insert(RuleValue {
                            allow_rule: NONE,
                            deny_rule: NONE,
                        });
                    let slot = match r.action {
                        Action::Allow => &mut e.allow_rule,
                        Action::Deny => &mut e.deny_rule,
                    };
                    *slot = (*slot).min(r.index);
                }
            }
        }
    }
    let mut chain: HashMap<ChainKey, u64> = HashMap::new();
    for c in &policy.chaining {
        let mut after = 0u64;
        for &z in &c.after {
            if z >= limits::CHAIN_ZONES {
                return Err(ExpandError::ChainZone {
                    policy: policy.name.clone(),
                    zone: z,
                    max: limits::CHAIN_ZONES,
                });
            }
            after |= 1u64 << z;
        }
        for &zone in &c.deny {
            *chain.entry(ChainKey { policy: key, zone }).or_default() |= after;
        }
    }
    let shapes = rules.keys().fold(0u8, |acc, k| {
        acc | agent_common::rule_shape(k.port, k.proto)
    });
    let mut skip = (SKIP_PORT_PROTO | SKIP_PORT_ANY | SKIP_ANY_PROTO | SKIP_ANY_ANY) & !shapes;
    if chain.is_empty() {
        skip |= SKIP_CHAIN;
    }
    Ok(KernelPolicy {
        meta: PolicyMeta {
            revision,
            default_action: policy.default_action.to_kernel(),
            mode: policy.mode.to_kernel(),
            flags: 0,
            skip,
            _pad: [0; 4],
        },
        zones,
        rules,
        chain,
    })
}

/// The `GRANTS` keys that issuing `grant` to `principal` installs (each with the same expiry).
pub fn grant_keys(principal: u32, grant: &GrantTemplate) -> Vec<GrantKey> {
    let ports = any_or(&grant.ports, ANY_PORT);
    let protos = any_or(&grant.protocols, ANY_PROTO);
    let mut keys = Vec::with_capacity(grant.zones.len() * ports.len() * protos.len());
    for &zone in &grant.zones {
        for &port in &ports {
            for &proto in &protos {
                keys.push(GrantKey {
                    principal,
                    zone,
                    port,
                    proto,
                    _pad: 0,
                });
            }
        }
    }
    keys
}

#[cfg(test)]
#[path = "compiled_tests.rs"]
mod tests;
