//! The reference evaluator: decides a (principal, call) from the compiled policy as written,
//! in plain Rust, with no knowledge of how the kernel maps are laid out. The kernel programs
//! (`agent-ebpf/src/connect.rs`) must decide exactly the same; [`super::model`] and the
//! privileged differential test check that they do.
//!
//! Connect, in order:
//! 1. The destination's zone is the zone with the longest matching prefix (IPv4-mapped IPv6
//!    addresses are IPv4). No zone: only the default action applies.
//! 2. Rules whose zone, port (or any) and protocol (or any) match: deny beats allow, and the
//!    deciding rule is the lowest-indexed one of the winning action.
//! 3. Chaining beats everything: if the principal has contacted a zone in some rule's `after`
//!    and the destination zone is in its `deny`, the call is denied.
//! 4. A denied call (by rule or default, not chaining) is allowed by an active grant for its
//!    zone, port (or any) and protocol (or any); the most specific grant key names the grant.
//! 5. Audit mode turns every deny into audit-deny (the call proceeds).
//!
//! A call that is not denied marks its zone as contacted (chaining state).
//!
//! Unix-socket connect/sendmsg ([`unix_connect`]), kernel 6.7+: every policy polices them, like
//! any destination. The zone is the one listing the exact path (`@name` for an abstract name),
//! or none (default action), then steps 2–5 as above with no port and no
//! protocol: only rules (and grants) without `ports` and `protocols` match a unix socket; a
//! rule naming ports or protocols applies to IP calls only (validation rejects one whose zone
//! has nothing but unix sockets). No policy: denied, as for IP.
//!
//! Exec: rules whose exact path or directory prefix matches; deny beats allow; otherwise the
//! default action; audit mode as above. Chaining and grants do not apply to exec.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use agent_common::{ANY_PORT, ANY_PROTO};

use crate::compiled::{Action, CompiledPolicy, Mode};
pub use agent_common::{Reason, Verdict};

/// A connect (or sendmsg) call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectCall {
    pub addr: IpAddr,
    pub port: u16,
    /// IP protocol number (6 tcp, 17 udp).
    pub proto: u8,
}

/// A grant issued to a principal, keyed like the kernel's: one grant per (zone, port, proto)
/// key, a later grant for the same key replacing the earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantKey {
    pub zone: u32,
    /// `0`: any port.
    pub port: u16,
    /// `0`: any protocol.
    pub proto: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveGrant {
    pub id: u64,
    /// Absolute expiry (CLOCK_BOOTTIME ns); the grant counts while `now < expires_ns`.
    pub expires_ns: u64,
}

/// What the decision depends on besides the policy: the chaining state and the grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrincipalState {
    /// Zones (indices) this principal has contacted.
    pub seen: BTreeSet<u32>,
    pub grants: BTreeMap<GrantKey, ActiveGrant>,
}

/// A decision and what it rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// Deciding rule index (connect or exec list), for `Reason::Rule`.
    pub rule: Option<u32>,
    /// Destination zone (connect only).
    pub zone: Option<u32>,
    pub grant: Option<u64>,
    /// For `Reason::Chaining`: the chaining rule index and the contacted zone that triggered it.
    pub chained: Option<(usize, u32)>,
}

impl Decision {
    pub(crate) fn new(verdict: Verdict, reason: Reason) -> Self {
        Self {
            verdict,
            reason,
            rule: None,
            zone: None,
            grant: None,
            chained: None,
        }
    }

    pub(crate) fn audit(mut self, mode: Mode) -> Self {
        if self.verdict == Verdict::Deny && mode == Mode::Audit {
            self.verdict = Verdict::AuditDeny;
        }
        self
    }
}

/// The zone of `addr`: longest matching prefix (on an exact tie, the later zone, as a later
/// map write would replace the earlier; validation rejects such ties).
pub fn zone_of(policy: &CompiledPolicy, addr: IpAddr) -> Option<u32> {
    let mut best: Option<(u8, usize)> = None;
    for (zi, z) in policy.zones.iter().enumerate() {
        for n in &z.nets {
            if n.contains(addr) && best.is_none_or(|(b, _)| n.bits() >= b) {
                best = Some((n.bits(), zi));
            }
        }
    }
    best.and_then(|(_, zi)| u32::try_from(zi).ok())
}

fn default_verdict(a: Action) -> Verdict {
    match a {
        Action::Allow => Verdict::Allow,
        Action::Deny => Verdict::Deny,
    }
}

/// Decides a connect by `policy` (`None`: the principal has no policy, denied).
pub fn connect(
    policy: Option<&CompiledPolicy>,
    state: &PrincipalState,
    call: &ConnectCall,
    now_ns: u64,
) -> Decision {
    connect_learned(policy, state, call, None, now_ns)
}

/// [`connect`] for an address a DNS answer put in zone `learned` for this principal (zones by
/// host name), as the kernel decides it: in the name's zone, unless a rule or chaining of the
/// address's own zone denies it (an allowed name cannot open a denied range).
pub fn connect_learned(
    policy: Option<&CompiledPolicy>,
    state: &PrincipalState,
    call: &ConnectCall,
    learned: Option<u32>,
    now_ns: u64,
) -> Decision {
    let Some(policy) = policy else {
        return Decision::new(Verdict::Deny, Reason::NoPolicy);
    };
    let zone = zone_of(policy, call.addr);
    let mut d = match zone {
        None => Decision::new(default_verdict(policy.default_action), Reason::Default),
        Some(z) => decide_in_zone(policy, state, call, z, now_ns),
    };
    d.zone = zone;
    let by_addr_denies =
        d.verdict == Verdict::Deny && matches!(d.reason, Reason::Rule | Reason::Chaining);
    if let Some(l) = learned
        && policy.has_hosts()
        && !by_addr_denies
    {
        d = decide_in_zone(policy, state, call, l, now_ns);
        d.zone = Some(l);
    }
    d.audit(policy.mode)
}

fn decide_in_zone(
    policy: &CompiledPolicy,
    state: &PrincipalState,
    call: &ConnectCall,
    zone: u32,
    now_ns: u64,
) -> Decision {
    for (ci, c) in policy.chaining.iter().enumerate() {
        if c.deny.contains(&zone)
            && let Some(&seen) = c.after.iter().find(|a| state.seen.contains(a))
        {
            let mut d = Decision::new(Verdict::Deny, Reason::Chaining);
            d.chained = Some((ci, seen));
            return d;
        }
    }
    let first = |action: Action| {
        policy
            .connect
            .iter()
            .filter(|r| {
                r.action == action
                    && r.zones.contains(&zone)
                    && (r.ports.is_empty() || r.ports.contains(&call.port))
                    && (r.protocols.is_empty() || r.protocols.contains(&call.proto))
            })
            .map(|r| r.index)
            .min()
    };
    let base = by_rules(first, policy.default_action);
    if base.verdict == Verdict::Deny
        && let Some(id) = grant_for(state, zone, call, now_ns)
    {
        return Decision {
            grant: Some(id),
            ..Decision::new(Verdict::Allow, Reason::Grant)
        };
    }
    base
}

/// Deny beats allow; the deciding rule is the lowest-indexed rule of the winning action
/// (`first(action)`); no matching rule: the policy default.
fn by_rules(first: impl Fn(Action) -> Option<u32>, default_action: Action) -> Decision {
    if let Some(rule) = first(Action::Deny) {
        Decision {
            rule: Some(rule),
            ..Decision::new(Verdict::Deny, Reason::Rule)
        }
    } else if let Some(rule) = first(Action::Allow) {
        Decision {
            rule: Some(rule),
            ..Decision::new(Verdict::Allow, Reason::Rule)
        }
    } else {
        Decision::new(default_verdict(default_action), Reason::Default)
    }
}

/// The active grant covering the call, most specific key first.
fn grant_for(state: &PrincipalState, zone: u32, call: &ConnectCall, now_ns: u64) -> Option<u64> {
    [
        (call.port, call.proto),
        (call.port, ANY_PROTO),
        (ANY_PORT, call.proto),
        (ANY_PORT, ANY_PROTO),
    ]
    .into_iter()
    .find_map(|(port, proto)| {
        state
            .grants
            .get(&GrantKey { zone, port, proto })
            .filter(|g| now_ns < g.expires_ns)
            .map(|g| g.id)
    })
}

/// The zone listing unix-socket `path` (exact match; `@name` for an abstract name).
pub fn unix_zone_of(policy: &CompiledPolicy, path: &str) -> Option<u32> {
    policy.unix.iter().find(|u| u.path == path).map(|u| u.zone)
}

/// Decides a connect/sendmsg to unix socket `path` by `policy` (`None`: no policy, denied).
/// Port and protocol are "none" (0), so only rules and grants without them match. Always
/// `Some` (kept an `Option` for a future opt-out of unix policing).
pub fn unix_connect(
    policy: Option<&CompiledPolicy>,
    state: &PrincipalState,
    path: &str,
    now_ns: u64,
) -> Option<Decision> {
    let Some(policy) = policy else {
        return Some(Decision::new(Verdict::Deny, Reason::NoPolicy));
    };
    let call = ConnectCall {
        addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        port: ANY_PORT,
        proto: ANY_PROTO,
    };
    let zone = unix_zone_of(policy, path);
    let mut d = match zone {
        None => Decision::new(default_verdict(policy.default_action), Reason::Default),
        Some(z) => decide_in_zone(policy, state, &call, z, now_ns),
    };
    d.zone = zone;
    Some(d.audit(policy.mode))
}

/// Updates the chaining state after a decision: a call that was not denied marks its zone.
pub fn record(state: &mut PrincipalState, d: &Decision) {
    if d.verdict != Verdict::Deny
        && let Some(z) = d.zone
    {
        state.seen.insert(z);
    }
}

/// Decides an exec of `path` (already resolved to the real file's path).
pub fn exec(policy: Option<&CompiledPolicy>, path: &str) -> Decision {
    let Some(policy) = policy else {
        return Decision::new(Verdict::Deny, Reason::NoPolicy);
    };
    let first = |action: Action| {
        policy
            .exec
            .iter()
            .filter(|r| r.action == action && r.matches(path))
            .map(|r| r.index)
            .min()
    };
    by_rules(first, policy.default_action).audit(policy.mode)
}
