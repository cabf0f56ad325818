//! Policy storage: every change is one new global, monotonic revision; history is kept.
//!
//! [`PolicyStore`] is the seam; [`sqlite::SqliteStore`] (embedded SQLite, WAL) is the default
//! implementation. Grants live in the same database behind [`grants::GrantStore`].

pub mod events;
pub mod grants;
pub mod sqlite;
mod sqlite_events;
mod sqlite_grants;
mod sqlite_schema;

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
}

/// Where policies and their history live.
pub trait PolicyStore: Send + Sync + 'static {
    /// The current revision and the live policies.
    fn current(&self) -> Result<StoreSnapshot, StoreError>;
    /// The live version of `name`.
    fn get(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError>;
    /// Every version of `name`, oldest first (deletions included).
    fn history(&self, name: &str) -> Result<Vec<PolicyRecord>, StoreError>;
    /// Commits `change` as revision `base + 1`, if the store is still at `base`.
    fn commit(&self, base: u64, change: &Change) -> Result<u64, StoreError>;
}

/// Unix time now, in nanoseconds.
pub fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
