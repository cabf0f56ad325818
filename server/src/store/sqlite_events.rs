//! [`EventLog`] on the server's SQLite database: table `fleet_events(id, node, at, encoded)`
//! (see `sqlite_schema.rs`), trimmed to the newest `keep` rows after every append.

use rusqlite::params;

use super::{
    events::{EventLog, EventQuery, StoredEvent},
    sqlite::SqliteStore,
    sqlite_schema::{db, to_i64},
};
use crate::store::StoreError;

#[async_trait::async_trait]
impl EventLog for SqliteStore {
    async fn append(&self, events: &[(String, u64, Vec<u8>)], keep: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin recording events"))?;
        {
            let mut st = tx
                .prepare_cached("INSERT INTO fleet_events (node, at, encoded) VALUES (?1, ?2, ?3)")
                .map_err(db("record an event"))?;
            for (node, at, encoded) in events {
                st.execute(params![node, to_i64(*at), encoded])
                    .map_err(db("record an event"))?;
            }
        }
        tx.execute(
            "DELETE FROM fleet_events WHERE id <= (SELECT MAX(id) FROM fleet_events) - ?1",
            params![to_i64(keep)],
        )
        .map_err(db("trim the event history"))?;
        tx.commit().map_err(db("commit recorded events"))
    }

    async fn events(&self, q: &EventQuery) -> Result<Vec<StoredEvent>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT id, node, at, encoded FROM fleet_events
                 WHERE id > ?1 AND (?2 = '' OR node = ?2) AND at >= ?3 AND (?4 = 0 OR at <= ?4)
                 ORDER BY id LIMIT ?5",
            )
            .map_err(db("read the event history"))?;
        st.query_map(
            params![
                to_i64(q.after_id),
                q.node,
                to_i64(q.since_unix_nano),
                to_i64(q.until_unix_nano),
                to_i64(q.limit as u64)
            ],
            |r| {
                Ok(StoredEvent {
                    id: r.get::<_, i64>(0)?.try_into().unwrap_or(0),
                    node: r.get(1)?,
                    time_unix_nano: r.get::<_, i64>(2)?.try_into().unwrap_or(0),
                    encoded: r.get(3)?,
                })
            },
        )
        .map_err(db("read the event history"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("read the event history"))
    }
}
