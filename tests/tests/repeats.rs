//! Repeated calls on one socket (the kernel's repeat cache, `agent-ebpf/src/repeat.rs`),
//! against the real kernel: each call is still accounted for exactly (events stand for
//! `1 + repeats` calls; what a closed socket had not reported goes to the principal's
//! suppressed count), and nothing a cached allow was decided under can change without the next
//! call being decided again: a policy swap, chaining, a grant's expiry, a DNS answer's expiry.
//! A cached deny is lifted at the next call by what can lift it (a grant, a policy swap), and a
//! default deny a DNS answer could lift is never cached. Audit-denies are never cached.

use std::{net::IpAddr, time::Duration};

use agent_common::{GrantKey, GrantValue, HOOK_CONNECT4, HOOK_SENDMSG4, PROTO_UDP, policy_key};
use corral_agent::{
    clock::boottime_ns,
    ebpf::{
        Enforcer,
        events::{ConnectDecision, EventReader, Verdict},
    },
};
use corral_tests::{
    Session, TestCgroup,
    build::{policy, set},
    privileged,
};

/// A UDP socket on every loopback address, so sends get no ICMP error back (which a connected
/// UDP socket would report on its next send); it reads nothing.
fn sink() -> anyhow::Result<(std::net::UdpSocket, u16)> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let port = s.local_addr()?.port();
    Ok((s, port))
}

/// The connect events for `port` (the session's own calls only).
fn ours(reader: &mut EventReader, port: u16) -> Vec<ConnectDecision> {
    reader
        .drain_connects()
        .into_iter()
        .filter(|c| c.port == port)
        .collect()
}

fn calls(events: &[ConnectDecision]) -> u64 {
    events.iter().map(|c| 1 + u64::from(c.repeats)).sum()
}

#[test]
fn repeated_calls_are_each_accounted_for() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let to = |addr: &str| format!("{addr}:{port}");
    let cg = TestCgroup::new("repeat-count")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 41, Some(0))?;
    e.maps().apply(
        &set(
            1,
            vec![
                policy("repeat")
                    .zone("local", &["127.0.0.0/8"])
                    .allow(&["local"], &[port], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let mut reader = EventReader::take(e.maps())?;
    let mut s = Session::start(&cg.path)?;
    let dest = to("127.0.0.1");
    assert_eq!(s.cmd("udp a")?, "ok");

    // 1,000 connects: one event, the rest counted on the socket.
    assert_eq!(s.cmd(&format!("calls a connect {dest} 1000"))?, "ok=1000");
    let first = ours(&mut reader, port);
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(
        (first[0].repeats, first[0].hook, first[0].header.verdict),
        (0, HOOK_CONNECT4, Verdict::Allow)
    );

    // After the window, the next identical call reports them.
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(s.cmd(&format!("calls a connect {dest} 1"))?, "ok=1");
    let second = ours(&mut reader, port);
    assert_eq!(second.len(), 1, "{second:#?}");
    assert_eq!(second[0].repeats, 999, "the 999 calls after the first");

    // Another hook on the same socket is another call: decided, reported, then counted.
    assert_eq!(s.cmd(&format!("calls a sendto {dest} 300"))?, "ok=300");
    let third = ours(&mut reader, port);
    assert_eq!(third.len(), 1, "{third:#?}");
    assert_eq!((third[0].repeats, third[0].hook), (0, HOOK_SENDMSG4));
    assert_eq!(e.maps().suppressed_pending(), 0);

    // Closing the socket hands what it had not reported to the principal's suppressed count.
    assert_eq!(s.cmd("close a")?, "ok");
    assert_eq!(e.maps().suppressed_pending(), 299);
    assert_eq!(
        calls(&first) + calls(&second) + calls(&third) + e.maps().suppressed_pending(),
        1000 + 1 + 300,
        "every call accounted for"
    );

    // So does a socket that moves on to another destination.
    assert_eq!(s.cmd("udp b")?, "ok");
    assert_eq!(s.cmd(&format!("calls b sendto {dest} 50"))?, "ok=50");
    assert_eq!(
        s.cmd(&format!("calls b sendto {} 1", to("127.0.0.2")))?,
        "ok=1"
    );
    let fourth = ours(&mut reader, port);
    assert_eq!(fourth.len(), 2, "{fourth:#?}");
    assert_eq!(
        (fourth[0].header.suppressed, fourth[1].header.suppressed),
        (299, 49),
        "each carried on the principal's next event"
    );
    assert_eq!(e.maps().suppressed_pending(), 0);
    Ok(())
}

#[test]
fn a_cached_allow_ends_with_what_it_was_decided_under() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let to = |addr: &str| format!("{addr}:{port}");
    let cg = TestCgroup::new("repeat-moves")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 42, Some(0))?;
    // `b` is denied once the session has contacted `a`; `g` is allowed only by a grant.
    let chained = |revision| {
        set(
            revision,
            vec![
                policy("moves")
                    .zone("b", &["127.0.0.1/32"])
                    .zone("a", &["127.0.0.3/32"])
                    .zone("g", &["127.0.0.4/32"])
                    .allow(&["a", "b"], &[port], &[PROTO_UDP])
                    // Named by a rule (for another port), so it is a zone in the kernel.
                    .allow(&["g"], &[1], &[PROTO_UDP])
                    .chain(&["a"], &["b"])
                    .allow_all_exec()
                    .build(),
            ],
        )
    };
    e.maps().apply(&chained(1), |_, _| Some(0))?;
    let mut reader = EventReader::take(e.maps())?;
    let mut s = Session::start(&cg.path)?;
    let (b, a, g) = (to("127.0.0.1"), to("127.0.0.3"), to("127.0.0.4"));

    // Chaining: a cached allow to `b` ends when the session reaches `a` on another socket.
    assert_eq!(s.cmd("udp s")?, "ok");
    assert_eq!(s.cmd(&format!("calls s sendto {b} 20"))?, "ok=20");
    assert_eq!(s.cmd(&format!("op udp:{a}"))?, "ok");
    assert_eq!(s.cmd(&format!("calls s sendto {b} 3"))?, "ok=0 EPERM=3");

    // A policy swap: a new principal state, the same socket's allow decided again.
    e.maps().remove_principal(cg.id()?)?;
    e.maps().add_principal(cg.id()?, cg.level(), 43, Some(0))?;
    assert_eq!(s.cmd(&format!("calls s sendto {b} 20"))?, "ok=20");
    e.maps().apply(
        &set(
            2,
            vec![
                policy("closed")
                    .zone("b", &["127.0.0.1/32"])
                    .deny(&["b"], &[port], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    assert_eq!(s.cmd(&format!("calls s sendto {b} 3"))?, "ok=0 EPERM=3");

    // A grant's expiry: allowed by it until it expires, with no agent to notice.
    let set3 = chained(3);
    let zone_g = set3.policies[0]
        .zones
        .iter()
        .position(|z| z.name == "g")
        .map(u32::try_from)
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("zone g"))?;
    e.maps().apply(&set3, |_, _| Some(0))?;
    e.maps().add_grant(
        GrantKey {
            principal: 43,
            zone: zone_g,
            port,
            proto: PROTO_UDP,
            _pad: 0,
        },
        GrantValue {
            expires_ns: boottime_ns()? + 1_500_000_000,
            grant_id: 4_242,
        },
    )?;
    let r = s.cmd(&format!("calls s connect {g} 50"))?;
    assert_eq!(r, "ok=50");
    std::thread::sleep(Duration::from_millis(1_600));
    assert_eq!(s.cmd(&format!("calls s connect {g} 3"))?, "ok=0 EPERM=3");

    // An address a DNS answer opened: allowed until the answer expires.
    e.maps().apply(
        &set(
            4,
            vec![
                policy("named")
                    .hosts_zone("api", &["api.corral.test"])
                    .allow(&["api"], &[port], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let key = policy_key(e.maps().config()?.generation & 1, 0);
    let ip: IpAddr = "127.0.0.5".parse()?;
    e.maps()
        .dns()
        .learn(43, ip, key, 0, boottime_ns()? + 1_000_000_000)?;
    let named = to("127.0.0.5");
    // (A socket of its own: `s` is connected to `g`, now denied, so it is cut.)
    assert_eq!(s.cmd("udp n")?, "ok");
    assert_eq!(s.cmd(&format!("calls n sendto {named} 50"))?, "ok=50");
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(s.cmd(&format!("calls n sendto {named} 3"))?, "ok=0 EPERM=3");

    // Audit mode: every audit-deny is its own event, never cached.
    e.maps().apply(
        &set(
            5,
            vec![
                policy("audit")
                    .zone("b", &["127.0.0.1/32"])
                    .audit()
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let _ = ours(&mut reader, port);
    assert_eq!(s.cmd("udp u")?, "ok");
    assert_eq!(s.cmd(&format!("calls u sendto {b} 7"))?, "ok=7");
    let audited = ours(&mut reader, port);
    assert_eq!(audited.len(), 7, "{audited:#?}");
    assert!(
        audited
            .iter()
            .all(|c| c.header.verdict == Verdict::AuditDeny && c.repeats == 0)
    );
    Ok(())
}

#[test]
fn repeated_denies_are_each_accounted_for_and_lifted_at_once() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let to = |addr: &str| format!("{addr}:{port}");
    let cg = TestCgroup::new("repeat-deny")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 46, Some(0))?;
    // `d` is denied by a rule; `g` by the default (a rule for another port makes it a zone).
    let denying = |revision| {
        set(
            revision,
            vec![
                policy("denying")
                    .zone("d", &["127.0.0.1/32"])
                    .zone("g", &["127.0.0.4/32"])
                    .deny(&["d"], &[port], &[PROTO_UDP])
                    .allow(&["g"], &[1], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
            ],
        )
    };
    let set1 = denying(1);
    e.maps().apply(&set1, |_, _| Some(0))?;
    let mut reader = EventReader::take(e.maps())?;
    let mut s = Session::start(&cg.path)?;
    let (d, g) = (to("127.0.0.1"), to("127.0.0.4"));

    // 500 denied sends: every one EPERM, one event, the rest counted on the socket.
    assert_eq!(s.cmd("udp a")?, "ok");
    assert_eq!(s.cmd(&format!("calls a sendto {d} 500"))?, "ok=0 EPERM=500");
    let first = ours(&mut reader, port);
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(
        (first[0].repeats, first[0].header.verdict),
        (0, Verdict::Deny)
    );
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(s.cmd(&format!("calls a sendto {d} 1"))?, "ok=0 EPERM=1");
    let second = ours(&mut reader, port);
    assert_eq!(second.len(), 1, "{second:#?}");
    assert_eq!(
        (second[0].repeats, second[0].header.verdict),
        (499, Verdict::Deny)
    );
    assert_eq!(
        calls(&first) + calls(&second),
        501,
        "every denied call accounted for"
    );

    // A default deny, cached, is lifted by a grant at the next call ("ask a person").
    assert_eq!(s.cmd("udp b")?, "ok");
    assert_eq!(s.cmd(&format!("calls b sendto {g} 20"))?, "ok=0 EPERM=20");
    let zone_g = set1.policies[0]
        .zones
        .iter()
        .position(|z| z.name == "g")
        .map(u32::try_from)
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("zone g"))?;
    e.maps().add_grant(
        GrantKey {
            principal: 46,
            zone: zone_g,
            port,
            proto: PROTO_UDP,
            _pad: 0,
        },
        GrantValue {
            expires_ns: boottime_ns()? + 60_000_000_000,
            grant_id: 4_243,
        },
    )?;
    assert_eq!(s.cmd(&format!("calls b sendto {g} 1"))?, "ok=1");

    // A rule's deny, cached, is lifted by a policy that allows it at the next call.
    assert_eq!(s.cmd(&format!("calls a sendto {d} 20"))?, "ok=0 EPERM=20");
    e.maps().apply(
        &set(
            2,
            vec![
                policy("open")
                    .zone("d", &["127.0.0.1/32"])
                    .allow(&["d"], &[port], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    assert_eq!(s.cmd(&format!("calls a sendto {d} 1"))?, "ok=1");

    // Under a policy with zones by host name, a default deny is not cached: a DNS answer
    // opens the address at the next call, and each denied call is its own event.
    e.maps().apply(
        &set(
            3,
            vec![
                policy("named")
                    .hosts_zone("api", &["api.corral.test"])
                    .allow(&["api"], &[port], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let _ = ours(&mut reader, port);
    let named = to("127.0.0.5");
    assert_eq!(s.cmd("udp n")?, "ok");
    assert_eq!(s.cmd(&format!("calls n sendto {named} 5"))?, "ok=0 EPERM=5");
    let each = ours(&mut reader, port);
    assert_eq!(each.len(), 5, "{each:#?}");
    let key = policy_key(e.maps().config()?.generation & 1, 0);
    e.maps().dns().learn(
        46,
        "127.0.0.5".parse::<IpAddr>()?,
        key,
        0,
        boottime_ns()? + 10_000_000_000,
    )?;
    assert_eq!(s.cmd(&format!("calls n sendto {named} 1"))?, "ok=1");
    Ok(())
}

/// A socket whose allow is cached, used by another process (here taken with `pidfd_getfd`; a
/// socket passed over a unix socket or inherited is the same) of a principal whose policy
/// denies the destination: decided for that process, never served from the cache.
#[test]
fn another_process_using_the_socket_is_decided_for_itself() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let dest = format!("127.0.0.1:{port}");
    let (x, y) = (
        TestCgroup::new("repeat-owner")?,
        TestCgroup::new("repeat-thief")?,
    );
    let mut e = Enforcer::load_and_attach(&x.root)?;
    e.maps().add_principal(x.id()?, x.level(), 44, Some(0))?;
    e.maps().add_principal(y.id()?, y.level(), 45, Some(1))?;
    let x_id = x.id()?;
    e.maps().apply(
        &set(
            1,
            vec![
                policy("open")
                    .zone("local", &["127.0.0.0/8"])
                    .allow(&["local"], &[port], &[PROTO_UDP])
                    .allow_all_exec()
                    .build(),
                policy("closed")
                    .zone("local", &["127.0.0.0/8"])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |cg, _| Some(if cg == x_id { 0 } else { 1 }),
    )?;
    let mut owner = Session::start(&x.path)?;
    assert_eq!(owner.cmd("udp a")?, "ok");
    assert_eq!(owner.cmd(&format!("calls a sendto {dest} 20"))?, "ok=20");
    assert_eq!(owner.cmd(&format!("calls a connect {dest} 20"))?, "ok=20");
    let fd = owner.cmd("fd a")?;

    let mut thief = Session::start(&y.path)?;
    // A call of its own first: it has a sticky mark, as any principal's process soon does.
    assert_eq!(thief.cmd("udp own")?, "ok");
    assert_eq!(
        thief.cmd(&format!("calls own sendto {dest} 1"))?,
        "ok=0 EPERM=1"
    );
    assert_eq!(thief.cmd(&format!("steal s {} {fd}", owner.pid()))?, "ok");
    assert_eq!(
        thief.cmd(&format!("calls s connect {dest} 3"))?,
        "ok=0 EPERM=3",
        "the owner's cached connect"
    );
    assert_eq!(
        thief.cmd(&format!("calls s sendto {dest} 3"))?,
        "ok=0 EPERM=3",
        "the owner's cached send"
    );
    // The owner is unaffected.
    assert_eq!(owner.cmd(&format!("calls a sendto {dest} 5"))?, "ok=5");
    Ok(())
}
