//! [`GrantStore`] on the policy database. Schema:
//!
//! - `grants(id INTEGER PRIMARY KEY AUTOINCREMENT, ...)`: one row per request, its current
//!   state (text: `pending`, `active`, ...) and decision; ids are positive and never reused.
//! - `grant_history(seq INTEGER PRIMARY KEY AUTOINCREMENT, grant_id, at, state, actor,
//!   reason)`: one row per state change, the request included.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension as _, params, params_from_iter, types::Value};

use super::{
    StoreError,
    grants::{
        GrantFilter, GrantRecord, GrantStore, HistoryEntry, NewGrant, Transition, Transitioned,
        parse_state, state_name,
    },
    sqlite::SqliteStore,
    sqlite_schema::{db, to_i64},
};
use corral_proto::v1::GrantState;

const COLUMNS: &str = "id, identity, session, template, policy, ttl_seconds, reason, requested_by,
    requester, requested_at, state, decided_by, decided_at, decision_reason, expires_at";

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRecord> {
    Ok(GrantRecord {
        id: u(r.get(0)?),
        request: NewGrant {
            identity: r.get(1)?,
            session: r.get(2)?,
            template: r.get(3)?,
            policy: r.get(4)?,
            ttl_seconds: u(r.get(5)?),
            reason: r.get(6)?,
            requested_by: r.get(7)?,
            requester: r.get(8)?,
            requested_unix_nano: u(r.get(9)?),
        },
        state: parse_state(&r.get::<_, String>(10)?),
        decided_by: r.get(11)?,
        decided_unix_nano: u(r.get(12)?),
        decision_reason: r.get(13)?,
        expires_unix_nano: u(r.get(14)?),
        history: Vec::new(),
    })
}

/// `WHERE` clause and parameters for `f` over the `grants` table.
fn filter_sql(f: &GrantFilter) -> (String, Vec<Value>) {
    let mut cond = vec!["1".to_owned()];
    let mut args = Vec::new();
    if let Some(id) = f.id {
        args.push(Value::Integer(to_i64(id)));
        cond.push(format!("id = ?{}", args.len()));
    }
    if let Some(i) = &f.identity {
        args.push(Value::Text(i.clone()));
        cond.push(format!("identity = ?{}", args.len()));
    }
    if let Some(s) = &f.session {
        args.push(Value::Text(s.clone()));
        cond.push(format!("session = ?{}", args.len()));
    }
    if !f.states.is_empty() {
        let mut one = Vec::new();
        for s in &f.states {
            args.push(Value::Text(state_name(*s).to_owned()));
            one.push(format!("?{}", args.len()));
        }
        cond.push(format!("state IN ({})", one.join(", ")));
    }
    if let Some(t) = f.expired_by {
        args.push(Value::Integer(to_i64(t)));
        cond.push(format!("expires_at > 0 AND expires_at <= ?{}", args.len()));
    }
    (cond.join(" AND "), args)
}

fn list(conn: &Connection, f: &GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
    let (cond, args) = filter_sql(f);
    let mut grants: BTreeMap<u64, GrantRecord> = {
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM grants WHERE {cond} ORDER BY id"
            ))
            .map_err(db("list grants"))?;
        st.query_map(params_from_iter(args.iter()), grant_row)
            .map_err(db("list grants"))?
            .map(|r| r.map(|g| (g.id, g)))
            .collect::<Result<_, _>>()
            .map_err(db("list grants"))?
    };
    if grants.is_empty() {
        return Ok(Vec::new());
    }
    let mut st = conn
        .prepare(&format!(
            "SELECT grant_id, seq, at, state, actor, reason FROM grant_history
             WHERE grant_id IN (SELECT id FROM grants WHERE {cond}) ORDER BY grant_id, seq"
        ))
        .map_err(db("read grant history"))?;
    let rows = st
        .query_map(params_from_iter(args.iter()), |r| {
            Ok((
                u(r.get(0)?),
                HistoryEntry {
                    seq: u(r.get(1)?),
                    time_unix_nano: u(r.get(2)?),
                    state: parse_state(&r.get::<_, String>(3)?),
                    actor: r.get(4)?,
                    reason: r.get(5)?,
                },
            ))
        })
        .map_err(db("read grant history"))?;
    for row in rows {
        let (id, h) = row.map_err(db("read grant history"))?;
        if let Some(g) = grants.get_mut(&id) {
            g.history.push(h);
        }
    }
    Ok(grants.into_values().collect())
}

fn append_history(
    conn: &Connection,
    id: u64,
    at: u64,
    state: GrantState,
    actor: &str,
    reason: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO grant_history (grant_id, at, state, actor, reason)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![to_i64(id), to_i64(at), state_name(state), actor, reason],
    )
    .map_err(db("record a grant change"))?;
    Ok(())
}

fn one(conn: &Connection, id: u64) -> Result<Option<GrantRecord>, StoreError> {
    Ok(list(
        conn,
        &GrantFilter {
            id: Some(id),
            ..GrantFilter::default()
        },
    )?
    .pop())
}

#[async_trait::async_trait]
impl GrantStore for SqliteStore {
    async fn insert(&self, g: &NewGrant) -> Result<GrantRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db("begin a grant request"))?;
        tx.execute(
            "INSERT INTO grants (identity, session, template, policy, ttl_seconds, reason,
                 requested_by, requester, requested_at, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                g.identity,
                g.session,
                g.template,
                g.policy,
                to_i64(g.ttl_seconds),
                g.reason,
                g.requested_by,
                g.requester,
                to_i64(g.requested_unix_nano),
                state_name(GrantState::Pending),
            ],
        )
        .map_err(db("record a grant request"))?;
        let id = u(tx.last_insert_rowid());
        append_history(
            &tx,
            id,
            g.requested_unix_nano,
            GrantState::Pending,
            &g.requested_by,
            &g.reason,
        )?;
        let rec = one(&tx, id)?;
        tx.commit().map_err(db("commit a grant request"))?;
        rec.ok_or(StoreError::Db {
            op: "read back a grant request",
            source: rusqlite::Error::QueryReturnedNoRows,
        })
    }

    async fn transition(&self, t: &Transition<'_>) -> Result<Transitioned, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db("begin a grant change"))?;
        let state: Option<String> = tx
            .query_row(
                "SELECT state FROM grants WHERE id = ?1",
                params![to_i64(t.id)],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("read a grant"))?;
        let Some(state) = state.map(|s| parse_state(&s)) else {
            return Ok(Transitioned::NotFound);
        };
        if !t.from.contains(&state) {
            return Ok(Transitioned::WrongState(state));
        }
        tx.execute(
            "UPDATE grants SET state = ?2 WHERE id = ?1",
            params![to_i64(t.id), state_name(t.to)],
        )
        .map_err(db("change a grant"))?;
        if t.decision {
            tx.execute(
                "UPDATE grants SET decided_by = ?2, decided_at = ?3, decision_reason = ?4
                 WHERE id = ?1",
                params![to_i64(t.id), t.actor, to_i64(t.time_unix_nano), t.reason],
            )
            .map_err(db("record a grant decision"))?;
        }
        if let Some(e) = t.expires_unix_nano {
            tx.execute(
                "UPDATE grants SET expires_at = ?2 WHERE id = ?1",
                params![to_i64(t.id), to_i64(e)],
            )
            .map_err(db("set a grant's expiry"))?;
        }
        append_history(&tx, t.id, t.time_unix_nano, t.to, t.actor, t.reason)?;
        let rec = one(&tx, t.id)?;
        tx.commit().map_err(db("commit a grant change"))?;
        Ok(rec.map_or(Transitioned::NotFound, |r| Transitioned::Done(Box::new(r))))
    }

    async fn list(&self, f: &GrantFilter) -> Result<Vec<GrantRecord>, StoreError> {
        let mut conn = self.conn();
        // One read transaction: grants and their history agree.
        let tx = conn.transaction().map_err(db("begin a read"))?;
        let out = list(&tx, f)?;
        tx.commit().map_err(db("end a read"))?;
        Ok(out)
    }

    async fn last_seq(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        let s: i64 = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM grant_history", [], |r| {
                r.get(0)
            })
            .map_err(db("read the grant history position"))?;
        Ok(u(s))
    }
}
