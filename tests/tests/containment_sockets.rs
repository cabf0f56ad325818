//! Containment: sockets and socket options that get around the connect/sendmsg hooks. Each
//! case runs the same operation inside a principal (refused, and recorded) and outside it
//! (unaffected). The policy allows everything, so only the guards can refuse.
//!
//! - raw sockets (`SOCK_RAW`) and ping sockets (`SOCK_DGRAM` + `IPPROTO_ICMP`): their sends
//!   have no cgroup hook; refused with EPERM by cgroup `sock_create`;
//! - families with no connect hook (AF_PACKET, AF_VSOCK): `sock_create` does not run for them,
//!   so the `sys_enter_socket` tracepoint kills the process;
//! - source routing (`IP_OPTIONS` with LSRR, `IPV6_RTHDR`): refused with EPERM by cgroup
//!   `setsockopt`, while harmless IP options still work.

use std::{os::unix::process::ExitStatusExt as _, process::Command};

use corral_agent::ebpf::{
    Enforcer,
    events::{Event, EventReader, Reason, SocketDecision, Verdict},
};
use corral_tests::{
    Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_bin, probe_in, probe_outside,
};

/// A raw ICMP socket, a raw ICMPv6 socket, a ping socket.
const RAW4: &str = "socket:2:3:1";
const RAW6: &str = "socket:10:3:58";
const PING4: &str = "socket:2:2:1";
/// A loose source route through 127.0.0.1 (NOP, LSRR len 7 ptr 4, one hop).
const LSRR: &str = "ipopts:018307047f000001";
/// Harmless IP options: three NOPs and the end of the list.
const NOPS: &str = "ipopts:01010100";
/// A segment routing header (type 4) with one segment, ::1.
const SRH6: &str = "rthdr6:0002040000000000000000000000000000000000000000000000000000000001";

struct Node {
    cg: TestCgroup,
    _enforcer: Enforcer,
    reader: EventReader,
}

fn node(name: &str, audit: bool) -> anyhow::Result<Node> {
    let cg = TestCgroup::new(name)?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 5, Some(0))?;
    let mut p = policy("contain-sockets").default_allow().allow_all_exec();
    if audit {
        p = p.audit();
    }
    e.maps().apply(&set(1, vec![p.build()]), |_, _| Some(0))?;
    let reader = EventReader::take(e.maps())?;
    Ok(Node {
        cg,
        _enforcer: e,
        reader,
    })
}

fn socket_events(reader: &mut EventReader) -> Vec<SocketDecision> {
    let mut all = Vec::new();
    reader.drain_all(&mut all);
    all.into_iter()
        .filter_map(|e| match e {
            Event::Socket(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// Sets `net.ipv4.ping_group_range` for the test (ping sockets need it) and restores it.
struct PingRange(String);

impl PingRange {
    const PATH: &str = "/proc/sys/net/ipv4/ping_group_range";
    fn allow_root() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(Self::PATH)?;
        std::fs::write(Self::PATH, "0 0")?;
        Ok(Self(old))
    }
}

impl Drop for PingRange {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

#[test]
fn raw_and_ping_sockets_and_source_routes_are_refused_inside_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let _ping = PingRange::allow_root()?;
    let mut n = node("contain-sockets", false)?;
    let ok_ops = [
        "socket:2:1:6",  // TCP
        "socket:2:2:17", // UDP
        "socket:10:1:0", // TCP over IPv6
        "socket:1:1:0",  // unix
        "socket:16:3:0", // netlink (glibc's getaddrinfo needs NETLINK_ROUTE)
        NOPS,
    ];
    let refused = [RAW4, RAW6, PING4, LSRR, SRH6];
    let mut ops: Vec<&str> = ok_ops.to_vec();
    ops.extend(refused);
    let got = probe_in(&n.cg.path, &ops)?;
    let mut want = vec![Outcome::Ok; ok_ops.len()];
    want.extend(vec![Outcome::eperm(); refused.len()]);
    assert_eq!(got, want, "{ops:?}");

    // Outside the principal the same calls go through (as root): the guards leave at once.
    let outside = probe_outside(&refused)?;
    assert_eq!(outside.len(), refused.len());
    for (op, got) in refused.iter().zip(&outside) {
        assert_ne!(*got, Outcome::eperm(), "{op} outside a principal");
    }

    // One event per refusal, reason containment, naming the socket or the option.
    let events = socket_events(&mut n.reader);
    assert_eq!(events.len(), refused.len(), "{events:#?}");
    for ev in &events {
        assert_eq!(
            (ev.header.verdict, ev.header.reason, ev.header.principal),
            (Verdict::Deny, Reason::Containment, 5),
            "{ev:?}"
        );
    }
    let kinds: Vec<(u16, u16, u16, u32, u32)> = events
        .iter()
        .map(|e| (e.family, e.sock_type & 0xf, e.protocol, e.level, e.optname))
        .collect();
    assert_eq!(
        kinds,
        [
            (2, 3, 1, 0, 0),
            (10, 3, 58, 0, 0),
            (2, 2, 1, 0, 0),
            (2, 2, 17, 0, 4),
            (10, 2, 17, 41, 57),
        ]
    );
    Ok(())
}

#[test]
fn families_without_a_connect_hook_kill_the_caller() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut n = node("contain-families", false)?;
    // AF_PACKET (ETH_P_ALL) and AF_VSOCK: the process dies before `socket()` returns.
    for op in ["socket:17:3:768", "socket:40:1:0"] {
        let out = Command::new(probe_bin()?)
            .arg("--cgroup")
            .arg(&n.cg.path)
            .arg(op)
            .output()?;
        assert_eq!(out.status.signal(), Some(9), "{op}: {:?}", out.status);
        assert!(out.stdout.is_empty(), "{op} returned to user space");
        // Outside: not killed (AF_VSOCK may be unsupported here, which is fine).
        let outside = Command::new(probe_bin()?).arg(op).output()?;
        assert!(
            outside.status.success(),
            "{op} outside: {:?}",
            outside.status
        );
    }
    let events = socket_events(&mut n.reader);
    let families: Vec<u16> = events.iter().map(|e| e.family).collect();
    assert_eq!(families, [17, 40], "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e.hook == agent_common::HOOK_SOCKET_SYSCALL
                && e.header.verdict == Verdict::Deny)
    );
    Ok(())
}

/// AF_VSOCK is the family a policy can name (`{ action: allow, protocols: [vsock] }`): its
/// principals may then create vsock sockets (each an allow event); every other family without
/// a hook still kills the caller.
#[test]
fn a_policy_naming_vsock_allows_the_family_and_nothing_else() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("contain-vsock")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 7, Some(0))?;
    let p = policy("contain-vsock")
        .default_allow()
        .allow(&[], &[], &[agent_common::PROTO_VSOCK])
        .allow_all_exec()
        .build();
    assert!(p.allows_vsock());
    e.maps().apply(&set(1, vec![p]), |_, _| Some(0))?;
    let mut reader = EventReader::take(e.maps())?;
    let vsock = Command::new(probe_bin()?)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("socket:40:1:0")
        .output()?;
    // Not killed: ok, or EAFNOSUPPORT where the vsock module is not loaded.
    assert!(vsock.status.success(), "vsock allowed: {:?}", vsock.status);
    let line = String::from_utf8_lossy(&vsock.stdout);
    assert!(
        matches!(line.trim(), "ok" | "EAFNOSUPPORT"),
        "vsock: {line}"
    );
    let packet = Command::new(probe_bin()?)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("socket:17:3:768")
        .output()?;
    assert_eq!(
        packet.status.signal(),
        Some(9),
        "AF_PACKET: {:?}",
        packet.status
    );
    let events = socket_events(&mut reader);
    let seen: Vec<(u16, Verdict)> = events
        .iter()
        .map(|e| (e.family, e.header.verdict))
        .collect();
    assert_eq!(
        seen,
        [(40, Verdict::Allow), (17, Verdict::Deny)],
        "{events:#?}"
    );

    // Without the rule, vsock kills the caller again.
    let p = policy("contain-vsock")
        .default_allow()
        .allow_all_exec()
        .build();
    assert!(!p.allows_vsock());
    e.maps().apply(&set(2, vec![p]), |_, _| Some(0))?;
    let vsock = Command::new(probe_bin()?)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg("socket:40:1:0")
        .output()?;
    assert_eq!(
        vsock.status.signal(),
        Some(9),
        "vsock refused: {:?}",
        vsock.status
    );
    Ok(())
}

#[test]
fn audit_mode_records_the_guards_and_blocks_nothing() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut n = node("contain-audit", true)?;
    let got = probe_in(&n.cg.path, &[RAW4, LSRR, "socket:17:3:768"])?;
    assert_eq!(got, vec![Outcome::Ok; 3]);
    let events = socket_events(&mut n.reader);
    assert_eq!(events.len(), 3, "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e.header.verdict == Verdict::AuditDeny)
    );
    Ok(())
}

#[test]
fn a_policy_naming_icmp_allows_ping_to_its_zone_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let _ping = PingRange::allow_root()?;
    let cg = TestCgroup::new("contain-ping")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 6, Some(0))?;
    // Ping allowed to 127.0.0.1 and ::1 only; everything else denied by default.
    let p = policy("contain-ping")
        .zone("pingable", &["127.0.0.1/32", "::1/128"])
        .zone("other", &["127.0.0.2/32"])
        .allow(&["pingable"], &[], &[agent_common::PROTO_ICMP])
        .allow_all_exec()
        .build();
    assert!(p.allows_ping());
    e.maps().apply(&set(1, vec![p]), |_, _| Some(0))?;
    let mut reader = EventReader::take(e.maps())?;
    let got = probe_in(
        &cg.path,
        &["ping:127.0.0.1", "ping:[::1]", "ping:127.0.0.2", RAW4],
    )?;
    assert_eq!(
        got,
        vec![Outcome::Ok, Outcome::Ok, Outcome::eperm(), Outcome::eperm()]
    );

    let mut all = Vec::new();
    reader.drain_all(&mut all);
    let pings: Vec<_> = all
        .iter()
        .filter_map(|e| match e {
            Event::Connect(c) if c.proto == agent_common::PROTO_ICMP => Some(c.clone()),
            _ => None,
        })
        .collect();
    let seen: Vec<(String, Verdict)> = pings
        .iter()
        .map(|c| (c.addr.to_string(), c.header.verdict))
        .collect();
    assert_eq!(
        seen,
        [
            ("127.0.0.1".to_owned(), Verdict::Allow),
            ("::1".to_owned(), Verdict::Allow),
            ("127.0.0.2".to_owned(), Verdict::Deny),
        ]
    );

    // The same policy without the icmp rule: ping sockets are refused again.
    let p = policy("contain-ping")
        .zone("pingable", &["127.0.0.1/32"])
        .allow(&["pingable"], &[], &[])
        .allow_all_exec()
        .build();
    assert!(!p.allows_ping());
    e.maps().apply(&set(2, vec![p]), |_, _| Some(0))?;
    assert_eq!(
        probe_in(&cg.path, &["ping:127.0.0.1"])?,
        vec![Outcome::eperm()]
    );
    Ok(())
}
