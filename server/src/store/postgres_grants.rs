//! [`GrantStore`] on PostgreSQL: the tables of `sqlite_grants.rs` (`grants`, `grant_history`),
//! ids from `BIGSERIAL`. Every change takes the grant advisory lock in its transaction, so the
//! history's `seq` order is commit order across replicas (the server uses the newest `seq` as
//! the grants version).

use std::collections::BTreeMap;

use corral_proto::v1::GrantState;
use tokio_postgres::{GenericClient, Row, types::ToSql};

use super::{
    StoreError,
    grants::{
        GrantFilter, GrantRecord, GrantStore, HistoryEntry, NewGrant, Transition, Transitioned,
        parse_state, state_name,
    },
    postgres::PgStore,
    postgres_schema::{CHANGES, GRANT_LOCK, SWEEP_LOCK, pg, to_i64, to_u64},
};

const COLUMNS: &str = "id, identity, session, template, policy, ttl_seconds, reason, requested_by,
    requester, requested_at, state, decided_by, decided_at, decision_reason, expires_at";

fn grant_row(r: &Row) -> GrantRecord {
    GrantRecord {
        id: to_u64(r.get(0)),
        request: NewGrant {
            identity: r.get(1),
            session: r.get(2),
            template: r.get(3),
            policy: r.get(4),
            ttl_seconds: to_u64(r.get(5)),
            reason: r.get(6),
            requested_by: r.get(7),
            requester: r.get(8),
            requested_unix_nano: to_u64(r.get(9)),
        },
        state: parse_state(r.get(10)),
        decided_by: r.get(11),
        decided_unix_nano: to_u64(r.get(12)),
        decision_reason: r.get(13),
        expires_unix_nano: to_u64(r.get(14)),
        history: Vec::new(),
    }
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// `WHERE` clause and parameters for `f` over the `grants` table.
fn filter_sql(f: &GrantFilter) -> (String, Params) {
    let mut cond = vec!["TRUE".to_owned()];
    let mut args: Params = Vec::new();
    if let Some(id) = f.id {
        args.push(Box::new(to_i64(id)));
        cond.push(format!("id = ${}", args.len()));
    }
    if let Some(i) = &f.identity {
        args.push(Box::new(i.clone()));
        cond.push(format!("identity = ${}", args.len()));
    }
    if let Some(s) = &f.session {
        args.push(Box::new(s.clone()));
        cond.push(format!("session = ${}", args.len()));
    }
    if !f.states.is_empty() {
        let states: Vec<String> = f.states.iter().map(|s| state_name(*s).to_owned()).collect();
        args.push(Box::new(states));
        cond.push(format!("state = ANY(${})", args.len()));
    }
    if let Some(t) = f.expired_by {
        args.push(Box::new(to_i64(t)));
        cond.push(format!("expires_at > 0 AND expires_at <= ${}", args.len()));
    }
    (cond.join(" AND "), args)
}

async fn list(c: &impl GenericClient, f: &GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
    let (cond, args) = filter_sql(f);
    let refs: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let mut grants: BTreeMap<u64, GrantRecord> = c
        .query(
            &format!("SELECT {COLUMNS} FROM grants WHERE {cond} ORDER BY id"),
            &refs,
        )
        .await
        .map_err(pg("list grants"))?
        .iter()
        .map(|r| {
            let g = grant_row(r);
            (g.id, g)
        })
        .collect();
    if grants.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = grants.keys().map(|id| to_i64(*id)).collect();
    let rows = c
        .query(
            "SELECT grant_id, seq, at, state, actor, reason FROM grant_history
             WHERE grant_id = ANY($1) ORDER BY grant_id, seq",
            &[&ids],
        )
        .await
        .map_err(pg("read grant history"))?;
    for r in rows {
        if let Some(g) = grants.get_mut(&to_u64(r.get(0))) {
            g.history.push(HistoryEntry {
                seq: to_u64(r.get(1)),
                time_unix_nano: to_u64(r.get(2)),
                state: parse_state(r.get(3)),
                actor: r.get(4),
                reason: r.get(5),
            });
        }
    }
    Ok(grants.into_values().collect())
}

async fn append_history(
    c: &impl GenericClient,
    id: u64,
    at: u64,
    state: GrantState,
    actor: &str,
    reason: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO grant_history (grant_id, at, state, actor, reason)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &to_i64(id),
            &to_i64(at),
            &state_name(state),
            &actor,
            &reason,
        ],
    )
    .await
    .map_err(pg("record a grant change"))?;
    // Delivered at commit: the other replicas push the new grant set to their nodes.
    c.execute("SELECT pg_notify($1, 'grants')", &[&CHANGES])
        .await
        .map_err(pg("notify the replicas"))?;
    Ok(())
}

async fn one(c: &impl GenericClient, id: u64) -> Result<Option<GrantRecord>, StoreError> {
    Ok(list(
        c,
        &GrantFilter {
            id: Some(id),
            ..GrantFilter::default()
        },
    )
    .await?
    .pop())
}

async fn lock(c: &impl GenericClient) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&GRANT_LOCK])
        .await
        .map_err(pg("take the grant lock"))?;
    Ok(())
}

/// A session advisory lock on one pooled connection: unlocked on drop, and if that fails the
/// connection is closed rather than returned to the pool, which releases it too.
struct SessionLock {
    client: Option<deadpool_postgres::Object>,
    key: i64,
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let key = self.key;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if client
                        .execute("SELECT pg_advisory_unlock($1)", &[&key])
                        .await
                        .is_err()
                    {
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

#[async_trait::async_trait]
impl GrantStore for PgStore {
    async fn sweep_lock(&self) -> Result<Option<super::JobLock>, StoreError> {
        let client = self.client().await?;
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
            .await
            .map_err(pg("take the sweep lock"))?
            .get(0);
        Ok(got.then(|| {
            super::JobLock::holding(Box::new(SessionLock {
                client: Some(client),
                key: SWEEP_LOCK,
            }))
        }))
    }

    async fn insert(&self, g: &NewGrant) -> Result<GrantRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("begin a grant request"))?;
        lock(&*tx).await?;
        let id: i64 = tx
            .query_one(
                "INSERT INTO grants (identity, session, template, policy, ttl_seconds, reason,
                     requested_by, requester, requested_at, state)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                &[
                    &g.identity,
                    &g.session,
                    &g.template,
                    &g.policy,
                    &to_i64(g.ttl_seconds),
                    &g.reason,
                    &g.requested_by,
                    &g.requester,
                    &to_i64(g.requested_unix_nano),
                    &state_name(GrantState::Pending),
                ],
            )
            .await
            .map_err(pg("record a grant request"))?
            .get(0);
        let id = to_u64(id);
        append_history(
            &*tx,
            id,
            g.requested_unix_nano,
            GrantState::Pending,
            &g.requested_by,
            &g.reason,
        )
        .await?;
        let rec = one(&*tx, id).await?;
        tx.commit().await.map_err(pg("commit a grant request"))?;
        rec.ok_or(StoreError::Missing {
            op: "read back a grant request",
        })
    }

    async fn transition(&self, t: &Transition<'_>) -> Result<Transitioned, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg("begin a grant change"))?;
        lock(&*tx).await?;
        let id = to_i64(t.id);
        let state = tx
            .query_opt("SELECT state FROM grants WHERE id = $1", &[&id])
            .await
            .map_err(pg("read a grant"))?
            .map(|r| parse_state(r.get(0)));
        let Some(state) = state else {
            return Ok(Transitioned::NotFound);
        };
        if !t.from.contains(&state) {
            return Ok(Transitioned::WrongState(state));
        }
        tx.execute(
            "UPDATE grants SET state = $2 WHERE id = $1",
            &[&id, &state_name(t.to)],
        )
        .await
        .map_err(pg("change a grant"))?;
        if t.decision {
            tx.execute(
                "UPDATE grants SET decided_by = $2, decided_at = $3, decision_reason = $4
                 WHERE id = $1",
                &[&id, &t.actor, &to_i64(t.time_unix_nano), &t.reason],
            )
            .await
            .map_err(pg("record a grant decision"))?;
        }
        if let Some(e) = t.expires_unix_nano {
            tx.execute(
                "UPDATE grants SET expires_at = $2 WHERE id = $1",
                &[&id, &to_i64(e)],
            )
            .await
            .map_err(pg("set a grant's expiry"))?;
        }
        append_history(&*tx, t.id, t.time_unix_nano, t.to, t.actor, t.reason).await?;
        let rec = one(&*tx, t.id).await?;
        tx.commit().await.map_err(pg("commit a grant change"))?;
        Ok(rec.map_or(Transitioned::NotFound, |r| Transitioned::Done(Box::new(r))))
    }

    async fn list(&self, f: &GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        let mut client = self.client().await?;
        // One snapshot: grants and their history agree.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg("begin a read"))?;
        let out = list(&*tx, f).await?;
        tx.commit().await.map_err(pg("end a read"))?;
        Ok(out)
    }

    async fn last_seq(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let s: i64 = client
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM grant_history", &[])
            .await
            .map_err(pg("read the grant history position"))?
            .get(0);
        Ok(to_u64(s))
    }
}
