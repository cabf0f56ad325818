//! `GrantService` through its real tonic server on loopback, with a fake node on `NodeSync`.

mod harness;
mod lifecycle;
mod mtls;

use std::time::{Duration, Instant};

use corral_proto::v1::{self as pb, GrantState};
use tonic::Code;

use self::harness::*;
use crate::store::now_unix_nano;

pub(super) fn state(g: &pb::Grant) -> GrantState {
    GrantState::try_from(g.state).unwrap_or(GrantState::Unspecified)
}

pub(super) fn history(g: &pb::Grant) -> Vec<(GrantState, String)> {
    g.history
        .iter()
        .map(|h| {
            (
                GrantState::try_from(h.state).unwrap_or(GrantState::Unspecified),
                h.actor.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn refusals_are_one_clear_sentence_with_the_right_code() -> anyhow::Result<()> {
    let db = temp_db("refuse");
    let s = serve(&db, &[]).await?;
    let mut c = s.client().await?;
    let cases = [
        (
            request("crm-write", "", 60, "  "),
            Code::InvalidArgument,
            "needs a reason",
        ),
        (
            request("crm-write", "", 901, "r"),
            Code::InvalidArgument,
            "a ttl of 15m1s is over grant `crm-write`'s maxTtl of 15m",
        ),
        (
            request("crm-delete", "", 60, "r"),
            Code::NotFound,
            "offers no grant named `crm-delete` (it offers: crm-write, peek)",
        ),
        (
            pb::GrantRequest {
                identity: "spiffe://t/nobody".into(),
                ..request("crm-write", "", 60, "r")
            },
            Code::FailedPrecondition,
            "no policy governs identity `spiffe://t/nobody`",
        ),
        (
            request("crm-write", "s-unknown", 60, "r"),
            Code::FailedPrecondition,
            "unknown session: no connected node reports session `s-unknown`",
        ),
        (
            pb::GrantRequest {
                identity: String::new(),
                ..request("crm-write", "", 60, "r")
            },
            Code::InvalidArgument,
            "needs an identity",
        ),
    ];
    for (req, code, text) in cases {
        let e = c
            .request(as_user("alice", req.clone()))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
        assert!(e.message().contains(text), "{req:?}: {}", e.message());
        assert!(!e.message().contains('\n'), "one sentence: {}", e.message());
    }
    let e = c
        .approve(as_user("bob", decision("x7", "")))
        .await
        .expect_err("bad id");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .approve(as_user("bob", decision("77", "")))
        .await
        .expect_err("no such");
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "no grant with id 77")
    );
    let all = c.list(pb::ListGrantsRequest::default()).await?.into_inner();
    assert!(all.grants.is_empty(), "refusals record nothing");
    let _ = std::fs::remove_file(&db);
    Ok(())
}

#[tokio::test]
async fn auto_issues_at_once_required_waits_and_snapshots_carry_exactly_the_active_grants()
-> anyhow::Result<()> {
    let db = temp_db("flow");
    let s = serve(&db, &[]).await?;
    let mut c = s.client().await?;
    let mut events = s.events().await?;
    let (mut node, first) = Node::connect(&s, "n1").await?;
    assert!(first.grants.is_empty());
    assert_eq!(first.grants_version, 0);

    // approval: auto → ACTIVE at once, decided by "auto", expiry = now + ttl (0 = maxTtl).
    let before = now_unix_nano();
    let peek = c
        .request(as_user("alice", request("peek", "", 0, "look")))
        .await?
        .into_inner();
    assert_eq!(state(&peek), GrantState::Active);
    assert_eq!((peek.decided_by.as_str(), peek.ttl_seconds), ("auto", 60));
    assert!(
        peek.requested_by.starts_with("alice from 127.0.0.1:"),
        "{}",
        peek.requested_by
    );
    assert!(peek.expires_unix_nano >= before + 60_000_000_000);
    assert!(peek.expires_unix_nano <= now_unix_nano() + 60_000_000_000);
    assert_eq!(
        history(&peek),
        [
            (GrantState::Pending, peek.requested_by.clone()),
            (GrantState::Active, "auto".into())
        ]
    );
    let s1 = node.snapshot().await?;
    assert_eq!(s1.revision, first.revision, "same policy revision");
    assert_eq!(ids(&s1), [peek.id.as_str()]);
    assert_eq!(s1.grants[0].expires_unix_nano, peek.expires_unix_nano);
    assert_eq!(s1.grants[0].grant, "peek");
    assert!(s1.grants_version > 0);
    node.ack(&s1).await?;

    // The fleet event stream: pending then active, from the server, in order.
    let (e1, g1) = next_event(&mut events).await?;
    let (e2, g2) = next_event(&mut events).await?;
    assert_eq!(e1.node, "corral-server");
    assert_eq!(e1.principal.as_ref().map(|p| p.identity.as_str()), Some(ID));
    assert!(e1.time_unix_nano > 0 && e2.seq == e1.seq + 1);
    assert_eq!(
        (g1.id.as_str(), g1.state),
        (peek.id.as_str(), GrantState::Pending as i32)
    );
    assert_eq!(
        (g2.state, g2.actor.as_str()),
        (GrantState::Active as i32, "auto")
    );
    assert_eq!(g2.expires_unix_nano, peek.expires_unix_nano);

    // approval: required → PENDING, nothing to push.
    let crm = c
        .request(as_user("alice", request("crm-write", "", 600, "fix CRM-7")))
        .await?
        .into_inner();
    assert_eq!(
        (state(&crm), crm.expires_unix_nano, crm.policy.as_str()),
        (GrantState::Pending, 0, "agents")
    );
    assert!(
        node.quiet().await,
        "a pending grant changes nothing on nodes"
    );
    let pending = c
        .list(pb::ListGrantsRequest {
            pending_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        pending
            .grants
            .iter()
            .map(|g| g.id.clone())
            .collect::<Vec<_>>(),
        [crm.id.as_str()]
    );

    // Approve → a snapshot within milliseconds, expiry = approval time + ttl.
    let t0 = Instant::now();
    let approved = c
        .approve(as_user("bob", decision(&crm.id, "ok")))
        .await?
        .into_inner();
    let s2 = node.snapshot().await?;
    let latency = t0.elapsed();
    assert!(
        latency < Duration::from_millis(500),
        "approve → snapshot took {latency:?}"
    );
    assert_eq!(state(&approved), GrantState::Active);
    assert!(approved.decided_by.starts_with("bob from "));
    assert_eq!(
        approved.expires_unix_nano,
        approved.decided_unix_nano + 600_000_000_000
    );
    let mut want = vec![peek.id.clone(), crm.id.clone()];
    want.sort();
    let mut got = ids(&s2);
    got.sort();
    assert_eq!(got, want);
    assert!(s2.grants_version > s1.grants_version);
    node.ack(&s2).await?;

    // Revoke → gone from the next snapshot.
    let revoked = c
        .revoke(as_user("carol", decision(&peek.id, "done")))
        .await?
        .into_inner();
    assert_eq!(state(&revoked), GrantState::Revoked);
    let s3 = node.snapshot().await?;
    assert_eq!(ids(&s3), [crm.id.as_str()]);
    assert!(s3.grants_version > s2.grants_version);
    assert_eq!(s.fleet.current().grants.len(), 1);

    // List filters and the whole history.
    let one = c
        .list(pb::ListGrantsRequest {
            id: peek.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(one.grants.len(), 1);
    assert_eq!(
        history(&one.grants[0])
            .into_iter()
            .map(|h| h.0)
            .collect::<Vec<_>>(),
        [GrantState::Pending, GrantState::Active, GrantState::Revoked]
    );
    let other = c
        .list(pb::ListGrantsRequest {
            identity: "spiffe://t/agent/zz".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(other.grants.is_empty());
    let _ = std::fs::remove_file(&db);
    Ok(())
}

#[tokio::test]
async fn the_state_machine_holds_and_a_requester_cannot_approve_their_own_grant()
-> anyhow::Result<()> {
    let db = temp_db("sm");
    let s = serve(&db, &[]).await?;
    let mut c = s.client().await?;
    let g = c
        .request(as_user("alice", request("crm-write", "", 60, "r")))
        .await?
        .into_inner();
    let e = c
        .approve(as_user("alice", decision(&g.id, "")))
        .await
        .expect_err("self");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("separation of duties"));
    let d = c
        .deny(as_user("bob", decision(&g.id, "not now")))
        .await?
        .into_inner();
    assert_eq!(state(&d), GrantState::Denied);
    assert_eq!(d.expires_unix_nano, 0);
    assert_eq!(d.history.last().map(|h| h.reason.as_str()), Some("not now"));
    for r in [
        c.approve(as_user("bob", decision(&g.id, ""))).await,
        c.revoke(as_user("bob", decision(&g.id, ""))).await,
        c.deny(as_user("bob", decision(&g.id, ""))).await,
    ] {
        let e = r.expect_err("a denied grant is final");
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(
            e.message()
                .starts_with(&format!("grant {} is denied; only ", g.id)),
            "{}",
            e.message()
        );
    }
    // Approve twice: the second is refused; revoke works once.
    let g = c
        .request(as_user("alice", request("crm-write", "", 60, "r")))
        .await?
        .into_inner();
    c.approve(as_user("bob", decision(&g.id, ""))).await?;
    let e = c
        .approve(as_user("carol", decision(&g.id, "")))
        .await
        .expect_err("twice");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        state(
            &c.revoke(as_user("alice", decision(&g.id, "")))
                .await?
                .into_inner()
        ),
        GrantState::Revoked
    );
    assert_eq!(
        c.revoke(as_user("alice", decision(&g.id, "")))
            .await
            .expect_err("twice")
            .code(),
        Code::FailedPrecondition
    );
    // A pending grant may be revoked (withdrawn).
    let g = c
        .request(as_user("alice", request("crm-write", "", 60, "r")))
        .await?
        .into_inner();
    assert_eq!(
        state(
            &c.revoke(as_user("alice", decision(&g.id, "withdrawn")))
                .await?
                .into_inner()
        ),
        GrantState::Revoked
    );
    // Two nameless callers count as the same one.
    let g = c
        .request(request("crm-write", "", 60, "r"))
        .await?
        .into_inner();
    assert_eq!(g.requested_by.split(' ').next(), Some("unknown"));
    assert_eq!(
        c.approve(decision(&g.id, ""))
            .await
            .expect_err("same")
            .code(),
        Code::PermissionDenied
    );
    let _ = std::fs::remove_file(&db);
    Ok(())
}

#[tokio::test]
async fn with_approvers_only_they_decide_and_revoke_is_theirs_or_the_requesters()
-> anyhow::Result<()> {
    let db = temp_db("approvers");
    let s = serve(&db, &["bob", "dana"]).await?;
    let mut c = s.client().await?;
    let g = c
        .request(as_user("alice", request("crm-write", "", 60, "r")))
        .await?
        .into_inner();
    for r in [
        c.approve(as_user("carol", decision(&g.id, ""))).await,
        c.deny(as_user("carol", decision(&g.id, ""))).await,
        c.deny(as_user("alice", decision(&g.id, ""))).await,
        c.revoke(as_user("carol", decision(&g.id, ""))).await,
    ] {
        let e = r.expect_err("not an approver");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    }
    let a = c
        .approve(as_user("bob", decision(&g.id, "")))
        .await?
        .into_inner();
    assert_eq!(state(&a), GrantState::Active);
    assert_eq!(
        c.revoke(as_user("carol", decision(&g.id, "")))
            .await
            .expect_err("neither")
            .code(),
        Code::PermissionDenied
    );
    // The requester may give up their own grant.
    assert_eq!(
        state(
            &c.revoke(as_user("alice", decision(&g.id, "")))
                .await?
                .into_inner()
        ),
        GrantState::Revoked
    );
    // An approver who requested may still not approve their own request.
    let g = c
        .request(as_user("dana", request("crm-write", "", 60, "r")))
        .await?
        .into_inner();
    assert_eq!(
        c.approve(as_user("dana", decision(&g.id, "")))
            .await
            .expect_err("self")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        state(
            &c.approve(as_user("bob", decision(&g.id, "")))
                .await?
                .into_inner()
        ),
        GrantState::Active
    );
    let _ = std::fs::remove_file(&db);
    Ok(())
}
