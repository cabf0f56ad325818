//! [`NodeRegistry`] on PostgreSQL (table `nodes`, schema version 2): every replica writes its
//! own nodes and reads everyone's.

use super::{
    StoreError,
    nodes::{NodeRecord, NodeRegistry, decode, encode_principals},
    postgres::PgStore,
    postgres_schema::{pg, to_i64, to_u64},
};

#[async_trait::async_trait]
impl NodeRegistry for PgStore {
    async fn put_nodes(
        &self,
        replica: &str,
        nodes: &[NodeRecord],
        now: u64,
    ) -> Result<(), StoreError> {
        if nodes.is_empty() {
            return Ok(());
        }
        let mut names = Vec::with_capacity(nodes.len());
        let mut connected = Vec::with_capacity(nodes.len());
        let mut status = Vec::with_capacity(nodes.len());
        let mut principals = Vec::with_capacity(nodes.len());
        for n in nodes {
            names.push(n.status.node.clone());
            connected.push(n.status.connected);
            status.push(prost::Message::encode_to_vec(&n.status));
            principals.push(encode_principals(&n.principals));
        }
        // One statement for the batch.
        self.client()
            .await?
            .execute(
                "INSERT INTO nodes (node, replica, connected, heartbeat, status, principals)
                 SELECT n, $2, c, $3, s, p
                 FROM UNNEST($1::TEXT[], $4::BOOLEAN[], $5::BYTEA[], $6::BYTEA[]) AS u(n, c, s, p)
                 ON CONFLICT (node) DO UPDATE SET replica = EXCLUDED.replica,
                    connected = EXCLUDED.connected, heartbeat = EXCLUDED.heartbeat,
                    status = EXCLUDED.status, principals = EXCLUDED.principals
                 WHERE EXCLUDED.connected OR nodes.replica = EXCLUDED.replica
                    OR NOT nodes.connected",
                &[
                    &names,
                    &replica,
                    &to_i64(now),
                    &connected,
                    &status,
                    &principals,
                ],
            )
            .await
            .map_err(pg("record nodes"))?;
        Ok(())
    }

    async fn heartbeat(&self, replica: &str, now: u64) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE nodes SET heartbeat = $1 WHERE replica = $2 AND connected",
                &[&to_i64(now), &replica],
            )
            .await
            .map_err(pg("renew the nodes' heartbeat"))?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self
            .client()
            .await?
            .query(
                "SELECT status, principals, heartbeat FROM nodes ORDER BY node",
                &[],
            )
            .await
            .map_err(pg("read the nodes"))?
            .iter()
            .map(|r| {
                let (status, principals): (Vec<u8>, Vec<u8>) = (r.get(0), r.get(1));
                decode(&status, &principals, to_u64(r.get(2)))
            })
            .collect())
    }
}
