//! Network enforcement against the real kernel: each test enrols its own cgroup, runs real
//! processes (`corral-probe`) in it, and asserts what a user relies on: denied calls fail with
//! EPERM, allowed ones succeed, and the recorded decision says why.

use std::{
    net::{IpAddr, Ipv4Addr, TcpStream},
    time::Duration,
};

use agent_common::{GrantKey, GrantValue, PROTO_TCP, PROTO_UDP};
use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, Reason, Verdict},
};
use corral_tests::{
    Listener, Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_in,
};

fn ok() -> Outcome {
    Outcome::Ok
}

/// Loads the programs and enrols `cg` as principal `index` under policy slot 0.
fn enforcer_with(cg: &TestCgroup, index: u32) -> anyhow::Result<Enforcer> {
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps()
        .add_principal(cg.id()?, cg.level(), index, Some(0))?;
    Ok(e)
}

#[test]
fn tcp_udp_sendto_ipv6_mapped_and_fast_open() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let l4 = Listener::tcp("127.0.0.1:0")?;
    let l6 = Listener::tcp("[::1]:0")?;
    let cg = TestCgroup::new("net-kinds")?;
    let mut e = enforcer_with(&cg, 1)?;
    // Allowed: TCP to l4.port and l6.port; UDP to 5353. Everything else on loopback denied.
    e.maps().apply(
        &set(
            1,
            vec![
                policy("kinds")
                    .zone("local", &["127.0.0.0/8", "::1/128"])
                    .allow(&["local"], &[l4.port, l6.port], &[PROTO_TCP])
                    .allow(&["local"], &[5353], &[PROTO_UDP])
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let (p4, p6) = (l4.port, l6.port);
    let got = probe_in(
        &cg.path,
        &[
            &format!("tcp:127.0.0.1:{p4}"),
            &format!("tcp:127.0.0.1:{p6}"),
            &format!("tcp:[::1]:{p6}"),
            &format!("tcp:[::1]:{p4}"),
            &format!("tcp:[::ffff:127.0.0.1]:{p4}"),
            &format!("tcp:[::ffff:127.0.0.1]:{}", p4 ^ 1),
            "udp:127.0.0.1:5353",
            "udp:127.0.0.1:5354",
            "udp:[::1]:5353",
            "udp:[::1]:5354",
            "sendto:127.0.0.1:5353",
            "sendto:127.0.0.1:5354",
            "sendto:[::1]:5354",
            "sendto:[::ffff:127.0.0.1]:5354",
            &format!("tfo:127.0.0.1:{}", p4 ^ 1),
            &format!("tfo:[::1]:{}", p6 ^ 1),
        ],
    )?;
    let want = vec![
        ok(),
        Outcome::Errno("ECONNREFUSED".into()), // allowed (p6 is a TCP port too) but nothing listens on v4
        ok(),
        Outcome::Errno("ECONNREFUSED".into()),
        ok(),             // IPv4-mapped decided as IPv4: allowed port
        Outcome::eperm(), // IPv4-mapped decided as IPv4: denied port
        ok(),
        Outcome::eperm(),
        ok(),
        Outcome::eperm(),
        ok(),
        Outcome::eperm(),
        Outcome::eperm(),
        Outcome::eperm(),
        Outcome::eperm(), // TCP fast open to a denied port
        Outcome::eperm(),
    ];
    // ECONNREFUSED above is only possible if the port is free on that family; tolerate `ok`
    // there (another listener may hold it) but never EPERM.
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if *w == Outcome::Errno("ECONNREFUSED".into()) {
            assert_ne!(
                *g,
                Outcome::eperm(),
                "op {i}: allowed port must not be EPERM"
            );
        } else {
            assert_eq!(g, w, "op {i}");
        }
    }
    assert_eq!(got.len(), want.len());

    let events = EventReader::take(e.maps())?.drain_connects();
    let mapped = events
        .iter()
        .find(|c| c.port == p4 ^ 1 && c.proto == PROTO_TCP && c.hook == agent_common::HOOK_CONNECT6)
        .ok_or_else(|| anyhow::anyhow!("no event for the IPv4-mapped denied connect"))?;
    assert_eq!(mapped.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(mapped.header.verdict, Verdict::Deny);
    println!("ran {} ops, {} events", got.len(), events.len());
    Ok(())
}

#[test]
fn daemonised_and_nested_cgroup_children_stay_attributed() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let l = Listener::tcp("127.0.0.1:0")?;
    let cg = TestCgroup::new("net-lineage")?;
    let mut e = enforcer_with(&cg, 2)?;
    // The daemon op execs `setsid` and the probe inside the cgroup: allow exec (default deny
    // applies to exec too).
    e.maps().apply(
        &set(
            1,
            vec![
                policy("lineage")
                    .zone("local", &["127.0.0.0/8"])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let target = format!("tcp:127.0.0.1:{}", l.port);

    // Double fork + setsid: the grandchild writes its result to a file.
    let dir = std::env::temp_dir().join(format!("corral-lineage-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("daemon.out");
    probe_in(
        &cg.path,
        &[
            "--out",
            &out.to_string_lossy(),
            "daemon",
            &target,
            "udp:127.0.0.1:53",
        ],
    )?;
    let mut waited = 0;
    while !out.exists() && waited < 100 {
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    let daemon = std::fs::read_to_string(&out)?;
    assert_eq!(
        daemon.lines().collect::<Vec<_>>(),
        vec!["EPERM", "EPERM"],
        "daemonised grandchild (setsid) must still be denied"
    );

    // A child that creates and enters its own sub-cgroup.
    let got = probe_in(&cg.path, &["subcg:nested", &target])?;
    assert_eq!(
        got,
        vec![ok(), Outcome::eperm()],
        "nested sub-cgroup must still be denied"
    );

    // And the test process itself (not enrolled) connects fine.
    TcpStream::connect(("127.0.0.1", l.port))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn chaining_blocks_after_internal_zone_per_session() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let s1 = TestCgroup::new("chain-s1")?;
    let s2 = TestCgroup::new("chain-s2")?;
    let mut e = Enforcer::load_and_attach(&s1.root)?;
    // Two sessions of the same identity: two principals, one policy.
    e.maps().add_principal(s1.id()?, s1.level(), 31, Some(0))?;
    e.maps().add_principal(s2.id()?, s2.level(), 32, Some(0))?;
    e.maps().apply(
        &set(
            1,
            vec![
                policy("chain")
                    .zone("internal", &["127.0.1.0/24"])
                    .zone("external", &["127.0.2.0/24"])
                    .allow(&["internal", "external"], &[], &[])
                    .chain(&["internal"], &["external"])
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let got = probe_in(
        &s1.path,
        &["udp:127.0.2.1:9", "udp:127.0.1.1:9", "udp:127.0.2.1:9"],
    )?;
    assert_eq!(
        got,
        vec![ok(), ok(), Outcome::eperm()],
        "external is allowed until the session touched internal"
    );
    let got = probe_in(&s2.path, &["udp:127.0.2.1:9"])?;
    assert_eq!(
        got,
        vec![ok()],
        "another session of the same identity is unaffected"
    );

    let events = EventReader::take(e.maps())?.drain_connects();
    let chained = events
        .iter()
        .find(|c| c.header.reason == Reason::Chaining)
        .ok_or_else(|| anyhow::anyhow!("no chaining event in {events:?}"))?;
    assert_eq!(
        (chained.header.principal, chained.header.verdict),
        (31, Verdict::Deny)
    );
    assert_eq!(chained.addr, IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1)));
    Ok(())
}

#[test]
fn audit_mode_allows_and_records_audit_deny() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("net-audit")?;
    let mut e = enforcer_with(&cg, 4)?;
    e.maps().apply(
        &set(
            7,
            vec![
                policy("audit")
                    .zone("local", &["127.0.0.0/8"])
                    .deny(&["local"], &[9], &[])
                    .audit()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let got = probe_in(&cg.path, &["udp:127.0.0.1:9", "udp:127.0.0.1:10"])?;
    assert_eq!(got, vec![ok(), ok()], "audit mode blocks nothing");
    let events = EventReader::take(e.maps())?.drain_connects();
    let by_port = |p: u16| events.iter().find(|c| c.port == p).cloned();
    let rule = by_port(9).ok_or_else(|| anyhow::anyhow!("no event for port 9"))?;
    assert_eq!(
        (rule.header.verdict, rule.header.reason, rule.header.rule),
        (Verdict::AuditDeny, Reason::Rule, Some(0))
    );
    let dflt = by_port(10).ok_or_else(|| anyhow::anyhow!("no event for port 10"))?;
    assert_eq!(
        (dflt.header.verdict, dflt.header.reason),
        (Verdict::AuditDeny, Reason::Default)
    );
    Ok(())
}

#[test]
fn enrolled_without_policy_is_denied_and_default_allow_works() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let none = TestCgroup::new("net-nopolicy")?;
    let open = TestCgroup::new("net-defaultallow")?;
    let mut e = Enforcer::load_and_attach(&none.root)?;
    e.maps().add_principal(none.id()?, none.level(), 5, None)?;
    e.maps()
        .add_principal(open.id()?, open.level(), 6, Some(0))?;
    // Before any policy is applied: both fail closed.
    assert_eq!(
        probe_in(&open.path, &["udp:127.0.0.1:9"])?,
        vec![Outcome::eperm()]
    );
    e.maps().apply(
        &set(1, vec![policy("open").default_allow().build()]),
        |cg, _| (cg != none.id().unwrap_or(0)).then_some(0),
    )?;
    assert_eq!(
        probe_in(&none.path, &["udp:127.0.0.1:9"])?,
        vec![Outcome::eperm()]
    );
    assert_eq!(probe_in(&open.path, &["udp:127.0.0.1:9"])?, vec![ok()]);
    let events = EventReader::take(e.maps())?.drain_connects();
    assert!(
        events.iter().any(|c| c.header.principal == 5
            && c.header.reason == Reason::NoPolicy
            && c.header.verdict == Verdict::Deny),
        "no-policy deny recorded: {events:?}"
    );
    Ok(())
}

#[test]
fn expired_grant_denies_without_userspace_action() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("net-grant")?;
    let mut e = enforcer_with(&cg, 8)?;
    e.maps().apply(
        &set(
            1,
            vec![policy("grant").zone("db", &["127.0.3.0/24"]).build()],
        ),
        |_, _| Some(0),
    )?;
    assert_eq!(
        probe_in(&cg.path, &["udp:127.0.3.1:5433"])?,
        vec![Outcome::eperm()]
    );
    let ttl = Duration::from_millis(600);
    let now = boottime_ns()?;
    e.maps().add_grant(
        GrantKey {
            principal: 8,
            zone: 0,
            port: 5433,
            proto: 0,
            _pad: 0,
        },
        GrantValue {
            expires_ns: now + u64::try_from(ttl.as_nanos())?,
            grant_id: 99,
        },
    )?;
    assert_eq!(
        probe_in(&cg.path, &["udp:127.0.3.1:5433", "udp:127.0.3.1:5434"])?,
        vec![ok(), Outcome::eperm()],
        "the grant allows what it names, nothing else"
    );
    std::thread::sleep(ttl + Duration::from_millis(100));
    // No userspace action since: the kernel itself stops honouring the grant.
    assert_eq!(
        probe_in(&cg.path, &["udp:127.0.3.1:5433"])?,
        vec![Outcome::eperm()]
    );
    let events = EventReader::take(e.maps())?.drain_connects();
    assert!(
        events.iter().any(|c| c.header.reason == Reason::Grant
            && c.grant_id == 99
            && c.header.verdict == Verdict::Allow),
        "grant-allowed event with the grant id: {events:?}"
    );
    Ok(())
}

fn boottime_ns() -> anyhow::Result<u64> {
    Ok(corral_agent::clock::boottime_ns()?)
}
