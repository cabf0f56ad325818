//! Just-in-time grants: requests, approvals, and what nodes receive.
//!
//! - [`templates`]: which grant templates an identity's policy offers (the node's compiler,
//!   cached per revision).
//! - [`ledger`]: the state machine over the [`crate::store::grants::GrantStore`]; every change is
//!   recorded, published as an event, and (when the active set changes) pushed to the fleet.
//! - [`convert`]: grants as the API, nodes and events see them.
//! - [`service`]: `GrantService` on gRPC and the expiry sweep task (callers are named by
//!   [`crate::auth`]).
//!
//! # Semantics
//!
//! States: `PENDING` → `ACTIVE` (approve, or at once for `approval: auto`, decided by
//! `auto`) | `DENIED` (deny) | `REVOKED` (revoke) | `ENDED` (session end); `ACTIVE` →
//! `REVOKED` | `EXPIRED` (the server's sweep, actor `expiry`) | `ENDED` (actor
//! `session-end`). Every change is one history row and one fleet event.
//!
//! Authorization (decided here, documented for `--approver`): a caller is named by its client
//! certificate under mTLS (first DNS, else first URI subject alternative name), otherwise (a
//! loopback `--plaintext` server) by the local user owning the caller's socket; never by a
//! header. The requester of a grant may never
//! approve it (separation of duties; two callers without a name count as the same one).
//! Without `--approver`, any other caller may approve or deny, and anyone may revoke. With
//! `--approver NAME...`, only those names may approve or deny; revoke is open to approvers
//! and to the grant's requester (who may withdraw or give up their own grant).

pub mod convert;
pub mod ledger;
#[cfg(test)]
mod loopback;
pub mod service;
pub mod templates;

use crate::store::StoreError;

pub use self::ledger::Grants;

pub use crate::auth::Caller;

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("a grant request needs a reason: say why the access is needed")]
    MissingReason,
    #[error("a grant request needs {field}")]
    Missing { field: &'static str },
    #[error("grant id `{id}` is not a grant id (a positive decimal number)")]
    BadId { id: String },
    #[error("no policy governs identity `{identity}`, so it has no grants to request")]
    NotCovered { identity: String },
    #[error(
        "policy `{policy}` (which governs `{identity}`) offers no grant named `{grant}` \
         (it offers: {offered})"
    )]
    UnknownTemplate {
        identity: String,
        policy: String,
        grant: String,
        offered: String,
    },
    #[error("a ttl of {} is over grant `{grant}`'s maxTtl of {}", human(*.ttl), human(*.max))]
    TtlTooLong { grant: String, ttl: u64, max: u64 },
    #[error("unknown session: no connected node reports session `{session}` of `{identity}`")]
    UnknownSession { identity: String, session: String },
    #[error("no grant with id {id}")]
    NotFound { id: u64 },
    #[error("grant {id} is {state}; only {allowed} grants can be {op}")]
    WrongState {
        id: u64,
        state: &'static str,
        allowed: &'static str,
        op: &'static str,
    },
    #[error("`{user}` requested grant {id} and so may not approve it (separation of duties)")]
    SelfApproval { id: u64, user: String },
    #[error("`{user}` is not an approver (--approver) and so may not {op} grants")]
    NotApprover { user: String, op: &'static str },
    #[error("only an approver or its requester may revoke grant {id}, and `{user}` is neither")]
    NotApproverOrRequester { id: u64, user: String },
    #[error("grant {id} can no longer be approved: {why}")]
    NoLongerOffered { id: u64, why: String },
    #[error("the policy set in force does not compile: {0}")]
    Policy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A duration in seconds as policies write it: `15m`, `1h30m`, `90s`, `0s`.
pub fn human(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (v, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            out.push_str(&format!("{v}{unit}"));
        }
    }
    out
}

/// Parses a grant id as the API carries it (decimal).
pub fn parse_id(id: &str) -> Result<u64, GrantError> {
    id.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| GrantError::BadId { id: id.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_positive_decimals_and_durations_read_as_people_write_them() {
        assert_eq!(parse_id("42").ok(), Some(42));
        for bad in ["", "0", "-1", "x1", "1.5"] {
            assert!(
                matches!(parse_id(bad), Err(GrantError::BadId { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            [human(0), human(90), human(900), human(5400), human(3601)],
            ["0s", "1m30s", "15m", "1h30m", "1h1s"]
        );
    }
}
