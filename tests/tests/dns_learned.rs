//! Zones by host name, kernel side: an address a DNS answer opened (`LEARNED`, written here as
//! the agent's DNS proxy writes it) is decided in the name's zone, for the principal that
//! resolved it only, only until it expires, only under the policy it was matched under, and
//! never against a rule that denies the zone its address is in. Real programs, real
//! processes in real cgroups.

use std::net::IpAddr;

use agent_common::{PROTO_TCP, policy_key};
use corral_agent::{clock::boottime_ns, ebpf::Enforcer};
use corral_tests::{
    Listener, Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_in,
};

#[test]
fn a_learned_address_opens_for_its_principal_until_it_expires() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let l = Listener::tcp("127.0.0.2:0")?;
    let ip: IpAddr = "127.0.0.2".parse()?;
    let (a, b) = (
        TestCgroup::new("dns-learned-a")?,
        TestCgroup::new("dns-learned-b")?,
    );
    let mut e = Enforcer::load_and_attach(&a.root)?;
    e.maps().add_principal(a.id()?, a.level(), 1, Some(0))?;
    e.maps().add_principal(b.id()?, b.level(), 2, Some(0))?;
    let named = |rev: u64, with_deny: bool| {
        let mut p = policy("named")
            .hosts_zone("api", &["api.corral.test"])
            .zone("wide", &["0.0.0.0/0"])
            .allow(&["api"], &[l.port], &[PROTO_TCP]);
        if with_deny {
            p = p
                .zone("internal", &["127.0.0.0/8"])
                .deny(&["internal"], &[l.port], &[PROTO_TCP]);
        }
        set(rev, vec![p.build()])
    };
    e.maps().apply(&named(1, false), |_, _| Some(0))?;
    let key = policy_key(e.maps().config()?.generation & 1, 0);
    let to = format!("tcp:127.0.0.2:{}", l.port);
    let probe = |cg: &TestCgroup| probe_in(&cg.path, &[&to]);

    // Nothing learned: the address is only in `wide`, which allows nothing.
    assert_eq!(probe(&a)?, [Outcome::eperm()]);
    // Learned by principal 1 (zone 0, `api`): open for it, not for principal 2.
    let now = boottime_ns()?;
    e.maps().dns().learn(1, ip, key, 0, now + 60_000_000_000)?;
    assert_eq!(probe(&a)?, [Outcome::Ok]);
    assert_eq!(
        probe(&b)?,
        [Outcome::eperm()],
        "learned by another principal"
    );
    // Expired: closed for new connections.
    e.maps().dns().learn(2, ip, key, 0, now - 1)?;
    assert_eq!(probe(&b)?, [Outcome::eperm()], "expired");
    assert_eq!(e.maps().dns().sweep(boottime_ns()?, |_| true), 1);
    assert_eq!(e.maps().dns().len(), 1);

    // A policy swap renumbers zones: an entry learned under the old key means nothing.
    e.maps().apply(&named(2, true), |_, _| Some(0))?;
    assert_eq!(
        probe(&a)?,
        [Outcome::eperm()],
        "learned under the previous policy"
    );
    // Principal 1 learns the address again, under the policy now live.
    let relearn = |e: &mut Enforcer| -> anyhow::Result<()> {
        let key = policy_key(e.maps().config()?.generation & 1, 0);
        Ok(e.maps().dns().learn(1, ip, key, 0, now + 60_000_000_000)?)
    };
    relearn(&mut e)?;
    // The address is also in `internal`, whose rule denies the port: an allowed name cannot
    // open it (DNS rebinding to a denied range).
    assert_eq!(
        probe(&a)?,
        [Outcome::eperm()],
        "a rule denying the address's zone wins"
    );
    e.maps().apply(&named(3, false), |_, _| Some(0))?;
    relearn(&mut e)?;
    assert_eq!(
        probe(&a)?,
        [Outcome::Ok],
        "no rule denies it: the name's zone decides"
    );
    // A principal that is gone: its entries are swept.
    assert_eq!(e.maps().dns().sweep(boottime_ns()?, |p| p != 1), 1);
    assert!(e.maps().dns().is_empty());
    Ok(())
}

/// The rules `policy/src/dns_bypass.rs` adds, decided by the real kernel on UDP connects (no
/// packet leaves: connect() on UDP only decides and sets the peer).
#[test]
fn known_doh_resolvers_and_port_853_stay_closed_under_a_wide_zone() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("dns-bypass")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 1, Some(0))?;
    let src = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: bypass }\n\
         spec:\n  identities: [spiffe://test.corral/bypass]\n  defaultAction: deny\n  zones:\n    \
         api: { hosts: [api.corral.test] }\n    \
         web: { cidrs: [0.0.0.0/0] }\n    \
         quad9: { cidrs: [9.9.9.9/32] }\n  connect:\n    \
         - { action: allow, zones: [web, api], ports: [443, 853] }\n";
    // The rule names 853 for `web` explicitly, so 853 stays open there.
    let set = corral_policy::compile_str("bypass.yaml", src, 1)?;
    e.maps().apply(&set, |_, _| Some(0))?;
    let ops = [
        "udp:192.0.2.1:443", // web
        "udp:1.1.1.1:443",   // a known DoH resolver: (dns-bypass), though 0.0.0.0/0 allows
        "udp:8.8.8.8:443",   // another
        "udp:9.9.9.9:443",   // named exactly by `quad9`, which allows nothing
        "udp:192.0.2.1:853", // web names 853 explicitly
    ];
    let got = probe_in(&cg.path, &ops)?;
    assert_eq!(got[0], Outcome::Ok, "{got:?}");
    assert_eq!(
        got[1],
        Outcome::eperm(),
        "1.1.1.1:443 under 0.0.0.0/0: {got:?}"
    );
    assert_eq!(
        got[2],
        Outcome::eperm(),
        "8.8.8.8:443 under 0.0.0.0/0: {got:?}"
    );
    assert_eq!(
        got[3],
        Outcome::eperm(),
        "9.9.9.9 in a zone of its own that allows nothing: {got:?}"
    );
    assert_eq!(got[4], Outcome::Ok, "853 named by the rule: {got:?}");

    // A zone whose rules allow every port but never name 853: DoT stays closed there, and
    // a known resolver named exactly by an allowed zone is opened by it.
    let src = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: bypass }\n\
         spec:\n  identities: [spiffe://test.corral/bypass]\n  defaultAction: deny\n  zones:\n    \
         api: { hosts: [api.corral.test] }\n    \
         web: { cidrs: [0.0.0.0/0] }\n    \
         quad9: { cidrs: [9.9.9.9/32] }\n  connect:\n    \
         - { action: allow, zones: [web, quad9] }\n";
    let set = corral_policy::compile_str("bypass.yaml", src, 2)?;
    e.maps().apply(&set, |_, _| Some(0))?;
    let got = probe_in(
        &cg.path,
        &[
            "udp:192.0.2.1:8443",
            "udp:192.0.2.1:853",
            "udp:9.9.9.9:443",
            "udp:1.1.1.1:8443",
        ],
    )?;
    assert_eq!(
        got,
        [Outcome::Ok, Outcome::eperm(), Outcome::Ok, Outcome::eperm()],
        "any port but 853; 9.9.9.9 named exactly; 1.1.1.1 still closed"
    );
    Ok(())
}
