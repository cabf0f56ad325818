//! The PostgreSQL schema, as numbered migrations applied at start by every replica, and the
//! small conversions `postgres.rs` and `postgres_grants.rs` share.
//!
//! Replicas may start together: the migrations run in one transaction that first takes an
//! advisory lock ([`MIGRATION_LOCK`]), so one replica applies them and the others, waiting on
//! the lock, find them applied. A database whose schema is newer than this server knows is
//! refused (an older replica must not write into a layout it does not know).

use deadpool_postgres::Object;

use super::{StoreError, now_unix_nano};

/// Advisory lock keys (one 64-bit space per database; "corral" and a role).
pub(super) const MIGRATION_LOCK: i64 = 0x636f_7272_616c_0001;
/// Serialises policy commits, so revisions form one sequence across replicas.
pub(super) const POLICY_LOCK: i64 = 0x636f_7272_616c_0002;
/// Serialises grant changes, so history `seq` order is commit order: a reader that saw `seq`
/// N has seen every change before it.
pub(super) const GRANT_LOCK: i64 = 0x636f_7272_616c_0003;

/// Jobs that must run on one replica at a time (the grant expiry sweep): a session lock
/// taken with `pg_try_advisory_lock`, so a replica that dies releases it with its connection.
pub(super) const SWEEP_LOCK: i64 = 0x636f_7272_616c_0004;

/// Trimming the event history to `--event-history` (a transaction lock, tried: a replica that
/// does not get it leaves the trim to the next append).
pub(super) const COMPACT_LOCK: i64 = 0x636f_7272_616c_0005;

/// The channel a commit notifies (`policies` or `grants`) for the other replicas.
pub(super) const CHANGES: &str = "corral_changes";

/// Version 1: the tables of the SQLite store (`sqlite_schema.rs`), in PostgreSQL types.
const V1: &str = "
CREATE TABLE revisions (
    revision   BIGINT PRIMARY KEY,
    applied_by TEXT NOT NULL,
    applied_at BIGINT NOT NULL
);
CREATE TABLE policies (
    name       TEXT NOT NULL,
    revision   BIGINT NOT NULL REFERENCES revisions(revision),
    yaml       TEXT NOT NULL,
    applied_by TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    deleted    BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (name, revision)
);
CREATE TABLE grants (
    id              BIGSERIAL PRIMARY KEY,
    identity        TEXT NOT NULL,
    session         TEXT NOT NULL,
    template        TEXT NOT NULL,
    policy          TEXT NOT NULL,
    ttl_seconds     BIGINT NOT NULL,
    reason          TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    requester       TEXT NOT NULL,
    requested_at    BIGINT NOT NULL,
    state           TEXT NOT NULL,
    decided_by      TEXT NOT NULL DEFAULT '',
    decided_at      BIGINT NOT NULL DEFAULT 0,
    decision_reason TEXT NOT NULL DEFAULT '',
    expires_at      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX grants_state ON grants(state);
CREATE TABLE grant_history (
    seq      BIGSERIAL PRIMARY KEY,
    grant_id BIGINT NOT NULL REFERENCES grants(id),
    at       BIGINT NOT NULL,
    state    TEXT NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT NOT NULL
);
CREATE INDEX grant_history_grant ON grant_history(grant_id, seq);
CREATE TABLE fleet_events (
    id      BIGSERIAL PRIMARY KEY,
    node    TEXT NOT NULL,
    at      BIGINT NOT NULL,
    encoded BYTEA NOT NULL
);
CREATE INDEX fleet_events_at ON fleet_events(at);
";

/// Version 2: node registrations, so every replica sees the nodes of the others.
const V2: &str = "
CREATE TABLE nodes (
    node       TEXT PRIMARY KEY,
    replica    TEXT NOT NULL,
    connected  BOOLEAN NOT NULL,
    heartbeat  BIGINT NOT NULL,
    status     BYTEA NOT NULL,
    principals BYTEA NOT NULL
);
";

/// Every migration, in order: (version, SQL). Append only; never edit a released one.
const MIGRATIONS: [(i32, &str); 2] = [(1, V1), (2, V2)];

/// Brings the database to the newest schema this server knows.
pub(super) async fn migrate(client: &mut Object) -> Result<(), StoreError> {
    let tx = client
        .transaction()
        .await
        .map_err(pg("begin the migrations"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg("take the migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS corral_schema (
            version    INTEGER PRIMARY KEY,
            applied_at BIGINT NOT NULL
        )",
    )
    .await
    .map_err(pg("create the schema table"))?;
    let have: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM corral_schema", &[])
        .await
        .map_err(pg("read the schema version"))?
        .get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if have > known {
        return Err(StoreError::SchemaTooNew { have, known });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
        tx.batch_execute(sql)
            .await
            .map_err(pg("apply a migration"))?;
        tx.execute(
            "INSERT INTO corral_schema (version, applied_at) VALUES ($1, $2)",
            &[version, &to_i64(now_unix_nano())],
        )
        .await
        .map_err(pg("record a migration"))?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().await.map_err(pg("commit the migrations"))
}

/// Names the failed database operation in the error.
pub(super) fn pg(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Pg { op, source }
}

/// PostgreSQL integers are signed: a u64 above `i64::MAX` is stored as `i64::MAX`.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored (non-negative) integer back.
pub(super) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
