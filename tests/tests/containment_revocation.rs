//! Containment: revocation means revocation. A connection a principal opened while it was
//! allowed stops carrying data, both ways, at its next packet once its destination is denied:
//! a grant revoked, a grant expired (with no agent process at all: the kernel alone), a
//! chaining rule tripped by a later call, a policy swap. One event names the connection and
//! why it ended. Per-message source routes (control messages, no `setsockopt()`) are dropped
//! for principals only.
//!
//! The probe holds its sockets in a `session` while the test changes the maps; the sinks are
//! servers outside every principal that count what reaches them.

use std::time::Duration;

use agent_common::{
    ANY_PROTO, GrantKey, GrantValue, HOOK_CUT4, HOOK_ROUTE_EGRESS, HOOK_SOCK_CREATE,
};
use corral_agent::{
    clock::boottime_ns,
    ebpf::{
        Enforcer,
        events::{ConnectDecision, Event, EventReader, Reason, SocketDecision, Verdict},
    },
};
use corral_tests::{
    Outcome, Session, Sink, TestCgroup,
    build::{policy, set},
    privileged, probe_in, probe_outside,
};

const PRINCIPAL: u32 = 7;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// Long enough for a cut to show: a byte sent after it must not arrive in this time.
const SETTLE: Duration = Duration::from_millis(700);

struct Node {
    cg: TestCgroup,
    enforcer: Enforcer,
    reader: EventReader,
}

fn node(name: &str, p: corral_policy::compiled::CompiledPolicy) -> anyhow::Result<Node> {
    let cg = TestCgroup::new(name)?;
    let mut enforcer = Enforcer::load_and_attach(&cg.root)?;
    enforcer
        .maps()
        .add_principal(cg.id()?, cg.level(), PRINCIPAL, Some(0))?;
    enforcer.maps().apply(&set(1, vec![p]), |_, _| Some(0))?;
    let reader = EventReader::take(enforcer.maps())?;
    Ok(Node {
        cg,
        enforcer,
        reader,
    })
}

fn events(reader: &mut EventReader) -> Vec<Event> {
    let mut all = Vec::new();
    reader.drain_all(&mut all);
    all
}

fn cuts(all: &[Event]) -> Vec<ConnectDecision> {
    all.iter()
        .filter_map(|e| match e {
            Event::Connect(c) if c.hook == HOOK_CUT4 => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// `socket()` refusals of the principal (hook sock_create, reason containment, denied).
fn socket_refusals(all: &[Event]) -> usize {
    all.iter()
        .filter(|e| {
            matches!(e, Event::Socket(s) if s.hook == HOOK_SOCK_CREATE
                && s.header.principal == PRINCIPAL
                && s.header.reason == Reason::Containment
                && s.header.verdict == Verdict::Deny)
        })
        .count()
}

fn grant_key(zone: u32, port: u16, proto: u8) -> GrantKey {
    GrantKey {
        principal: PRINCIPAL,
        zone,
        port,
        proto,
        _pad: 0,
    }
}

/// Sends a byte on `name` and checks that it reaches `sink` (whose count was `before`).
fn delivered(s: &mut Session, name: &str, sink: &Sink, before: usize) -> anyhow::Result<bool> {
    let sent = s.cmd(&format!("send {name}"))?;
    Ok(sent == "ok" && sink.wait_for(before + 1, Duration::from_secs(2)) > before)
}

#[test]
fn revoking_a_grant_ends_the_tcp_and_udp_connections_it_allowed() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let tcp = Sink::tcp("127.0.0.1:0")?;
    let udp = Sink::udp("127.0.0.1:0")?;
    // Loopback is a zone nothing allows: only the grants let the calls through.
    let p = policy("revoke")
        .zone("local", &["127.0.0.0/8"])
        .allow_all_exec()
        .build();
    let mut n = node("revoke-grant", p)?;
    let far = boottime_ns()? + 3_600_000_000_000;
    let keys = [grant_key(0, tcp.port, TCP), grant_key(0, udp.port, UDP)];
    for (i, k) in keys.iter().enumerate() {
        n.enforcer.maps().add_grant(
            *k,
            GrantValue {
                expires_ns: far,
                grant_id: 100 + i as u64,
            },
        )?;
    }
    let mut s = Session::start(&n.cg.path)?;
    assert_eq!(s.cmd(&format!("open t tcp 127.0.0.1:{}", tcp.port))?, "ok");
    assert_eq!(s.cmd(&format!("open u udp 127.0.0.1:{}", udp.port))?, "ok");
    assert!(delivered(&mut s, "t", &tcp, 0)?, "TCP under the grant");
    assert!(delivered(&mut s, "u", &udp, 0)?, "UDP under the grant");
    tcp.answer()?;
    assert_eq!(s.cmd("recv t")?, "ok", "replies arrive under the grant");
    assert!(cuts(&events(&mut n.reader)).is_empty());

    for k in &keys {
        n.enforcer.maps().remove_grant(k)?;
    }
    let (t_before, u_before) = (tcp.received(), udp.received());
    // TCP buffers the byte (its packets are dropped); a UDP send fails at once.
    assert_eq!(s.cmd("send t")?, "ok");
    assert_eq!(s.cmd("send u")?, "EPERM");
    std::thread::sleep(SETTLE);
    assert_eq!(tcp.received(), t_before, "TCP data after the revocation");
    assert_eq!(udp.received(), u_before, "UDP data after the revocation");
    tcp.answer()?;
    assert_eq!(
        s.cmd("recv t")?,
        "EAGAIN",
        "data towards an ended connection"
    );
    // A new connection is denied as before.
    assert_eq!(
        s.cmd(&format!("open t2 tcp 127.0.0.1:{}", tcp.port))?,
        "EPERM"
    );

    let ended = cuts(&events(&mut n.reader));
    let mut grants: Vec<u64> = ended.iter().map(|c| c.grant_id).collect();
    grants.sort_unstable();
    assert_eq!(
        grants,
        vec![100, 101],
        "one event per ended connection: {ended:?}"
    );
    for c in &ended {
        assert_eq!(c.header.verdict, Verdict::Deny);
        assert_eq!(c.header.reason, Reason::Default);
        assert_eq!(c.addr.to_string(), "127.0.0.1");
        assert_eq!(
            c.header.pid,
            s_pid(&n.cg)?,
            "the event names the connection's owner"
        );
    }

    // The node's own connections to the same servers are untouched.
    let outside = probe_outside(&[&format!("tcp:127.0.0.1:{}", tcp.port)])?;
    assert_eq!(outside, vec![Outcome::Ok]);
    Ok(())
}

/// Every cgroup program runs by the cgroup a socket was created in, and the packet programs
/// are attached at the principals' cgroups only. A principal's process that moved to the
/// cgroup root gets no socket there (it would escape revocation), and the connection it opened
/// inside before it left is still ended, both ways, when the grant that allowed it is revoked.
#[test]
fn a_principal_outside_its_cgroup_gets_no_socket_and_its_connections_still_end()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let tcp = Sink::tcp("127.0.0.1:0")?;
    let p = policy("revoke-out")
        .zone("local", &["127.0.0.0/8"])
        .allow_all_exec()
        .build();
    let mut n = node("revoke-out", p)?;
    let key = grant_key(0, tcp.port, TCP);
    n.enforcer.maps().add_grant(
        key,
        GrantValue {
            expires_ns: boottime_ns()? + 3_600_000_000_000,
            grant_id: 300,
        },
    )?;
    let mut s = Session::start(&n.cg.path)?;
    assert_eq!(
        s.cmd(&format!("open first tcp 127.0.0.1:{}", tcp.port))?,
        "ok"
    );
    let mut before = tcp.received();
    assert!(
        delivered(&mut s, "first", &tcp, before)?,
        "TCP under the grant"
    );
    let root = n.cg.root.display().to_string();
    assert_eq!(s.cmd(&format!("movecg {root}"))?, "ok", "left the cgroup");
    // From the root cgroup, the principal's (sticky) process opens no socket at all, even
    // where its grant would let the connect through.
    assert_eq!(
        s.cmd(&format!("open t tcp 127.0.0.1:{}", tcp.port))?,
        "EPERM"
    );
    assert_eq!(
        s.cmd(&format!("open u udp 127.0.0.1:{}", tcp.port))?,
        "EPERM"
    );
    assert_eq!(s.cmd("udp v")?, "EPERM", "an unconnected socket either");
    let refused = socket_refusals(&events(&mut n.reader));
    assert_eq!(refused, 3, "each socket() refused and recorded");

    // The connection it opened inside still runs the packet programs.
    before = tcp.received();
    assert!(
        delivered(&mut s, "first", &tcp, before)?,
        "still under the grant"
    );
    n.enforcer.maps().remove_grant(&key)?;
    before = tcp.received();
    assert_eq!(
        s.cmd("send first")?,
        "ok",
        "buffered; its packets are dropped"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(tcp.received(), before, "data after the revocation");
    tcp.answer()?;
    assert_eq!(
        s.cmd("recv first")?,
        "EAGAIN",
        "data towards the ended connection"
    );
    let ended = cuts(&events(&mut n.reader));
    assert!(
        ended.len() == 1 && ended[0].grant_id == 300 && ended[0].port == tcp.port,
        "{ended:?}"
    );
    Ok(())
}

/// The pid of the (single) process in the test cgroup: the session's probe.
fn s_pid(cg: &TestCgroup) -> anyhow::Result<u32> {
    let procs = std::fs::read_to_string(cg.path.join("cgroup.procs"))?;
    Ok(procs.lines().next().unwrap_or("0").trim().parse()?)
}

#[test]
fn an_expired_grant_ends_its_connection_with_no_agent_running() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let tcp = Sink::tcp("127.0.0.1:0")?;
    let p = policy("expire")
        .zone("local", &["127.0.0.0/8"])
        .allow_all_exec()
        .build();
    // Only the kernel programs and maps: no agent process exists to act on the expiry.
    let mut n = node("expire-grant", p)?;
    let ttl = Duration::from_millis(1500);
    n.enforcer.maps().add_grant(
        grant_key(0, tcp.port, ANY_PROTO),
        GrantValue {
            expires_ns: boottime_ns()? + ttl.as_nanos() as u64,
            grant_id: 77,
        },
    )?;
    let t0 = std::time::Instant::now();
    let mut s = Session::start(&n.cg.path)?;
    assert_eq!(s.cmd(&format!("open t tcp 127.0.0.1:{}", tcp.port))?, "ok");
    assert!(delivered(&mut s, "t", &tcp, 0)?, "TCP under the grant");
    std::thread::sleep((ttl + Duration::from_millis(200)).saturating_sub(t0.elapsed()));
    let before = tcp.received();
    assert_eq!(s.cmd("send t")?, "ok");
    std::thread::sleep(SETTLE);
    assert_eq!(tcp.received(), before, "TCP data after the grant expired");
    let ended = cuts(&events(&mut n.reader));
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].grant_id, 77);
    assert_eq!(ended[0].header.verdict, Verdict::Deny);
    Ok(())
}

#[test]
fn tripping_a_chaining_rule_ends_the_open_connection_to_the_forbidden_zone() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let internal = Sink::tcp("127.0.0.2:0")?;
    let internet = Sink::tcp("127.0.0.3:0")?;
    let p = policy("chain-cut")
        .zone("internal", &["127.0.0.2/32"])
        .zone("internet", &["127.0.0.3/32"])
        .allow(&["internal", "internet"], &[], &[])
        .chain(&["internal"], &["internet"])
        .allow_all_exec()
        .build();
    let mut n = node("chain-cut", p)?;
    let mut s = Session::start(&n.cg.path)?;
    assert_eq!(
        s.cmd(&format!("open out tcp 127.0.0.3:{}", internet.port))?,
        "ok"
    );
    assert!(delivered(&mut s, "out", &internet, 0)?);
    // Internal data next: from now on the internet is forbidden, open connection included.
    assert_eq!(
        s.cmd(&format!("open in tcp 127.0.0.2:{}", internal.port))?,
        "ok"
    );
    let before = internet.received();
    assert_eq!(s.cmd("send out")?, "ok");
    std::thread::sleep(SETTLE);
    assert_eq!(
        internet.received(),
        before,
        "data to the internet after chaining tripped"
    );
    assert!(
        delivered(&mut s, "in", &internal, 0)?,
        "the internal connection still works"
    );
    let ended = cuts(&events(&mut n.reader));
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].header.reason, Reason::Chaining);
    assert_eq!(ended[0].addr.to_string(), "127.0.0.3");
    Ok(())
}

#[test]
fn a_policy_swap_that_denies_a_destination_ends_its_connections() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let tcp = Sink::tcp("127.0.0.1:0")?;
    let allowing = || {
        policy("swap")
            .zone("local", &["127.0.0.0/8"])
            .allow(&["local"], &[], &[])
            .allow_all_exec()
    };
    let mut n = node("swap-cut", allowing().build())?;
    let mut s = Session::start(&n.cg.path)?;
    assert_eq!(s.cmd(&format!("open t tcp 127.0.0.1:{}", tcp.port))?, "ok");
    assert!(delivered(&mut s, "t", &tcp, 0)?);
    // The same policy again changes nothing.
    n.enforcer
        .maps()
        .apply(&set(2, vec![allowing().build()]), |_, _| Some(0))?;
    assert!(
        delivered(&mut s, "t", &tcp, 1)?,
        "an unchanged decision stands"
    );
    // Now loopback is denied.
    let denying = policy("swap")
        .zone("local", &["127.0.0.0/8"])
        .deny(&["local"], &[], &[])
        .allow_all_exec()
        .build();
    n.enforcer
        .maps()
        .apply(&set(3, vec![denying]), |_, _| Some(0))?;
    let before = tcp.received();
    assert_eq!(s.cmd("send t")?, "ok");
    std::thread::sleep(SETTLE);
    assert_eq!(tcp.received(), before, "data after the policy denied it");
    let ended = cuts(&events(&mut n.reader));
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].header.reason, Reason::Rule);
    Ok(())
}

#[test]
fn in_audit_mode_a_revoked_connection_is_recorded_and_keeps_working() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let tcp = Sink::tcp("127.0.0.1:0")?;
    let p = |allow: bool| {
        let b = policy("audit-cut").zone("local", &["127.0.0.0/8"]);
        let b = if allow {
            b.allow(&["local"], &[], &[])
        } else {
            b.deny(&["local"], &[], &[])
        };
        b.allow_all_exec().audit().build()
    };
    let mut n = node("audit-cut", p(true))?;
    let mut s = Session::start(&n.cg.path)?;
    assert_eq!(s.cmd(&format!("open t tcp 127.0.0.1:{}", tcp.port))?, "ok");
    assert!(delivered(&mut s, "t", &tcp, 0)?);
    n.enforcer
        .maps()
        .apply(&set(2, vec![p(false)]), |_, _| Some(0))?;
    assert!(
        delivered(&mut s, "t", &tcp, 1)?,
        "audit mode blocks nothing"
    );
    assert!(delivered(&mut s, "t", &tcp, 2)?);
    let ended = cuts(&events(&mut n.reader));
    assert_eq!(ended.len(), 1, "recorded once: {ended:?}");
    assert_eq!(ended[0].header.verdict, Verdict::AuditDeny);
    Ok(())
}

fn route_events(all: &[Event]) -> Vec<SocketDecision> {
    all.iter()
        .filter_map(|e| match e {
            Event::Socket(s) if s.hook == HOOK_ROUTE_EGRESS => Some(s.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn source_routes_in_control_messages_are_dropped_inside_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let udp = Sink::udp("127.0.0.1:0")?;
    let p = policy("route-cmsg")
        .default_allow()
        .allow_all_exec()
        .build();
    let mut n = node("route-cmsg", p)?;
    let op = format!("lsrrmsg:127.0.0.1:{}", udp.port);
    let plain = format!("sendto:127.0.0.1:{}", udp.port);
    // Outside a principal the kernel sends it (the option is valid).
    assert_eq!(probe_outside(&[&op])?, vec![Outcome::Ok]);
    let got = probe_in(&n.cg.path, &[&plain, &op, &op])?;
    assert_eq!(
        got,
        vec![
            Outcome::Ok,
            Outcome::Errno("EPERM".into()),
            Outcome::Errno("EPERM".into())
        ]
    );
    let routes = route_events(&events(&mut n.reader));
    assert_eq!(routes.len(), 2, "one per socket: {routes:?}");
    assert!(
        routes
            .iter()
            .all(|r| r.header.verdict == Verdict::Deny && r.header.reason == Reason::Containment)
    );
    Ok(())
}
