//! Grants over time: expiry, session end, server restart.

use std::time::Duration;

use corral_proto::v1::{self as pb, GrantState};
use tonic::Code;

use super::{harness::*, history, state};
use crate::store::now_unix_nano;

#[tokio::test]
async fn the_sweep_expires_active_grants_and_nodes_lose_them() -> anyhow::Result<()> {
    let db = temp_db("expiry");
    let s = serve(&db, &[]).await?;
    let mut c = s.client().await?;
    let (mut node, _) = Node::connect(&s, "n1").await?;
    let mut events = s.events().await?;
    let g = c
        .request(as_user("alice", request("peek", "", 1, "quick")))
        .await?
        .into_inner();
    let s1 = node.snapshot().await?;
    assert_eq!(ids(&s1), [g.id.as_str()]);
    node.ack(&s1).await?;
    // Expiry in 1 s; the sweep runs every 500 ms.
    let s2 = node.snapshot().await?;
    assert!(s2.grants.is_empty());
    assert!(now_unix_nano() >= g.expires_unix_nano);
    assert!(
        now_unix_nano() < g.expires_unix_nano + 1_500_000_000,
        "swept promptly"
    );
    let got = c
        .list(pb::ListGrantsRequest {
            id: g.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let h = history(&got.grants[0]);
    assert_eq!(h.last(), Some(&(GrantState::Expired, "expiry".to_owned())));
    let mut states = Vec::new();
    for _ in 0..3 {
        states.push(next_event(&mut events).await?.1.state);
    }
    assert_eq!(
        states,
        [
            GrantState::Pending as i32,
            GrantState::Active as i32,
            GrantState::Expired as i32
        ]
    );
    let _ = std::fs::remove_file(&db);
    Ok(())
}

#[tokio::test]
async fn a_session_bound_grant_ends_with_its_session_on_every_node() -> anyhow::Result<()> {
    let db = temp_db("session");
    let s = serve(&db, &[]).await?;
    let mut c = s.client().await?;
    let (mut n1, _) = Node::connect(&s, "n1").await?;
    let (n2, _) = Node::connect(&s, "n2").await?;
    n1.principals(&["s1", "s2"]).await?;
    n2.principals(&["s1"]).await?;
    until(|| s.fleet.session_known(ID, "s2")).await?;
    until(|| s.fleet.node("n2").is_some_and(|n| !n.principals.is_empty())).await?;
    let p1 = c
        .request(as_user("alice", request("crm-write", "s1", 60, "r")))
        .await?
        .into_inner();
    let a2 = c
        .request(as_user("alice", request("peek", "s2", 60, "r")))
        .await?
        .into_inner();
    let all = c
        .request(as_user("alice", request("peek", "", 60, "r")))
        .await?
        .into_inner();
    assert_eq!(state(&a2), GrantState::Active);
    // n1 acks whatever it got so far.
    loop {
        let sn = n1.snapshot().await?;
        n1.ack(&sn).await?;
        if sn.grants.len() == 2 {
            break;
        }
    }
    // s1 leaves n1 but n2 still reports it; s2 leaves n1 and nobody else has it.
    n1.principals(&[]).await?;
    let sn = n1.snapshot().await?;
    assert_eq!(
        ids(&sn),
        [all.id.as_str()],
        "the s2 grant ended; the all-sessions one did not"
    );
    n1.ack(&sn).await?;
    let get = |id: &str| pb::ListGrantsRequest {
        id: id.into(),
        ..Default::default()
    };
    let g = c.list(get(&a2.id)).await?.into_inner().grants.remove(0);
    assert_eq!(
        history(&g).last(),
        Some(&(GrantState::Ended, "session-end".to_owned()))
    );
    assert_eq!(
        state(&c.list(get(&p1.id)).await?.into_inner().grants[0]),
        GrantState::Pending
    );
    // A disconnected node's sessions no longer count for requests (and do not end grants).
    drop(n2);
    until(|| {
        !s.fleet
            .status()
            .iter()
            .any(|n| n.node == "n2" && n.connected)
    })
    .await?;
    let e = c
        .request(as_user("alice", request("crm-write", "s1", 60, "r")))
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        state(&c.list(get(&p1.id)).await?.into_inner().grants[0]),
        GrantState::Pending
    );
    // n2 comes back without s1: now it has ended everywhere.
    let (n2, _) = Node::connect(&s, "n2").await?;
    n2.principals(&[]).await?;
    until(|| s.fleet.node("n2").is_some_and(|n| n.principals.is_empty())).await?;
    let mut ended = false;
    for _ in 0..100 {
        let g = c.list(get(&p1.id)).await?.into_inner().grants.remove(0);
        if state(&g) == GrantState::Ended {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "the pending s1 grant ended with its session");
    let _ = std::fs::remove_file(&db);
    Ok(())
}

#[tokio::test]
async fn grants_survive_a_restart_and_are_pushed_again() -> anyhow::Result<()> {
    let db = temp_db("restart");
    let (id, version) = {
        let s = serve(&db, &[]).await?;
        let mut c = s.client().await?;
        let g = c
            .request(as_user("alice", request("crm-write", "", 600, "r")))
            .await?
            .into_inner();
        c.approve(as_user("bob", decision(&g.id, ""))).await?;
        c.request(as_user(
            "alice",
            request("crm-write", "", 600, "still pending"),
        ))
        .await?;
        (g.id, s.fleet.current().grants_version)
    };
    let s = serve(&db, &[]).await?;
    let cur = s.fleet.current();
    assert_eq!(
        cur.grants.iter().map(|g| g.id.clone()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert!(
        cur.grants_version >= version,
        "the version does not go back after a restart"
    );
    let (_node, first) = Node::connect(&s, "n1").await?;
    assert_eq!(ids(&first), [id]);
    let mut c = s.client().await?;
    let pending = c
        .list(pb::ListGrantsRequest {
            pending_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(pending.grants.len(), 1);
    assert_eq!(pending.grants[0].reason, "still pending");
    // Past its expiry the sweep retires it and the fleet's set is empty again.
    assert_eq!(s.grants.sweep(now_unix_nano() + 601_000_000_000).await?, 1);
    assert!(s.fleet.current().grants.is_empty());
    let _ = std::fs::remove_file(&db);
    Ok(())
}

#[tokio::test]
async fn a_pending_grant_is_approved_only_if_the_policy_in_force_still_offers_it()
-> anyhow::Result<()> {
    use crate::store::{PolicyRecord, StoreSnapshot};
    let db = temp_db("policy-change");
    let s = serve(&db, &[]).await?;
    let mut c = s.client().await?;
    let g = c
        .request(as_user("alice", request("crm-write", "", 600, "r")))
        .await?
        .into_inner();
    let publish = |revision: u64, yaml: String| {
        s.fleet.publish(&StoreSnapshot {
            revision,
            policies: vec![PolicyRecord {
                name: "agents".into(),
                yaml,
                revision,
                applied_by: "test".into(),
                applied_unix_nano: 0,
                deleted: false,
            }],
        });
    };
    publish(10, POLICY.replace("maxTtl: 15m", "maxTtl: 1m"));
    let e = c
        .approve(as_user("bob", decision(&g.id, "")))
        .await
        .expect_err("ttl now too long");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message()
            .ends_with("its ttl of 10m is now over the maxTtl of 1m"),
        "{}",
        e.message()
    );
    publish(11, POLICY.replace("name: crm-write", "name: crm-rw"));
    let e = c
        .approve(as_user("bob", decision(&g.id, "")))
        .await
        .expect_err("template gone");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("offers no grant named `crm-write`"),
        "{}",
        e.message()
    );
    publish(12, POLICY.to_owned());
    let a = c
        .approve(as_user("bob", decision(&g.id, "")))
        .await?
        .into_inner();
    assert_eq!(state(&a), GrantState::Active);
    let _ = std::fs::remove_file(&db);
    Ok(())
}
