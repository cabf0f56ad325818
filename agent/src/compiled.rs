//! The compiled policy: a plain Rust value, produced from YAML by the policy compiler and
//! written into the kernel maps by [`crate::ebpf::maps::PolicyMaps::apply`].

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use agent_common::{
    ACTION_ALLOW, ACTION_DENY, ANY_PORT, ANY_PROTO, Addr, ChainKey, GrantKey, MODE_AUDIT,
    MODE_ENFORCE, NONE, PolicyMeta, RuleKey, RuleValue, UnixKey, ZoneKey, ZoneValue, maps::limits,
    zone_prefix_len,
};

use crate::identity::IdentityPattern;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
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

#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: String,
    pub identities: Vec<IdentityPattern>,
    pub mode: Mode,
    pub default_action: Action,
    pub zones: Vec<Zone>,
    pub connect: Vec<ConnectRule>,
    pub chaining: Vec<ChainRule>,
}

/// Everything the node enforces at one revision.
#[derive(Debug, Clone, Default)]
pub struct CompiledSet {
    pub revision: u64,
    pub policies: Vec<CompiledPolicy>,
}

impl CompiledSet {
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
        let bytes = unix_name_bytes(&self.path);
        let mut key = UnixKey {
            policy,
            ..UnixKey::default()
        };
        if bytes.len() > key.path.len() {
            return None;
        }
        key.path[..bytes.len()].copy_from_slice(&bytes);
        Some(key)
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

/// The parts of a policy the connect maps do not carry, kept beside [`CompiledSet::policies`]
/// (same order) so the connect form stays as the map layer knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyAddenda {
    pub exec: Vec<ExecRule>,
    pub grants: Vec<GrantTemplate>,
    pub unix: Vec<UnixDest>,
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
    Ok(KernelPolicy {
        meta: PolicyMeta {
            revision,
            default_action: policy.default_action.to_kernel(),
            mode: policy.mode.to_kernel(),
            flags: 0,
            _pad: [0; 5],
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
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn v4_nets_live_in_mapped_space() {
        let n = Net::new(IpAddr::V4(Ipv4Addr::new(10, 20, 99, 1)), 16).expect("valid");
        assert_eq!(n.bits(), 112);
        assert!(n.contains(IpAddr::V4(Ipv4Addr::new(10, 20, 0, 7))));
        assert!(n.contains(IpAddr::V6(Ipv4Addr::new(10, 20, 3, 3).to_ipv6_mapped())));
        assert!(!n.contains(IpAddr::V4(Ipv4Addr::new(10, 21, 0, 7))));
        assert!(Net::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 33).is_none());
    }

    fn policy(chaining: Vec<ChainRule>) -> CompiledPolicy {
        CompiledPolicy {
            name: "p".into(),
            identities: vec![],
            mode: Mode::Audit,
            default_action: Action::Allow,
            zones: vec![Zone {
                name: "z".into(),
                nets: vec![Net::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8).expect("net")],
            }],
            connect: vec![
                ConnectRule {
                    index: 0,
                    action: Action::Allow,
                    zones: vec![0],
                    ports: vec![443],
                    protocols: vec![],
                },
                ConnectRule {
                    index: 1,
                    action: Action::Deny,
                    zones: vec![0],
                    ports: vec![443, 80],
                    protocols: vec![agent_common::PROTO_TCP],
                },
                ConnectRule {
                    index: 2,
                    action: Action::Allow,
                    zones: vec![0],
                    ports: vec![443],
                    protocols: vec![],
                },
            ],
            chaining,
        }
    }

    #[test]
    fn expand_keeps_lowest_index_per_action_and_key() {
        let kp = expand(5, &policy(vec![]), 9).expect("expands");
        assert_eq!(
            (kp.meta.revision, kp.meta.mode, kp.meta.default_action),
            (9, MODE_AUDIT, ACTION_ALLOW)
        );
        assert_eq!(kp.zones.len(), 1);
        assert_eq!(kp.zones[0].0, zone_prefix_len(96 + 8));
        let key = |port, proto| RuleKey {
            policy: 5,
            zone: 0,
            port,
            proto,
            _pad: 0,
        };
        assert_eq!(kp.rules.len(), 3);
        assert_eq!(
            kp.rules[&key(443, ANY_PROTO)],
            RuleValue {
                allow_rule: 0,
                deny_rule: NONE
            }
        );
        assert_eq!(
            kp.rules[&key(443, agent_common::PROTO_TCP)],
            RuleValue {
                allow_rule: NONE,
                deny_rule: 1
            }
        );
        assert!(kp.chain.is_empty());
    }

    #[test]
    fn expand_chaining_bitmask_and_limit() {
        let kp = expand(
            1,
            &policy(vec![ChainRule {
                after: vec![0, 3],
                deny: vec![0],
            }]),
            1,
        )
        .expect("expands");
        assert_eq!(kp.chain[&ChainKey { policy: 1, zone: 0 }], 0b1001);
        let err = expand(
            1,
            &policy(vec![ChainRule {
                after: vec![64],
                deny: vec![0],
            }]),
            1,
        );
        assert!(matches!(
            err,
            Err(ExpandError::ChainZone {
                zone: 64,
                max: 64,
                ..
            })
        ));
    }

    #[test]
    fn grant_keys_cover_every_combination() {
        let g = GrantTemplate {
            name: "g".into(),
            zones: vec![1, 2],
            ports: vec![],
            protocols: vec![agent_common::PROTO_TCP, agent_common::PROTO_UDP],
            max_ttl: Duration::from_secs(60),
            approval: Approval::Auto,
        };
        let keys = grant_keys(7, &g);
        assert_eq!(keys.len(), 4);
        assert!(keys.iter().all(|k| k.principal == 7 && k.port == ANY_PORT));
        assert!(keys.contains(&GrantKey {
            principal: 7,
            zone: 2,
            port: 0,
            proto: agent_common::PROTO_UDP,
            _pad: 0
        }));
    }

    #[test]
    fn grant_available_is_the_first_covering_template() {
        let t = |name: &str, zones: Vec<u32>, ports: Vec<u16>, protocols: Vec<u8>| GrantTemplate {
            name: name.into(),
            zones,
            ports,
            protocols,
            max_ttl: Duration::from_secs(60),
            approval: Approval::Required,
        };
        let tcp = agent_common::PROTO_TCP;
        let udp = agent_common::PROTO_UDP;
        let ts = vec![
            t("db-tcp", vec![1], vec![5432], vec![tcp]),
            t("db-any-port", vec![1, 2], vec![], vec![]),
            t("dns", vec![3], vec![53], vec![]),
        ];
        let name =
            |zone, port, proto| grant_available(&ts, zone, port, proto).map(|g| g.name.as_str());
        assert_eq!(name(1, 5432, tcp), Some("db-tcp"));
        // Port and protocol must match where the template names them.
        assert_eq!(name(1, 5432, udp), Some("db-any-port"));
        assert_eq!(name(1, 80, tcp), Some("db-any-port"));
        assert_eq!(name(2, 1, udp), Some("db-any-port"));
        assert_eq!(name(3, 53, udp), Some("dns"));
        assert_eq!(name(3, 54, udp), None);
        // A zone no template names.
        assert_eq!(name(0, 5432, tcp), None);
        assert_eq!(grant_available(&[], 1, 5432, tcp), None);
    }

    #[test]
    fn exec_rule_matching() {
        let r = ExecRule {
            index: 0,
            action: Action::Deny,
            exact: vec!["/usr/bin/curl".into()],
            prefixes: vec!["/opt/agent/".into()],
        };
        assert!(r.matches("/usr/bin/curl"));
        assert!(!r.matches("/usr/bin/curl2"));
        assert!(r.matches("/opt/agent/bin/x"));
        assert!(!r.matches("/opt/agent"));
        assert!(!r.matches("/opt/agentx/y"));
    }

    #[test]
    fn unix_keys_encode_paths_and_abstract_names() {
        let d = |path: &str| UnixDest {
            zone: 3,
            path: path.into(),
        };
        let k = d("/run/docker.sock").kernel_key(9).expect("fits");
        assert_eq!(k.policy, 9);
        assert_eq!(&k.path[..17], b"/run/docker.sock\0");
        assert!(k.path[16..].iter().all(|&b| b == 0));
        let k = d("@corral-test").kernel_key(1).expect("fits");
        assert_eq!(&k.path[..12], b"\0corral-test");
        assert!(k.path[12..].iter().all(|&b| b == 0));
        assert_eq!(unix_name_from_bytes(&k.path[..12]), "@corral-test");
        assert_eq!(unix_name_from_bytes(b"/a/b"), "/a/b");
        assert!(d(&format!("/{}", "x".repeat(108))).kernel_key(0).is_none());
        assert!(d(&format!("/{}", "x".repeat(107))).kernel_key(0).is_some());
    }

    #[test]
    fn words_roundtrip() {
        let a: Ipv6Addr = "fd00:20::1".parse().expect("addr");
        assert_eq!(addr_from_words(&addr_words(a)), a);
        let m = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped();
        assert_eq!(
            addr_words(m),
            agent_common::v4_mapped(u32::from(Ipv4Addr::new(127, 0, 0, 1)).to_be())
        );
    }
}
