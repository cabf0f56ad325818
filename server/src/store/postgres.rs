//! [`PolicyStore`] and [`EventLog`] on PostgreSQL (`corral-server --db postgres://...`), through
//! `tokio-postgres` with a `deadpool` connection pool; grants in `postgres_grants.rs`, the
//! schema and its migrations in `postgres_schema.rs`.
//!
//! Several replicas may share one database. A policy commit takes an advisory transaction lock
//! first, so revisions stay one monotonic sequence whichever replica commits, and a commit on
//! a stale base is a [`StoreError::Conflict`] as with SQLite. Reads of the current set are one
//! repeatable-read transaction, so the revision and the set agree.
//!
//! The connection is plaintext (`tokio_postgres::NoTls`): a URL asking for TLS
//! (`sslmode=require`) is refused when connecting, never downgraded.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{IsolationLevel, Row};

use super::{
    Change, PolicyRecord, PolicyStore, StoreError, StoreSnapshot,
    events::{EventLog, EventQuery, StoredEvent},
    now_unix_nano,
    postgres_schema::{CHANGES, COMPACT_LOCK, POLICY_LOCK, migrate, pg, to_i64, to_u64},
};

/// Connections per replica.
const POOL_SIZE: usize = 16;
/// How long a connection may take to open, and a caller may wait for one from the pool.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PgStore {
    pool: Pool,
}

const LIVE: &str = "
SELECT p.name, p.yaml, p.revision, p.applied_by, p.applied_at, p.deleted
FROM policies p
JOIN (SELECT name, MAX(revision) AS r FROM policies GROUP BY name) m
  ON p.name = m.name AND p.revision = m.r
WHERE NOT p.deleted
ORDER BY p.name";

fn record(r: &Row) -> PolicyRecord {
    PolicyRecord {
        name: r.get(0),
        yaml: r.get(1),
        revision: to_u64(r.get(2)),
        applied_by: r.get(3),
        applied_unix_nano: to_u64(r.get(4)),
        deleted: r.get(5),
    }
}

/// `url` without a password, for messages.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let user_pass = &url[s + 3..at];
            let user = user_pass.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl PgStore {
    /// Connects to `url` (a `postgres://` URL or key=value string) and brings the schema up
    /// to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::PgConnect {
            url: redacted(url),
            source,
        };
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| fail(Box::new(e)))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("corral-server");
        }
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| fail(Box::new(e)))?;
        let mut client = pool.get().await.map_err(|e| fail(Box::new(e)))?;
        migrate(&mut client).await?;
        drop(client);
        tracing::info!(url = %redacted(url), "policy database: PostgreSQL");
        Ok(Self { pool })
    }

    pub(super) async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(StoreError::PgPool)
    }
}

#[async_trait::async_trait]
impl PolicyStore for PgStore {
    async fn current(&self) -> Result<StoreSnapshot, StoreError> {
        let mut client = self.client().await?;
        // One snapshot: the revision and the set agree.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg("begin a read"))?;
        let revision = tx
            .query_one("SELECT COALESCE(MAX(revision), 0) FROM revisions", &[])
            .await
            .map_err(pg("read the revision"))?
            .get::<_, i64>(0);
        let policies = tx
            .query(LIVE, &[])
            .await
            .map_err(pg("list policies"))?
            .iter()
            .map(record)
            .collect();
        tx.commit().await.map_err(pg("end a read"))?;
        Ok(StoreSnapshot {
            revision: to_u64(revision),
            policies,
        })
    }

    async fn get(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT name, yaml, revision, applied_by, applied_at, deleted FROM policies
                 WHERE name = $1 ORDER BY revision DESC LIMIT 1",
                &[&name],
            )
            .await
            .map_err(pg("get a policy"))?;
        Ok(row.map(|r| record(&r)).filter(|r| !r.deleted))
    }

    async fn history(&self, name: &str) -> Result<Vec<PolicyRecord>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query(
                "SELECT name, yaml, revision, applied_by, applied_at, deleted FROM policies
                 WHERE name = $1 ORDER BY revision",
                &[&name],
            )
            .await
            .map_err(pg("read history"))?
            .iter()
            .map(record)
            .collect())
    }

    async fn commit(&self, base: u64, change: &Change) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("begin a change"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&POLICY_LOCK])
            .await
            .map_err(pg("take the policy lock"))?;
        let current = to_u64(
            tx.query_one("SELECT COALESCE(MAX(revision), 0) FROM revisions", &[])
                .await
                .map_err(pg("read the revision"))?
                .get(0),
        );
        if current != base {
            return Err(StoreError::Conflict {
                expected: base,
                current,
            });
        }
        let next = current + 1;
        let (rev, now) = (to_i64(next), to_i64(now_unix_nano()));
        tx.execute(
            "INSERT INTO revisions (revision, applied_by, applied_at) VALUES ($1, $2, $3)",
            &[&rev, &change.applied_by, &now],
        )
        .await
        .map_err(pg("record the revision"))?;
        let insert = tx
            .prepare(
                "INSERT INTO policies (name, revision, yaml, applied_by, applied_at, deleted)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(pg("store a policy"))?;
        for (name, yaml) in &change.upserts {
            tx.execute(
                &insert,
                &[name, &rev, yaml, &change.applied_by, &now, &false],
            )
            .await
            .map_err(pg("store a policy"))?;
        }
        for name in &change.deletes {
            tx.execute(&insert, &[name, &rev, &"", &change.applied_by, &now, &true])
                .await
                .map_err(pg("record a deletion"))?;
        }
        // Delivered at commit: the other replicas push the new revision to their nodes.
        tx.execute("SELECT pg_notify($1, 'policies')", &[&CHANGES])
            .await
            .map_err(pg("notify the replicas"))?;
        tx.commit().await.map_err(pg("commit a change"))?;
        Ok(next)
    }
}

#[async_trait::async_trait]
impl EventLog for PgStore {
    async fn append(&self, events: &[(String, u64, Vec<u8>)], keep: u64) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("begin recording events"))?;
        let insert = tx
            .prepare("INSERT INTO fleet_events (node, at, encoded) VALUES ($1, $2, $3)")
            .await
            .map_err(pg("record an event"))?;
        for (node, at, encoded) in events {
            tx.execute(&insert, &[node, &to_i64(*at), encoded])
                .await
                .map_err(pg("record an event"))?;
        }
        // Compaction runs on one replica at a time: the others' appends skip it (the next
        // append trims what they left).
        let compact: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&COMPACT_LOCK])
            .await
            .map_err(pg("take the compaction lock"))?
            .get(0);
        if compact {
            tx.execute(
                "DELETE FROM fleet_events WHERE id <= (SELECT MAX(id) FROM fleet_events) - $1",
                &[&to_i64(keep)],
            )
            .await
            .map_err(pg("trim the event history"))?;
        }
        tx.commit().await.map_err(pg("commit recorded events"))
    }

    async fn events(&self, q: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, node, at, encoded FROM fleet_events
                 WHERE id > $1 AND ($2::TEXT = '' OR node = $2) AND at >= $3 AND ($4::BIGINT = 0 OR at <= $4)
                 ORDER BY id LIMIT $5",
                &[
                    &to_i64(q.after_id),
                    &q.node,
                    &to_i64(q.since_unix_nano),
                    &to_i64(q.until_unix_nano),
                    &to_i64(q.limit as u64),
                ],
            )
            .await
            .map_err(pg("read the event history"))?;
        Ok(rows
            .iter()
            .map(|r| StoredEvent {
                id: to_u64(r.get(0)),
                node: r.get(1),
                time_unix_nano: to_u64(r.get(2)),
                encoded: r.get(3),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(
            super::redacted("postgres://corral:s3cret@db:5432/corral"),
            "postgres://corral@db:5432/corral"
        );
        assert_eq!(
            super::redacted("postgres://db/corral"),
            "postgres://db/corral"
        );
    }
}
