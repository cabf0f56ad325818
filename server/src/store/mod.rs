//! Policy storage: every change is one new global, monotonic revision; history is kept.
//!
//! [`PolicyStore`] is the seam, with two implementations: [`sqlite::SqliteStore`] (embedded
//! SQLite, WAL), the default, and [`postgres::PgStore`] (PostgreSQL, `--db postgres://...`).
//! Grants live in the same database behind [`grants::GrantStore`], the fleet's event history
//! behind [`events::EventLog`]. [`open`] picks the implementation from `--db`;
//! [`conformance`] is the behaviour both must show, run against each.

pub mod conformance;
pub mod events;
pub mod grants;
pub mod nodes;
pub mod postgres;
mod postgres_grants;
pub mod postgres_listen;
mod postgres_nodes;
mod postgres_schema;
pub mod sqlite;
mod sqlite_events;
mod sqlite_grants;
mod sqlite_nodes;
mod sqlite_schema;

use std::sync::Arc;

/// Everything the server keeps, in one database.
pub trait Store: PolicyStore + grants::GrantStore + events::EventLog + nodes::NodeRegistry {}
impl<T: PolicyStore + grants::GrantStore + events::EventLog + nodes::NodeRegistry> Store for T {}

/// Where `--db` points: a PostgreSQL URL (`postgres://` or `postgresql://`), else a SQLite
/// file path.
pub async fn open(db: &str) -> Result<Arc<dyn Store>, StoreError> {
    if is_postgres(db) {
        Ok(Arc::new(postgres::PgStore::connect(db).await?))
    } else {
        Ok(Arc::new(sqlite::SqliteStore::open(std::path::Path::new(
            db,
        ))?))
    }
}

/// `--db` for messages: a PostgreSQL URL without its password.
pub fn describe(db: &str) -> String {
    if is_postgres(db) {
        postgres::redacted(db)
    } else {
        db.to_owned()
    }
}

pub fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// Held while a job that must run on one replica at a time runs (see
/// [`grants::GrantStore::sweep_lock`]); released when dropped.
pub struct JobLock {
    _held: Option<Box<dyn Send + Sync>>,
}

impl JobLock {
    /// Nothing to hold: this process is the only one.
    pub fn local() -> Self {
        Self { _held: None }
    }

    pub(crate) fn holding(what: Box<dyn Send + Sync>) -> Self {
        Self { _held: Some(what) }
    }
}

/// One version of one policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub name: String,
    /// The document's YAML source, as applied.
    pub yaml: String,
    /// The global revision that created this version.
    pub revision: u64,
    pub applied_by: String,
    pub applied_unix_nano: u64,
    /// This version is a deletion (history only; never part of the current set).
    pub deleted: bool,
}

/// The policies in force at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSnapshot {
    pub revision: u64,
    /// Live (not deleted) policies, sorted by name.
    pub policies: Vec<PolicyRecord>,
}

/// One change: documents to create or replace and names to delete, applied as one revision.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub applied_by: String,
    pub upserts: Vec<(String, String)>,
    pub deletes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open the policy database {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("policy database: {op}")]
    Db {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the policy set changed concurrently (now at revision {current}, expected {expected})")]
    Conflict { expected: u64, current: u64 },
    #[error("connect to PostgreSQL at {url}")]
    PgConnect {
        /// The URL without its password.
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("PostgreSQL: {op}")]
    Pg {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: no connection from the pool")]
    PgPool(#[source] deadpool_postgres::PoolError),
    #[error("PostgreSQL: the notification connection ended")]
    PgListenEnded,
    #[error("PostgreSQL: {op}: no such row")]
    Missing { op: &'static str },
    #[error(
        "the database's schema is version {have}, newer than this server knows ({known}): \
         upgrade the server"
    )]
    SchemaTooNew { have: i32, known: i32 },
}

/// Where policies and their history live.
#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync + 'static {
    /// The current revision and the live policies.
    async fn current(&self) -> Result<StoreSnapshot, StoreError>;
    /// The live version of `name`.
    async fn get(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError>;
    /// Every version of `name`, oldest first (deletions included).
    async fn history(&self, name: &str) -> Result<Vec<PolicyRecord>, StoreError>;
    /// Commits `change` as revision `base + 1`, if the store is still at `base`.
    async fn commit(&self, base: u64, change: &Change) -> Result<u64, StoreError>;
}

/// Unix time now, in nanoseconds.
pub fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
