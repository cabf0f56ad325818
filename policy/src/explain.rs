//! `explain`: which policy governs an identity, which rule decides a call, and why — from a
//! compiled file and the reference evaluator, for a principal with a fresh session (nothing
//! contacted yet, no grants).

use std::{fmt, net::IpAddr};

use crate::compiled::Action;

use super::{
    compiled::CompiledSet,
    eval::{self, ConnectCall, Decision, PrincipalState, Reason, Verdict},
};

/// The call being explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Connect(ConnectCall),
    /// The path as given, and the path the decision is about (symlinks resolved).
    Exec {
        given: String,
        resolved: String,
    },
}

/// The outcome of `explain`, printable for people.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub identity: String,
    pub call: Call,
    pub decision: Decision,
    /// Policy name and where its matching identity pattern was written.
    pub policy: Option<(String, String, String)>,
    /// `file:line:col` of the deciding rule, if a rule decided.
    pub rule_at: Option<String>,
    pub zone: Option<String>,
    /// For a connect by DNS name: the name, and the zone and pattern it matched.
    pub name: Option<String>,
    pub why: String,
}

/// A `--connect` target: an address, or a DNS name (resolved by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(ConnectCall),
    Name { name: String, port: u16, proto: u8 },
}

/// Parses `ADDR:PORT[/tcp|udp]` or `NAME:PORT[/tcp|udp]` (IPv6 as `[ADDR]:PORT`; protocol
/// defaults to tcp; an IPv4-mapped IPv6 address counts as IPv4).
pub fn parse_target(s: &str) -> Result<Target, String> {
    let bad = || {
        format!(
            "--connect {s}: write ADDR:PORT[/tcp|udp] or NAME:PORT[/tcp|udp], e.g. \
             10.0.0.1:443/tcp, [::1]:53/udp or api.github.com:443"
        )
    };
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, "tcp")) => (a, agent_common::PROTO_TCP),
        Some((a, "udp")) => (a, agent_common::PROTO_UDP),
        Some((_, p)) => {
            return Err(format!(
                "--connect {s}: protocol `{p}` is not supported; write /tcp or /udp"
            ));
        }
        None => (s, agent_common::PROTO_TCP),
    };
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        let addr = match sa.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        return Ok(Target::Addr(ConnectCall {
            addr,
            port: sa.port(),
            proto,
        }));
    }
    let (name, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let name = crate::hosts::normalize(name).ok_or_else(bad)?;
    Ok(Target::Name { name, port, proto })
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::AuditDeny => "audit-deny (would be denied; audit mode lets it proceed)",
    }
}

fn proto_name(p: u8) -> String {
    match p {
        agent_common::PROTO_TCP => "tcp".into(),
        agent_common::PROTO_UDP => "udp".into(),
        agent_common::PROTO_ICMP => "icmp".into(),
        agent_common::PROTO_VSOCK => "vsock".into(),
        n => format!("proto {n}"),
    }
}

/// Explains `call` by `identity` against `compiled`.
pub fn explain(compiled: &CompiledSet, identity: &str, call: Call) -> Explanation {
    explain_inner(compiled, identity, call, None)
}

/// Explains a connect to `addr` (in `call`), an address DNS name `name` resolved to, as the
/// agent decides it: the DNS proxy refuses a name in none of the zones by host name (unless
/// `spec.dns.allowUnlisted`); an answered name opens its addresses in its zone.
pub fn explain_name(
    compiled: &CompiledSet,
    identity: &str,
    name: &str,
    call: ConnectCall,
) -> Explanation {
    explain_inner(compiled, identity, Call::Connect(call), Some(name))
}

/// How a name fares under a policy.
struct NameMatch {
    zone: Option<u32>,
    pattern: Option<String>,
    refused: bool,
}

fn explain_inner(
    compiled: &CompiledSet,
    identity: &str,
    call: Call,
    name: Option<&str>,
) -> Explanation {
    let slot = compiled.policy_for(identity).map(|s| s as usize);
    let governing = slot.and_then(|s| {
        let p = compiled.policies.get(s)?;
        let src = &p.source;
        let (pi, pat) = p
            .identities
            .iter()
            .enumerate()
            .filter(|(_, pat)| pat.matches(identity))
            .max_by_key(|(_, pat)| pat.specificity())?;
        Some((s, p, src, pi, pat))
    });
    let state = PrincipalState::default();
    let named = match (name, governing) {
        (Some(_), Some((_, p, ..))) if !p.has_hosts() => Some(NameMatch {
            zone: None,
            pattern: None,
            refused: false,
        }),
        (Some(n), Some((_, p, ..))) => {
            let hz = p.zone_of_name(n);
            Some(NameMatch {
                zone: hz.map(|h| h.zone),
                pattern: hz.map(|h| h.pattern.to_string()),
                refused: hz.is_none() && !p.dns_allow_unlisted,
            })
        }
        _ => None,
    };
    let decision = match (&call, governing, &named) {
        (Call::Connect(_), Some((_, p, ..)), Some(m)) if m.refused => {
            Decision::new(Verdict::Deny, Reason::Default).audit(p.mode)
        }
        (Call::Connect(c), g, m) => eval::connect_learned(
            g.map(|g| g.1),
            &state,
            c,
            m.as_ref().and_then(|m| m.zone),
            0,
        ),
        (Call::Exec { resolved, .. }, g, _) => eval::exec(g.map(|g| g.1), resolved),
    };
    let Some((_, policy, src, pi, pat)) = governing else {
        return Explanation {
            identity: identity.into(),
            call,
            decision,
            policy: None,
            rule_at: None,
            zone: None,
            name: name.map(str::to_owned),
            why: "no policy in this file governs this identity: an enrolled principal without \
                  a policy is denied everything (add its SPIFFE ID pattern to a policy's \
                  `identities`)"
                .into(),
        };
    };
    let pat_at = src
        .identities
        .get(pi)
        .map(|p| src.at(*p))
        .unwrap_or_default();
    let zone_name = |z: u32| policy.zones.get(z as usize).map(|z| z.name.clone());
    let zone = decision.zone.and_then(zone_name);
    let rule_at = decision.rule.and_then(|r| {
        let list = match call {
            Call::Connect(_) => &src.connect,
            Call::Exec { .. } => &src.exec,
        };
        list.get(r as usize).map(|p| src.at(*p))
    });
    let dest = match &call {
        Call::Connect(c) => format!(
            "{}:{}/{}",
            match c.addr {
                IpAddr::V6(a) => format!("[{a}]"),
                IpAddr::V4(a) => a.to_string(),
            },
            c.port,
            proto_name(c.proto)
        ),
        Call::Exec { resolved, .. } => resolved.clone(),
    };
    let default_word = match policy.default_action {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    let why = match decision.reason {
        Reason::Rule => {
            let action = if decision.verdict == Verdict::Allow {
                "allow"
            } else {
                "deny"
            };
            let which = decision.rule.map_or_else(String::new, |r| r.to_string());
            let zone_txt = zone
                .as_ref()
                .map_or_else(String::new, |z| format!(" in zone `{z}`"));
            if action == "deny" {
                format!(
                    "{dest}{zone_txt} matches {action} rule #{which}; deny beats allow, so any \
                     allow rule that also matches does not count"
                )
            } else {
                format!("{dest}{zone_txt} matches allow rule #{which} and no deny rule")
            }
        }
        Reason::Default => match (&call, &zone) {
            (Call::Connect(_), None) => format!(
                "{dest} is in none of the policy's zones, so the default action ({default_word}) applies"
            ),
            (Call::Connect(_), Some(z)) => format!(
                "{dest} is in zone `{z}`, but no rule names this port and protocol there, so the \
                 default action ({default_word}) applies"
            ),
            (Call::Exec { .. }, _) => {
                format!("no exec rule names {dest}, so the default action ({default_word}) applies")
            }
        },
        Reason::Chaining => {
            let (ci, seen) = decision.chained.unwrap_or((0, 0));
            format!(
                "chaining rule at {} denies zone `{}` once the session has contacted `{}`",
                src.chaining.get(ci).map(|p| src.at(*p)).unwrap_or_default(),
                zone.clone().unwrap_or_default(),
                zone_name(seen).unwrap_or_default()
            )
        }
        Reason::Grant => "an active grant allows it".into(),
        Reason::NoPolicy => "no policy governs this identity".into(),
        Reason::Containment => "a containment guard refuses it whatever the policy says".into(),
    };
    let mut why = match (name, &named) {
        (Some(n), Some(m)) if m.refused => format!(
            "the DNS proxy answers REFUSED for `{n}`: it is in none of the policy's zones by host \
             name (and `spec.dns.allowUnlisted` is off), so no DNS answer opens an address for this \
             principal (its addresses are decided as addresses)"
        ),
        (Some(n), Some(m)) => match m.zone {
            Some(z) if decision.zone == Some(z) => format!(
                "`{n}` is in zone `{}` by name (pattern `{}`): a DNS answer opens {dest} in that \
                 zone for this principal only, until its TTL passes; {why}",
                zone_name(z).unwrap_or_default(),
                m.pattern.clone().unwrap_or_default()
            ),
            Some(z) => format!(
                "`{n}` is in zone `{}` by name, but the address's own zone denies it (an allowed \
                 name cannot open a denied range): {why}",
                zone_name(z).unwrap_or_default()
            ),
            None => format!("`{n}` is in no zone by host name, so the address decides: {why}"),
        },
        _ => why,
    };
    if policy.mode == crate::compiled::Mode::Audit && decision.verdict == Verdict::AuditDeny {
        why.push_str("; the policy is in audit mode, so the denial is only recorded");
    }
    if let Call::Connect(_) = call
        && decision.verdict != Verdict::Allow
        && let Some(zi) = decision.zone
    {
        let grants: Vec<&str> = slot
            .and_then(|s| compiled.policies.get(s))
            .map(|p| p.grants.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|g| g.zones.contains(&zi))
            .map(|g| g.name.as_str())
            .collect();
        if !grants.is_empty() && decision.reason != Reason::Chaining {
            why.push_str(&format!(
                "; grant template(s) {} cover this zone and may be requested with `corral grant request`",
                grants.join(", ")
            ));
        }
    }
    if let Call::Connect(_) = call
        && decision.reason != Reason::Chaining
        && let Some(zi) = decision.zone
    {
        let chains: Vec<String> = policy
            .chaining
            .iter()
            .filter(|c| c.deny.contains(&zi))
            .flat_map(|c| c.after.iter().filter_map(|a| zone_name(*a)))
            .collect();
        if !chains.is_empty() {
            why.push_str(&format!(
                "; this is for a fresh session: after contacting {} it would be denied by chaining",
                chains.join(", ")
            ));
        }
    }
    Explanation {
        identity: identity.into(),
        call,
        decision,
        policy: Some((policy.name.clone(), pat.as_str().to_owned(), pat_at)),
        rule_at,
        zone,
        name: name.map(|n| match named.as_ref().and_then(|m| m.pattern.clone()) {
            Some(p) => format!("{n} (pattern {p})"),
            None => n.to_owned(),
        }),
        why,
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "verdict:  {}", verdict_word(self.decision.verdict))?;
        match &self.policy {
            Some((name, pat, at)) => {
                writeln!(f, "policy:   {name} (identity pattern {pat} at {at})")?
            }
            None => writeln!(f, "policy:   none")?,
        }
        let reason = self.decision.reason.name();
        match (&self.rule_at, self.decision.rule) {
            (Some(at), Some(r)) => writeln!(f, "rule:     #{r} at {at}")?,
            _ => writeln!(f, "rule:     none ({reason})")?,
        }
        if let Call::Connect(_) = self.call {
            writeln!(f, "zone:     {}", self.zone.as_deref().unwrap_or("none"))?;
        }
        if let Some(n) = &self.name {
            writeln!(f, "name:     {n}")?;
        }
        if let Call::Exec { given, resolved } = &self.call
            && given != resolved
        {
            writeln!(f, "path:     {given} resolves to {resolved}")?;
        }
        write!(f, "why:      {}", self.why)
    }
}
