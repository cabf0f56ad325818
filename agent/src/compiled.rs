//! The compiled policy: a plain Rust value, produced from YAML by the policy compiler and
//! written into the kernel maps by [`crate::ebpf::maps::PolicyMaps::apply`].

use std::net::{IpAddr, Ipv6Addr};

use agent_common::{ACTION_ALLOW, ACTION_DENY, Addr, MODE_AUDIT, MODE_ENFORCE};

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
