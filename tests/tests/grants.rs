//! Just-in-time grants against the real kernel, through the agent's grant book: a grant
//! installed by `GrantBook::reconcile` lets a denied connect through (with the grant's id on
//! the event), a grant for another session does not, removing it denies again, a policy flip
//! re-keys it under the new zone indices, and the kernel alone ends it at its expiry.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use corral_agent::{
    daemon::{
        grants::{DesiredGrant, GrantBook},
        registry::PrincipalRecord,
    },
    ebpf::{
        Enforcer,
        events::{EventReader, Reason, Verdict},
    },
};
use corral_policy::{CompiledSet, compile_str};
use corral_tests::{Listener, Outcome, TestCgroup, privileged, probe_in};

const ID: &str = "spiffe://test.corral/grants/a";

/// Loopback is zone `zone_index` (other zones before it shift it); nothing is allowed there
/// but template `loop` grants TCP to `port`.
fn policy(port: u16, shift: bool) -> anyhow::Result<CompiledSet> {
    let before = if shift {
        "    elsewhere: { cidrs: [192.0.2.0/24] }\n    more: { cidrs: [198.51.100.0/24] }\n"
    } else {
        ""
    };
    let src = format!(
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {{ name: grants }}\n\
         spec:\n  identities: [{ID}]\n  defaultAction: deny\n  zones:\n{before}    \
         local: {{ cidrs: [127.0.0.0/8] }}\n  connect:\n    \
         - {{ action: deny, zones: [local], ports: [1] }}\n  grants:\n    \
         - {{ name: loop, zones: [local], ports: [{port}], protocols: [tcp], maxTtl: 15m, \
         approval: auto }}\n"
    );
    Ok(compile_str("grants.yaml", &src, if shift { 2 } else { 1 })?)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn grant(id: u64, session: &str, ttl: Duration) -> DesiredGrant {
    DesiredGrant {
        id,
        identity: ID.into(),
        session: session.into(),
        template: "loop".into(),
        expires_unix_ns: unix_now() + ttl.as_nanos() as u64,
    }
}

#[test]
fn a_reconciled_grant_allows_until_removed_rekeyed_on_flip_and_expired_by_the_kernel()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let l = Listener::tcp("127.0.0.1:0")?;
    let target = format!("tcp:127.0.0.1:{}", l.port);
    let cg = TestCgroup::new("grants")?;
    let index = 9;
    let me = Arc::new(PrincipalRecord {
        index,
        identity: ID.into(),
        session: "s1".into(),
        cgroup: cg.path.clone(),
        cgroup_id: cg.id()?,
        external: false,
        opt_outs: Vec::new(),
    });
    let principals = vec![me];
    let v1 = policy(l.port, false)?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    let mut reader = EventReader::take(e.maps())?;
    let maps = e.maps();
    maps.add_principal(cg.id()?, cg.level(), index, Some(0))?;
    maps.apply(&v1, |_, _| Some(0))?;

    let dir = std::env::temp_dir().join(format!("corral-grants-test-{}", std::process::id()));
    let book = GrantBook::managed(PathBuf::from(&dir).join("grants.json"));
    assert_eq!(
        probe_in(&cg.path, &[&target])?,
        vec![Outcome::eperm()],
        "no grant yet"
    );

    // A grant for another session of the identity does not help this one.
    book.set(1, vec![grant(41, "s2", Duration::from_secs(60))]);
    let applied = book.reconcile(maps, &principals, Some(&v1))?;
    assert_eq!(applied.added, 0);
    assert_eq!(probe_in(&cg.path, &[&target])?, vec![Outcome::eperm()]);

    // Issued for this session: allowed, and the event names the grant.
    book.set(2, vec![grant(42, "s1", Duration::from_secs(60))]);
    let applied = book.reconcile(maps, &principals, Some(&v1))?;
    assert_eq!(applied.added, 1);
    assert_eq!(
        book.reconcile(maps, &principals, Some(&v1))?.added,
        0,
        "a second reconcile changes nothing"
    );
    reader.drain_connects();
    assert_eq!(probe_in(&cg.path, &[&target])?, vec![Outcome::Ok]);
    let ev = reader
        .drain_connects()
        .into_iter()
        .find(|c| c.port == l.port)
        .ok_or_else(|| anyhow::anyhow!("no event for the granted connect"))?;
    assert_eq!(
        (ev.header.verdict, ev.header.reason, ev.grant_id),
        (Verdict::Allow, Reason::Grant, 42)
    );

    // A new policy moves `local` from zone 0 to zone 2: the grant follows it.
    let v2 = policy(l.port, true)?;
    book.prepare_flip(maps, &principals, &v2)?;
    maps.apply(&v2, |_, _| Some(0))?;
    book.reconcile(maps, &principals, Some(&v2))?;
    let zones: BTreeSet<u32> = maps.grants()?.keys().map(|k| k.zone).collect();
    assert_eq!(zones, BTreeSet::from([2]), "re-keyed to the new zone index");
    assert_eq!(probe_in(&cg.path, &[&target])?, vec![Outcome::Ok]);

    // Revoked: denied again.
    book.set(3, vec![]);
    assert_eq!(book.reconcile(maps, &principals, Some(&v2))?.removed, 1);
    assert_eq!(probe_in(&cg.path, &[&target])?, vec![Outcome::eperm()]);

    // A short grant: the kernel stops honouring it at its expiry with no userspace step.
    book.set(4, vec![grant(43, "", Duration::from_millis(1500))]);
    book.reconcile(maps, &principals, Some(&v2))?;
    assert_eq!(probe_in(&cg.path, &[&target])?, vec![Outcome::Ok]);
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(
        probe_in(&cg.path, &[&target])?,
        vec![Outcome::eperm()],
        "expired in the kernel"
    );
    assert_eq!(
        maps.grants()?.len(),
        1,
        "still installed: only the kernel ended it"
    );
    assert_eq!(book.reconcile(maps, &principals, Some(&v2))?.removed, 1);

    // Removing the principal leaves no grant behind (its index may be reused).
    book.set(5, vec![grant(44, "s1", Duration::from_secs(60))]);
    book.reconcile(maps, &principals, Some(&v2))?;
    assert_eq!(maps.grants()?.len(), 1);
    maps.remove_principal(cg.id()?)?;
    assert!(maps.grants()?.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
