//! [`NodeRegistry`] on the server's SQLite database (table `nodes`, `sqlite_schema.rs`). One
//! server owns a SQLite file, so the records only ever hold its own nodes; the behaviour is
//! the PostgreSQL one (`postgres_nodes.rs`), checked by the same suite.

use rusqlite::params;

use super::{
    StoreError,
    nodes::{NodeRecord, NodeRegistry, decode, encode_principals},
    sqlite::SqliteStore,
    sqlite_schema::{db, to_i64},
};

#[async_trait::async_trait]
impl NodeRegistry for SqliteStore {
    async fn put_nodes(
        &self,
        replica: &str,
        nodes: &[NodeRecord],
        now: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db("begin recording nodes"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO nodes (node, replica, connected, heartbeat, status, principals)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (node) DO UPDATE SET replica = excluded.replica,
                        connected = excluded.connected, heartbeat = excluded.heartbeat,
                        status = excluded.status, principals = excluded.principals
                     WHERE excluded.connected OR nodes.replica = excluded.replica
                        OR NOT nodes.connected",
                )
                .map_err(db("record a node"))?;
            for n in nodes {
                st.execute(params![
                    n.status.node,
                    replica,
                    n.status.connected,
                    to_i64(now),
                    prost::Message::encode_to_vec(&n.status),
                    encode_principals(&n.principals)
                ])
                .map_err(db("record a node"))?;
            }
        }
        tx.commit().map_err(db("commit recorded nodes"))
    }

    async fn heartbeat(&self, replica: &str, now: u64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE nodes SET heartbeat = ?1 WHERE replica = ?2 AND connected",
                params![to_i64(now), replica],
            )
            .map_err(db("renew the nodes' heartbeat"))?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT status, principals, heartbeat FROM nodes ORDER BY node")
            .map_err(db("read the nodes"))?;
        st.query_map([], |r| {
            let (status, principals): (Vec<u8>, Vec<u8>) = (r.get(0)?, r.get(1)?);
            let heartbeat: i64 = r.get(2)?;
            Ok(decode(
                &status,
                &principals,
                heartbeat.try_into().unwrap_or(0),
            ))
        })
        .map_err(db("read the nodes"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("read the nodes"))
    }
}
