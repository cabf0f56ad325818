//! `corral policy simulate`: recorded calls replayed through a candidate policy with the
//! reference evaluator ([`crate::eval`], the one the kernel is tested against), each session
//! in order with its own chaining state, as the kernel would have decided them. The report
//! lists every call whose outcome would change (went through → blocked, blocked → through),
//! grouped by what decides it under the candidate, with a count and an example each.
//!
//! A connect to an address a DNS answer opened (the event names it) is decided in the
//! candidate's zone for that name, as the kernel decides it.
//!
//! A call "went through" unless its verdict was `deny` (an `audit-deny` went through). Calls
//! that a just-in-time grant let through are not replayed (grants are not part of a policy):
//! they are counted apart.

use std::collections::{BTreeMap, HashMap};

use crate::{
    compiled::CompiledSet,
    eval::{self, ConnectCall, PrincipalState, Reason, Verdict},
};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Connect(ConnectCall),
    /// A unix socket path (`@name`: abstract).
    Unix(String),
    Exec(String),
}

/// A call as recorded, with the outcome it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub identity: String,
    pub session: String,
    pub call: Call,
    /// The recorded verdict was not `deny`.
    pub went_through: bool,
    /// A grant let it through.
    pub by_grant: bool,
    /// How the report names it (`connect tcp 10.0.0.1:443`, with its sequence number).
    pub what: String,
    /// For a connect to an address a DNS answer opened: the name.
    pub name: Option<String>,
    pub time_unix_nano: u64,
    /// The calls this record stands for: 1, or more for an event that reported identical
    /// repeated calls with it (`repeats`).
    pub calls: usize,
}

/// What decides a group of changed calls under the candidate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decider {
    /// `true`: the calls went through and would be blocked.
    pub newly_denied: bool,
    /// The candidate policy governing the identity (empty: none does).
    pub policy: String,
    /// `connect`, `unix` or `exec` (rule indices count in the connect or the exec list).
    pub kind: &'static str,
    /// `rule`, `default`, `chaining`, `no-policy`, ...
    pub reason: String,
    /// Connect or exec rule index, for `rule`.
    pub rule: Option<u32>,
}

/// A group of calls whose outcome changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub decider: Decider,
    pub count: usize,
    /// The first such call.
    pub example: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub replayed: usize,
    pub unchanged: usize,
    /// Let through by a grant: not replayed.
    pub by_grant: usize,
    /// Newly denied first, then by policy, reason and rule.
    pub changes: Vec<Change>,
}

impl Report {
    /// Calls that went through and would be blocked.
    pub fn newly_denied(&self) -> usize {
        self.changes
            .iter()
            .filter(|c| c.decider.newly_denied)
            .map(|c| c.count)
            .sum()
    }

    /// Calls that were blocked and would go through.
    pub fn newly_allowed(&self) -> usize {
        self.changes
            .iter()
            .filter(|c| !c.decider.newly_denied)
            .map(|c| c.count)
            .sum()
    }
}

/// Replays `calls` (in recording order) through `candidate`.
pub fn simulate(candidate: &CompiledSet, calls: &[Recorded]) -> Report {
    let mut states: HashMap<(&str, &str), PrincipalState> = HashMap::new();
    let mut groups: BTreeMap<Decider, (usize, String)> = BTreeMap::new();
    let mut report = Report::default();
    for c in calls {
        if c.by_grant {
            report.by_grant += c.calls;
            continue;
        }
        report.replayed += c.calls;
        let slot = candidate.policy_for(&c.identity);
        let policy = slot.and_then(|s| candidate.policies.get(s as usize));
        let state = states
            .entry((c.identity.as_str(), c.session.as_str()))
            .or_default();
        // Time does not matter without grants.
        let d = match &c.call {
            // An address a DNS answer opened: decided in the candidate's zone for that name,
            // as the kernel decides a learned address.
            Call::Connect(call) => {
                let learned = c
                    .name
                    .as_deref()
                    .zip(policy)
                    .and_then(|(n, p)| p.zone_of_name(n).map(|h| h.zone));
                eval::connect_learned(policy, state, call, learned, 0)
            }
            Call::Unix(path) => match eval::unix_connect(policy, state, path, 0) {
                Some(d) => d,
                None => continue,
            },
            Call::Exec(path) => eval::exec(policy, path),
        };
        if !matches!(c.call, Call::Exec(_)) {
            eval::record(state, &d);
        }
        let through = d.verdict != Verdict::Deny;
        if through == c.went_through {
            report.unchanged += c.calls;
            continue;
        }
        let decider = Decider {
            newly_denied: c.went_through,
            policy: policy.map(|p| p.name.clone()).unwrap_or_default(),
            kind: match c.call {
                Call::Connect(_) => "connect",
                Call::Unix(_) => "unix",
                Call::Exec(_) => "exec",
            },
            reason: d.reason.name().to_owned(),
            rule: if d.reason == Reason::Rule {
                d.rule
            } else {
                None
            },
        };
        groups
            .entry(decider)
            .or_insert_with(|| (0, c.what.clone()))
            .0 += c.calls;
    }
    // Newly denied first (`true` sorts after `false`).
    let mut changes: Vec<Change> = groups
        .into_iter()
        .map(|(decider, (count, example))| Change {
            decider,
            count,
            example,
        })
        .collect();
    changes.sort_by_key(|c| !c.decider.newly_denied);
    report.changes = changes;
    report
}

#[cfg(test)]
#[path = "simulate_tests.rs"]
mod tests;
