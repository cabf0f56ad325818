//! Grant storage: every grant request with its whole history. [`GrantStore`] is the seam;
//! [`super::sqlite::SqliteStore`] implements it in the same database as the policies.
//!
//! A grant's id is the store's (SQLite `AUTOINCREMENT`, PostgreSQL `BIGSERIAL`) row id: positive, never reused, and
//! the same number the kernel's grant map and events carry. Every state change appends one
//! history row whose id (`seq`) is global and monotonic; the server uses it as the grants
//! version and as the sequence number of its grant events.

use corral_proto::v1::GrantState;

use super::StoreError;

/// A new request, as it is recorded (state [`GrantState::Pending`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewGrant {
    pub identity: String,
    /// Empty: every session of the identity.
    pub session: String,
    /// The template's name in the identity's policy.
    pub template: String,
    /// The policy that offers the template (at request time).
    pub policy: String,
    pub ttl_seconds: u64,
    pub reason: String,
    /// How the requester is shown ("alice from 127.0.0.1:4711", or a certificate name).
    pub requested_by: String,
    /// The requester's name alone, for separation of duties.
    pub requester: String,
    pub requested_unix_nano: u64,
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Global, monotonic over every grant's history.
    pub seq: u64,
    pub time_unix_nano: u64,
    pub state: GrantState,
    pub actor: String,
    pub reason: String,
}

/// A grant as stored, with its history (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    pub id: u64,
    pub request: NewGrant,
    pub state: GrantState,
    /// Who approved or denied it ("auto" for `approval: auto`); empty until decided.
    pub decided_by: String,
    pub decided_unix_nano: u64,
    pub decision_reason: String,
    /// Absolute expiry once issued; 0 while pending (or when never issued).
    pub expires_unix_nano: u64,
    pub history: Vec<HistoryEntry>,
}

/// A state change to make, if the grant is in one of `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<'a> {
    pub id: u64,
    pub from: &'a [GrantState],
    pub to: GrantState,
    pub actor: &'a str,
    pub reason: &'a str,
    pub time_unix_nano: u64,
    /// Records the actor as the decision (approve, deny).
    pub decision: bool,
    /// Sets the expiry (issue).
    pub expires_unix_nano: Option<u64>,
}

/// What became of a [`Transition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transitioned {
    Done(Box<GrantRecord>),
    NotFound,
    /// The grant is in this state, not one the transition starts from.
    WrongState(GrantState),
}

/// Which grants [`GrantStore::list`] returns (all conditions must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantFilter {
    pub id: Option<u64>,
    pub identity: Option<String>,
    pub session: Option<String>,
    /// Empty: any state.
    pub states: Vec<GrantState>,
    /// Only grants with `expires_unix_nano <= expired_by` (and an expiry).
    pub expired_by: Option<u64>,
}

/// Where grants and their history live.
#[async_trait::async_trait]
pub trait GrantStore: Send + Sync + 'static {
    /// Records a new request (state pending, one history row by the requester).
    async fn insert(&self, g: &NewGrant) -> Result<GrantRecord, StoreError>;
    /// Applies `t` atomically: checks the current state and appends the history row.
    async fn transition(&self, t: &Transition<'_>) -> Result<Transitioned, StoreError>;
    /// Matching grants, by id, with their history.
    async fn list(&self, f: &GrantFilter) -> Result<Vec<GrantRecord>, StoreError>;
    /// The newest history row's `seq` (0 if none): changes with every state change.
    async fn last_seq(&self) -> Result<u64, StoreError>;
    /// The right to run the expiry sweep now, if no other replica is running it; held until
    /// dropped. One process owns a SQLite database, so there it is always granted.
    async fn sweep_lock(&self) -> Result<Option<super::JobLock>, StoreError> {
        Ok(Some(super::JobLock::local()))
    }
}

/// The stored (text) form of a state.
pub fn state_name(s: GrantState) -> &'static str {
    match s {
        GrantState::Unspecified => "unspecified",
        GrantState::Pending => "pending",
        GrantState::Active => "active",
        GrantState::Denied => "denied",
        GrantState::Revoked => "revoked",
        GrantState::Expired => "expired",
        GrantState::Ended => "ended",
    }
}

pub fn parse_state(s: &str) -> GrantState {
    match s {
        "pending" => GrantState::Pending,
        "active" => GrantState::Active,
        "denied" => GrantState::Denied,
        "revoked" => GrantState::Revoked,
        "expired" => GrantState::Expired,
        "ended" => GrantState::Ended,
        _ => GrantState::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in [
            GrantState::Pending,
            GrantState::Active,
            GrantState::Denied,
            GrantState::Revoked,
            GrantState::Expired,
            GrantState::Ended,
        ] {
            assert_eq!(parse_state(state_name(s)), s);
        }
        assert_eq!(parse_state("bogus"), GrantState::Unspecified);
    }
}
