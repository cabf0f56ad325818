//! [`PolicyStore`] on embedded SQLite in WAL mode. Schema:
//!
//! - `revisions(revision PK, applied_by, applied_at)`: one row per change; the global,
//!   monotonic revision is `MAX(revision)`.
//! - `policies(name, revision, yaml, applied_by, applied_at, deleted)`, primary key
//!   `(name, revision)`: every version of every policy; the live version of a name is its
//!   highest revision, unless that row is a deletion.
//! - `grants` and `grant_history`: the grant store's tables (`sqlite_grants.rs`).
//!
//! Every table is created from [`super::sqlite_schema`].

use std::{
    path::Path,
    sync::{Mutex, MutexGuard, PoisonError},
};

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{
    Change, PolicyRecord, PolicyStore, StoreError, StoreSnapshot, now_unix_nano,
    sqlite_schema::{SCHEMAS, db, to_i64},
};

const LIVE: &str = "
SELECT p.name, p.yaml, p.revision, p.applied_by, p.applied_at, p.deleted
FROM policies p
JOIN (SELECT name, MAX(revision) AS r FROM policies GROUP BY name) m
  ON p.name = m.name AND p.revision = m.r
WHERE p.deleted = 0
ORDER BY p.name";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRecord> {
    Ok(PolicyRecord {
        name: r.get(0)?,
        yaml: r.get(1)?,
        revision: r.get::<_, i64>(2)?.try_into().unwrap_or(0),
        applied_by: r.get(3)?,
        applied_unix_nano: r.get::<_, i64>(4)?.try_into().unwrap_or(0),
        deleted: r.get::<_, i64>(5)? != 0,
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open = |source| StoreError::Open {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(open)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open)?;
        tracing::debug!(journal_mode = %mode, "policy database opened");
        conn.execute_batch(
            "PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
        )
        .map_err(open)?;
        for schema in SCHEMAS {
            conn.execute_batch(schema).map_err(open)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(super) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn revision(conn: &Connection) -> Result<u64, StoreError> {
    let r: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(revision), 0) FROM revisions",
            [],
            |r| r.get(0),
        )
        .map_err(db("read the revision"))?;
    Ok(u64::try_from(r).unwrap_or(0))
}

#[async_trait::async_trait]
impl PolicyStore for SqliteStore {
    async fn current(&self) -> Result<StoreSnapshot, StoreError> {
        let mut conn = self.conn();
        // One read transaction: the revision and the set agree.
        let tx = conn.transaction().map_err(db("begin a read"))?;
        let revision = revision(&tx)?;
        let policies = {
            let mut st = tx.prepare_cached(LIVE).map_err(db("list policies"))?;
            st.query_map([], record)
                .map_err(db("list policies"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db("list policies"))?
        };
        tx.commit().map_err(db("end a read"))?;
        Ok(StoreSnapshot { revision, policies })
    }

    async fn get(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError> {
        let conn = self.conn();
        let r = conn
            .query_row(
                "SELECT name, yaml, revision, applied_by, applied_at, deleted FROM policies
                 WHERE name = ?1 ORDER BY revision DESC LIMIT 1",
                params![name],
                record,
            )
            .optional()
            .map_err(db("get a policy"))?;
        Ok(r.filter(|r| !r.deleted))
    }

    async fn history(&self, name: &str) -> Result<Vec<PolicyRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT name, yaml, revision, applied_by, applied_at, deleted FROM policies
                 WHERE name = ?1 ORDER BY revision",
            )
            .map_err(db("read history"))?;
        st.query_map(params![name], record)
            .map_err(db("read history"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("read history"))
    }

    async fn commit(&self, base: u64, change: &Change) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db("begin a change"))?;
        let current = revision(&tx)?;
        if current != base {
            return Err(StoreError::Conflict {
                expected: base,
                current,
            });
        }
        let next = current + 1;
        let now = to_i64(now_unix_nano());
        tx.execute(
            "INSERT INTO revisions (revision, applied_by, applied_at) VALUES (?1, ?2, ?3)",
            params![to_i64(next), change.applied_by, now],
        )
        .map_err(db("record the revision"))?;
        for (name, yaml) in &change.upserts {
            tx.execute(
                "INSERT INTO policies (name, revision, yaml, applied_by, applied_at, deleted)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                params![name, to_i64(next), yaml, change.applied_by, now],
            )
            .map_err(db("store a policy"))?;
        }
        for name in &change.deletes {
            tx.execute(
                "INSERT INTO policies (name, revision, yaml, applied_by, applied_at, deleted)
                 VALUES (?1, ?2, '', ?3, ?4, 1)",
                params![name, to_i64(next), change.applied_by, now],
            )
            .map_err(db("record a deletion"))?;
        }
        tx.commit().map_err(db("commit a change"))?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        conformance,
        grants::{GrantFilter, GrantStore},
    };

    /// A fresh database file (removed on drop).
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "corral-store-{name}-{}-{}.db",
                std::process::id(),
                now_unix_nano()
            ));
            let _ = std::fs::remove_file(&p);
            Self(p)
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    #[tokio::test]
    async fn the_store_behaves_and_survives_reopen() -> anyhow::Result<()> {
        let tmp = TempDb::new("conformance");
        let (a, b) = {
            let s = SqliteStore::open(&tmp.0)?;
            conformance::policies(&s).await?;
            conformance::grants(&s).await?;
            conformance::events(&s).await?;
            conformance::nodes(&s).await?;
            let all = s.list(&GrantFilter::default()).await?;
            (all[0].id, all[1].id)
        };
        let s = SqliteStore::open(&tmp.0)?;
        conformance::policies_after_three(&s).await?;
        let all = s.list(&GrantFilter::default()).await?;
        anyhow::ensure!(all.len() == 3 && (all[0].id, all[1].id) == (a, b));
        let mode: String = s
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(db("mode"))?;
        anyhow::ensure!(mode == "wal");
        Ok(())
    }
}
