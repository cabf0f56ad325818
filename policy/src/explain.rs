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
    pub why: String,
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
    let decision = match (&call, governing) {
        (Call::Connect(c), g) => eval::connect(g.map(|g| g.1), &state, c, 0),
        (Call::Exec { resolved, .. }, g) => eval::exec(g.map(|g| g.1), resolved),
    };
    let Some((_, policy, src, pi, pat)) = governing else {
        return Explanation {
            identity: identity.into(),
            call,
            decision,
            policy: None,
            rule_at: None,
            zone: None,
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
    let mut why = why;
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
        if let Call::Exec { given, resolved } = &self.call
            && given != resolved
        {
            writeln!(f, "path:     {given} resolves to {resolved}")?;
        }
        write!(f, "why:      {}", self.why)
    }
}
