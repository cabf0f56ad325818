//! The behaviour every store implementation must show, written once and run against each:
//! SQLite in this crate's unit tests, PostgreSQL in `tests/tests/store_postgres.rs` (a real
//! cluster the test starts). Each check expects an empty database.

use anyhow::{Context as _, ensure};
use corral_proto::v1::GrantState;

use super::{
    Change, PolicyStore, StoreError, StoreSnapshot,
    events::{EventLog, EventQuery},
    grants::{GrantFilter, GrantStore, NewGrant, Transition, Transitioned},
    nodes::{NodeRecord, NodeRegistry},
};

fn change(by: &str, up: &[(&str, &str)], del: &[&str]) -> Change {
    Change {
        applied_by: by.into(),
        upserts: up.iter().map(|(n, y)| ((*n).into(), (*y).into())).collect(),
        deletes: del.iter().map(|n| (*n).into()).collect(),
    }
}

/// Revisions are one monotonic sequence, a stale base is a conflict, history is kept,
/// deletions are history only.
pub async fn policies(s: &dyn PolicyStore) -> anyhow::Result<()> {
    ensure!(
        s.current().await? == StoreSnapshot::default(),
        "empty at first"
    );
    ensure!(
        s.commit(0, &change("alice", &[("a", "A1"), ("b", "B1")], &[]))
            .await?
            == 1
    );
    ensure!(s.commit(1, &change("bob", &[("a", "A2")], &[])).await? == 2);
    ensure!(s.commit(2, &change("carol", &[], &["b"])).await? == 3);
    let late = s.commit(2, &change("late", &[("c", "C")], &[])).await;
    ensure!(
        matches!(
            late,
            Err(StoreError::Conflict {
                expected: 2,
                current: 3
            })
        ),
        "a stale base: {late:?}"
    );
    policies_after_three(s).await
}

/// What [`policies`] left, as read back (also after the store is reopened or restarted).
pub async fn policies_after_three(s: &dyn PolicyStore) -> anyhow::Result<()> {
    let cur = s.current().await?;
    ensure!(cur.revision == 3, "revision {}", cur.revision);
    ensure!(cur.policies.len() == 1, "{cur:?}");
    let a = &cur.policies[0];
    ensure!((a.name.as_str(), a.yaml.as_str(), a.revision) == ("a", "A2", 2));
    ensure!(a.applied_by == "bob" && a.applied_unix_nano > 0);
    ensure!(s.get("b").await?.is_none(), "deleted");
    ensure!(s.get("a").await?.map(|r| r.yaml).as_deref() == Some("A2"));
    let h = s.history("b").await?;
    ensure!(h.len() == 2, "{h:?}");
    ensure!(!h[0].deleted && h[1].deleted);
    ensure!((h[0].revision, h[1].revision) == (1, 3));
    ensure!(h[1].applied_by == "carol");
    ensure!(s.history("nothing").await?.is_empty());
    Ok(())
}

fn req(identity: &str, session: &str) -> NewGrant {
    NewGrant {
        identity: identity.into(),
        session: session.into(),
        template: "crm-write".into(),
        policy: "p".into(),
        ttl_seconds: 60,
        reason: "ticket 7".into(),
        requested_by: "alice from 127.0.0.1:1".into(),
        requester: "alice".into(),
        requested_unix_nano: 1_000,
    }
}

fn step<'a>(id: u64, from: &'a [GrantState], to: GrantState, actor: &'a str) -> Transition<'a> {
    Transition {
        id,
        from,
        to,
        actor,
        reason: "why",
        time_unix_nano: 2_000,
        decision: to == GrantState::Active || to == GrantState::Denied,
        expires_unix_nano: (to == GrantState::Active).then_some(62_000),
    }
}

/// Grants keep their whole history; the state machine is checked atomically; filters; ids
/// are positive, increasing and never reused; `last_seq` counts every change.
pub async fn grants(s: &dyn GrantStore) -> anyhow::Result<()> {
    ensure!(s.last_seq().await? == 0);
    let a = s.insert(&req("spiffe://t/a", "s1")).await?;
    let b = s.insert(&req("spiffe://t/b", "")).await?;
    ensure!(a.id >= 1 && b.id > a.id, "positive, increasing ids");
    ensure!(a.state == GrantState::Pending && a.history.len() == 1);
    let pending = [GrantState::Pending];
    let Transitioned::Done(g) = s
        .transition(&step(a.id, &pending, GrantState::Active, "bob"))
        .await?
    else {
        anyhow::bail!("approve failed");
    };
    ensure!((g.decided_by.as_str(), g.expires_unix_nano) == ("bob", 62_000));
    // Approving again: the state machine refuses, nothing is recorded.
    ensure!(
        s.transition(&step(a.id, &pending, GrantState::Active, "carol"))
            .await?
            == Transitioned::WrongState(GrantState::Active)
    );
    ensure!(
        s.transition(&step(999, &pending, GrantState::Active, "carol"))
            .await?
            == Transitioned::NotFound
    );
    let active = [GrantState::Active];
    ensure!(matches!(
        s.transition(&step(a.id, &active, GrantState::Revoked, "dave"))
            .await?,
        Transitioned::Done(_)
    ));
    ensure!(s.last_seq().await? >= 4);
    grants_after_four(s, a.id, b.id).await?;
    // A new grant never reuses an id.
    ensure!(s.insert(&req("spiffe://t/c", "")).await?.id > b.id);
    Ok(())
}

/// What [`grants`] left (grants `a` and `b`), as read back.
pub async fn grants_after_four(s: &dyn GrantStore, a: u64, b: u64) -> anyhow::Result<()> {
    let all = s.list(&GrantFilter::default()).await?;
    ensure!(all.len() == 2, "{all:?}");
    let g = &all[0];
    ensure!(g.id == a && g.state == GrantState::Revoked);
    ensure!(g.request == req("spiffe://t/a", "s1"));
    ensure!(
        g.decided_by == "bob",
        "revoking does not overwrite the decision"
    );
    let states: Vec<_> = g
        .history
        .iter()
        .map(|h| (h.state, h.actor.as_str()))
        .collect();
    ensure!(
        states
            == [
                (GrantState::Pending, "alice from 127.0.0.1:1"),
                (GrantState::Active, "bob"),
                (GrantState::Revoked, "dave"),
            ],
        "{states:?}"
    );
    ensure!(g.history.windows(2).all(|w| w[0].seq < w[1].seq));
    ensure!(s.last_seq().await? == g.history.last().map_or(0, |h| h.seq));
    let ids = |v: Vec<super::grants::GrantRecord>| v.iter().map(|g| g.id).collect::<Vec<_>>();
    let f = |f: GrantFilter| async move { s.list(&f).await.map(ids) };
    ensure!(
        f(GrantFilter {
            states: vec![GrantState::Pending],
            ..GrantFilter::default()
        })
        .await?
            == [b]
    );
    ensure!(
        f(GrantFilter {
            identity: Some("spiffe://t/a".into()),
            ..GrantFilter::default()
        })
        .await?
            == [a]
    );
    ensure!(
        f(GrantFilter {
            session: Some(String::new()),
            ..GrantFilter::default()
        })
        .await?
            == [b]
    );
    ensure!(
        f(GrantFilter {
            expired_by: Some(70_000),
            ..GrantFilter::default()
        })
        .await?
            == [a]
    );
    ensure!(
        f(GrantFilter {
            expired_by: Some(50_000),
            ..GrantFilter::default()
        })
        .await?
        .is_empty()
    );
    ensure!(
        f(GrantFilter {
            id: Some(b),
            states: vec![GrantState::Pending, GrantState::Active],
            ..GrantFilter::default()
        })
        .await?
            == [b]
    );
    Ok(())
}

fn ev(node: &str, at: u64) -> (String, u64, Vec<u8>) {
    (node.into(), at, at.to_le_bytes().to_vec())
}

/// The event history keeps the newest `keep` and reads back by node, time window and page.
pub async fn events(s: &dyn EventLog) -> anyhow::Result<()> {
    s.append(&[ev("a", 10), ev("b", 20), ev("a", 30)], 100)
        .await?;
    s.append(&[ev("b", 40), ev("a", 50)], 4).await?;
    let all = s
        .events(&EventQuery {
            limit: 100,
            ..EventQuery::default()
        })
        .await?;
    let times: Vec<u64> = all.iter().map(|e| e.time_unix_nano).collect();
    ensure!(
        times == [20, 30, 40, 50],
        "trimmed to the newest 4: {times:?}"
    );
    ensure!(all.windows(2).all(|w| w[0].id < w[1].id), "in order");
    let a: Vec<u64> = s
        .events(&EventQuery {
            node: "a".into(),
            since_unix_nano: 25,
            until_unix_nano: 50,
            limit: 100,
            ..EventQuery::default()
        })
        .await?
        .iter()
        .map(|e| e.time_unix_nano)
        .collect();
    ensure!(a == [30, 50], "{a:?}");
    let page = s
        .events(&EventQuery {
            after_id: all.get(1).context("two events")?.id,
            limit: 1,
            ..EventQuery::default()
        })
        .await?;
    ensure!(page.len() == 1);
    ensure!(page[0].encoded == 40u64.to_le_bytes() && page[0].node == "b");
    Ok(())
}

fn node(name: &str, replica: &str, connected: bool, acked: u64) -> NodeRecord {
    NodeRecord {
        status: corral_proto::v1::NodeStatus {
            node: name.into(),
            replica: replica.into(),
            connected,
            acked_revision: acked,
            ..Default::default()
        },
        principals: vec![("spiffe://t/a".into(), format!("{name}-s"))],
        heartbeat_unix_nano: 0,
    }
}

/// Node registrations: a replica's records read back whole; a node that moved is not taken
/// back by the replica it left; a heartbeat renews only the replica's connected nodes.
pub async fn nodes(s: &dyn NodeRegistry) -> anyhow::Result<()> {
    ensure!(s.nodes().await?.is_empty());
    s.put_nodes(
        "r1",
        &[node("n1", "r1", true, 3), node("n2", "r1", true, 3)],
        100,
    )
    .await?;
    let all = s.nodes().await?;
    ensure!(
        all == [
            NodeRecord {
                heartbeat_unix_nano: 100,
                ..node("n1", "r1", true, 3)
            },
            NodeRecord {
                heartbeat_unix_nano: 100,
                ..node("n2", "r1", true, 3)
            }
        ],
        "{all:?}"
    );
    // n1 moves to r2; r1's late view of it (disconnected) does not take it back.
    s.put_nodes("r2", &[node("n1", "r2", true, 4)], 200).await?;
    s.put_nodes("r1", &[node("n1", "r1", false, 3)], 210)
        .await?;
    let n1 = s.nodes().await?.remove(0);
    ensure!(n1.status.replica == "r2" && n1.status.connected && n1.status.acked_revision == 4);
    // r1's heartbeat renews n2 only; n2 leaving r1 is recorded.
    s.heartbeat("r1", 300).await?;
    let all = s.nodes().await?;
    ensure!(all[0].heartbeat_unix_nano == 200 && all[1].heartbeat_unix_nano == 300);
    s.put_nodes("r1", &[node("n2", "r1", false, 3)], 310)
        .await?;
    ensure!(!s.nodes().await?[1].status.connected);
    s.heartbeat("r1", 400).await?;
    ensure!(
        s.nodes().await?[1].heartbeat_unix_nano == 310,
        "a disconnected node's record ages"
    );
    Ok(())
}
