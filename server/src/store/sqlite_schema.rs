//! The policy database's tables, created by `SqliteStore::open`, and the small conversions both
//! the policy store (`sqlite.rs`) and the grant store (`sqlite_grants.rs`) use.

use super::StoreError;

/// Revisions and every version of every policy.
const POLICY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS revisions (
    revision   INTEGER PRIMARY KEY,
    applied_by TEXT NOT NULL,
    applied_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    name       TEXT NOT NULL,
    revision   INTEGER NOT NULL REFERENCES revisions(revision),
    yaml       TEXT NOT NULL,
    applied_by TEXT NOT NULL,
    applied_at INTEGER NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, revision)
);
";

/// Grant requests, their state, and one history row per state change.
const GRANT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS grants (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    identity        TEXT NOT NULL,
    session         TEXT NOT NULL,
    template        TEXT NOT NULL,
    policy          TEXT NOT NULL,
    ttl_seconds     INTEGER NOT NULL,
    reason          TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    requester       TEXT NOT NULL,
    requested_at    INTEGER NOT NULL,
    state           TEXT NOT NULL,
    decided_by      TEXT NOT NULL DEFAULT '',
    decided_at      INTEGER NOT NULL DEFAULT 0,
    decision_reason TEXT NOT NULL DEFAULT '',
    expires_at      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS grants_state ON grants(state);
CREATE TABLE IF NOT EXISTS grant_history (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    grant_id INTEGER NOT NULL REFERENCES grants(id),
    at       INTEGER NOT NULL,
    state    TEXT NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS grant_history_grant ON grant_history(grant_id, seq);
";

/// The fleet's event history (`sqlite_events.rs`).
const EVENT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fleet_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    node    TEXT NOT NULL,
    at      INTEGER NOT NULL,
    encoded BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_events_at ON fleet_events(at);
";

/// Every table, in creation order.
const NODE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    node      TEXT PRIMARY KEY,
    replica   TEXT NOT NULL,
    connected INTEGER NOT NULL,
    heartbeat INTEGER NOT NULL,
    status    BLOB NOT NULL,
    principals BLOB NOT NULL
);
";

pub(super) const SCHEMAS: [&str; 4] = [POLICY_SCHEMA, GRANT_SCHEMA, EVENT_SCHEMA, NODE_SCHEMA];

/// Names the failed database operation in the error.
pub(super) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Db { op, source }
}

/// SQLite integers are signed: a u64 above `i64::MAX` is stored as `i64::MAX`.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
