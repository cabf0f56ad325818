//! The grant book's pure parts: which principals a grant covers, the keys it installs, expiry
//! conversion, and the diff against what is installed (index reuse, policy re-keying).

use std::{path::PathBuf, sync::Arc};

use agent_common::{ANY_PORT, ANY_PROTO, PROTO_TCP};

use super::*;
use corral_policy::compile_str;

const SEC: u64 = 1_000_000_000;

/// Zones `internet` (0) and `db` (1); template `crm` on db:5433/tcp, `db-any` on db.
const V1: &str = r#"apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: { name: agents }
spec:
  identities: [spiffe://t/a, spiffe://t/b]
  defaultAction: deny
  zones:
    internet: { cidrs: [0.0.0.0/0] }
    db:       { cidrs: [10.20.0.0/16] }
  connect:
    - { action: allow, zones: [internet], ports: [443] }
  grants:
    - { name: crm, zones: [db], ports: [5433], protocols: [tcp], maxTtl: 15m, approval: required }
    - { name: db-any, zones: [db], maxTtl: 15m, approval: auto }
"#;

/// The same templates, but `db` is now zone 2, and `db-any` is gone.
const V2: &str = r#"apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: { name: agents }
spec:
  identities: [spiffe://t/a, spiffe://t/b]
  defaultAction: deny
  zones:
    cache:    { cidrs: [10.30.0.0/16] }
    internet: { cidrs: [0.0.0.0/0] }
    db:       { cidrs: [10.20.0.0/16] }
  connect:
    - { action: allow, zones: [internet], ports: [443] }
  grants:
    - { name: crm, zones: [db], ports: [5433], protocols: [tcp], maxTtl: 15m, approval: required }
"#;

fn compiled(src: &str) -> CompiledSet {
    compile_str("t.yaml", src, 1).expect("valid policy")
}

fn principal(index: u32, identity: &str, session: &str) -> Arc<PrincipalRecord> {
    Arc::new(PrincipalRecord {
        index,
        identity: identity.into(),
        session: session.into(),
        cgroup: PathBuf::from(format!("/sys/fs/cgroup/corral/{session}-{index}")),
        cgroup_id: 1000 + u64::from(index),
        external: false,
        opt_outs: Vec::new(),
    })
}

fn grant(id: u64, identity: &str, session: &str, template: &str, expires: u64) -> DesiredGrant {
    DesiredGrant {
        id,
        identity: identity.into(),
        session: session.into(),
        template: template.into(),
        expires_unix_ns: expires,
    }
}

const CLOCK: Clock = Clock {
    unix_ns: 1_700_000_000 * SEC,
    boot_ns: 50 * SEC,
};

fn key(principal: u32, zone: u32, port: u16, proto: u8) -> GrantKey {
    GrantKey {
        principal,
        zone,
        port,
        proto,
        _pad: 0,
    }
}

fn principals_of(d: &Desired) -> BTreeSet<u32> {
    d.entries.keys().map(|k| k.principal).collect()
}

#[test]
fn session_bound_grants_cover_one_session_identity_wide_grants_all() {
    let c = compiled(V1);
    let ps = vec![
        principal(1, "spiffe://t/a", "s1"),
        principal(2, "spiffe://t/a", "s2"),
        principal(3, "spiffe://t/b", "s1"),
    ];
    let exp = CLOCK.unix_ns + 60 * SEC;
    let bound = desired(
        &[grant(7, "spiffe://t/a", "s1", "crm", exp)],
        &ps,
        &c,
        &CLOCK,
    );
    assert_eq!(principals_of(&bound), BTreeSet::from([1]));
    assert_eq!(
        bound.entries.get(&key(1, 1, 5433, PROTO_TCP)),
        Some(&GrantValue {
            expires_ns: CLOCK.boot_ns + 60 * SEC,
            grant_id: 7
        })
    );
    assert_eq!(bound.entries.len(), 1);

    let wide = desired(
        &[grant(8, "spiffe://t/a", "", "db-any", exp)],
        &ps,
        &c,
        &CLOCK,
    );
    // Both sessions of a, not b (another identity, even with the same session name).
    assert_eq!(principals_of(&wide), BTreeSet::from([1, 2]));
    assert!(wide.entries.contains_key(&key(2, 1, ANY_PORT, ANY_PROTO)));
    // Exact identity match: no pattern matching on grants.
    let none = desired(&[grant(9, "spiffe://t/*", "", "crm", exp)], &ps, &c, &CLOCK);
    assert!(none.entries.is_empty());
}

#[test]
fn a_template_missing_from_the_policy_is_skipped_and_reported() {
    let c = compiled(V2);
    let ps = vec![principal(4, "spiffe://t/a", "s")];
    let exp = CLOCK.unix_ns + 60 * SEC;
    let d = desired(
        &[
            grant(1, "spiffe://t/a", "", "db-any", exp),
            grant(2, "spiffe://t/a", "", "crm", exp),
        ],
        &ps,
        &c,
        &CLOCK,
    );
    assert_eq!(
        d.missing.into_iter().collect::<Vec<_>>(),
        vec![Missing {
            grant: 1,
            principal: 4,
            template: "db-any".into()
        }]
    );
    // The other grant is still installed.
    assert_eq!(d.entries.len(), 1);
    assert!(d.entries.contains_key(&key(4, 2, 5433, PROTO_TCP)));
}

#[test]
fn expiry_is_converted_to_boottime_and_expired_grants_are_left_out() {
    assert_eq!(
        CLOCK.boottime_of(CLOCK.unix_ns + 1),
        Some(CLOCK.boot_ns + 1)
    );
    assert_eq!(
        CLOCK.boottime_of(CLOCK.unix_ns + 600 * SEC),
        Some(CLOCK.boot_ns + 600 * SEC)
    );
    assert_eq!(CLOCK.boottime_of(CLOCK.unix_ns), None);
    assert_eq!(CLOCK.boottime_of(CLOCK.unix_ns - SEC), None);
    assert_eq!(CLOCK.boottime_of(0), None);

    let c = compiled(V1);
    let ps = vec![principal(1, "spiffe://t/a", "s")];
    let d = desired(
        &[
            grant(1, "spiffe://t/a", "", "crm", CLOCK.unix_ns - 1),
            grant(2, "spiffe://t/a", "", "crm", CLOCK.unix_ns + 5 * SEC),
        ],
        &ps,
        &c,
        &CLOCK,
    );
    assert_eq!(
        d.entries.values().collect::<Vec<_>>(),
        vec![&GrantValue {
            expires_ns: CLOCK.boot_ns + 5 * SEC,
            grant_id: 2
        }]
    );
}

#[test]
fn overlapping_grants_keep_the_later_expiry() {
    let c = compiled(V1);
    let ps = vec![principal(1, "spiffe://t/a", "s")];
    let early = grant(1, "spiffe://t/a", "", "crm", CLOCK.unix_ns + 10 * SEC);
    let late = grant(2, "spiffe://t/a", "s", "crm", CLOCK.unix_ns + 20 * SEC);
    for order in [
        vec![early.clone(), late.clone()],
        vec![late.clone(), early.clone()],
    ] {
        let d = desired(&order, &ps, &c, &CLOCK);
        assert_eq!(d.entries[&key(1, 1, 5433, PROTO_TCP)].grant_id, 2);
    }
}

#[test]
fn a_reused_index_does_not_inherit_the_old_principals_grants() {
    let c = compiled(V1);
    let exp = CLOCK.unix_ns + 60 * SEC;
    let grants = [grant(7, "spiffe://t/a", "s1", "crm", exp)];
    let before = desired(&grants, &[principal(5, "spiffe://t/a", "s1")], &c, &CLOCK);
    assert_eq!(before.entries.len(), 1);
    // a/s1 went; index 5 now belongs to b/s1, which no grant covers.
    let after = desired(&grants, &[principal(5, "spiffe://t/b", "s1")], &c, &CLOCK);
    let d = diff(&before.entries, &after.entries);
    assert_eq!(d.stale, vec![key(5, 1, 5433, PROTO_TCP)]);
    assert!(d.new.is_empty() && d.changed.is_empty());
    // A different session of the same identity is not covered by a session-bound grant.
    let other = desired(&grants, &[principal(5, "spiffe://t/a", "s2")], &c, &CLOCK);
    assert_eq!(diff(&before.entries, &other.entries).stale.len(), 1);
}

#[test]
fn a_policy_change_rekeys_grants_by_the_new_zone_indices() {
    let ps = vec![principal(1, "spiffe://t/a", "s")];
    let exp = CLOCK.unix_ns + 60 * SEC;
    let grants = [
        grant(7, "spiffe://t/a", "", "crm", exp),
        grant(8, "spiffe://t/a", "", "db-any", exp),
    ];
    let v1 = desired(&grants, &ps, &compiled(V1), &CLOCK);
    let v2 = desired(&grants, &ps, &compiled(V2), &CLOCK);
    let d = diff(&v1.entries, &v2.entries);
    // Zone 1 (db under v1) would be `internet` under v2: both old keys must go before the
    // flip; the crm key under db's new index (2) comes after it.
    assert_eq!(
        d.stale,
        vec![key(1, 1, ANY_PORT, ANY_PROTO), key(1, 1, 5433, PROTO_TCP)]
    );
    assert_eq!(
        d.new,
        vec![(
            key(1, 2, 5433, PROTO_TCP),
            GrantValue {
                expires_ns: CLOCK.boot_ns + 60 * SEC,
                grant_id: 7
            }
        )]
    );
}

#[test]
fn diff_ignores_clock_jitter_but_not_another_grant() {
    let k = key(1, 1, 5433, PROTO_TCP);
    let v = GrantValue {
        expires_ns: 100 * SEC,
        grant_id: 7,
    };
    let installed = HashMap::from([(k, v)]);
    let jitter = GrantValue {
        expires_ns: v.expires_ns + EXPIRY_SLACK_NS / 2,
        ..v
    };
    assert!(diff(&installed, &HashMap::from([(k, jitter)])).is_empty());
    let extended = GrantValue {
        expires_ns: v.expires_ns + 60 * SEC,
        ..v
    };
    assert_eq!(
        diff(&installed, &HashMap::from([(k, extended)])).changed,
        vec![(k, extended)]
    );
    let other = GrantValue { grant_id: 9, ..v };
    assert_eq!(
        diff(&installed, &HashMap::from([(k, other)])).changed,
        vec![(k, other)]
    );
    assert_eq!(diff(&installed, &HashMap::new()).stale, vec![k]);
}

#[test]
fn grant_ids_parse_from_the_wire() {
    let g = |id: &str| pb::ActiveGrant {
        id: id.into(),
        identity: "spiffe://t/a".into(),
        session: String::new(),
        grant: "crm".into(),
        expires_unix_nano: 5,
    };
    let ok = DesiredGrant::from_pb(&g("18446744073709551615")).expect("u64::MAX");
    assert_eq!(ok.id, u64::MAX);
    assert_eq!(ok.template, "crm");
    assert!(matches!(
        DesiredGrant::from_pb(&g("x1")),
        Err(GrantError::Id { .. })
    ));
    assert!(matches!(
        DesiredGrant::from_pb(&g("-1")),
        Err(GrantError::Id { .. })
    ));
    assert!(matches!(
        DesiredGrant::from_pb(&g("0")),
        Err(GrantError::ZeroId)
    ));
}

#[test]
fn the_managed_book_persists_and_standalone_stays_empty() {
    let dir = std::env::temp_dir().join(format!("corral-grants-{}", std::process::id()));
    let path = dir.join("grants.json");
    let snap = pb::Snapshot {
        grants: vec![
            pb::ActiveGrant {
                id: "12".into(),
                identity: "spiffe://t/a".into(),
                session: "s".into(),
                grant: "crm".into(),
                expires_unix_nano: 99,
            },
            pb::ActiveGrant {
                id: "bad".into(),
                ..Default::default()
            },
        ],
        grants_version: 3,
        ..Default::default()
    };
    let book = GrantBook::managed(path.clone());
    assert!(book.set_from_snapshot(&snap));
    assert!(!book.set_from_snapshot(&snap), "same grants: no change");
    let again = GrantBook::managed(path);
    assert_eq!(again.version(), 3);
    assert_eq!(
        again.grants(),
        vec![grant(12, "spiffe://t/a", "s", "crm", 99)]
    );
    let standalone = GrantBook::standalone();
    assert!(!standalone.set_from_snapshot(&snap));
    assert!(standalone.grants().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
