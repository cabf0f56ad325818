//! Containment: where the packet programs run. The cgroup_skb programs (revocation of
//! established connections, grant expiry, source routes, ping) are attached at each
//! principal's cgroup, not at the root, so the node's own packets never run them
//! (`agent/src/ebpf/coverage.rs`). A program runs for a socket by the cgroup the socket was
//! created in, whoever uses it, so a principal must not use a socket of any other cgroup: the
//! connect/sendmsg hooks follow the socket's cgroup and refuse one created outside every
//! principal (`agent-ebpf/src/scope.rs`): handed over by a process outside, or opened before
//! the process joined. A socket of the principal's cgroup opened before the cgroup was
//! enrolled is the principal's.

use agent_common::PROTO_UDP;
use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, Reason, Verdict},
};
use corral_tests::{
    Session, TestCgroup,
    build::{policy, set},
    privileged,
};

/// A UDP socket that only counts (the destination of every send here).
fn sink() -> anyhow::Result<(std::net::UdpSocket, u16)> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let port = s.local_addr()?.port();
    Ok((s, port))
}

/// Loopback UDP to `port` allowed, anything else denied.
fn udp_to(port: u16) -> corral_policy::compiled::CompiledSet {
    set(
        1,
        vec![
            policy("udp-to")
                .zone("local", &["127.0.0.1/32"])
                .allow(&["local"], &[port], &[PROTO_UDP])
                .allow_all_exec()
                .build(),
        ],
    )
}

/// Run count of program `name` (BPF run-time statistics must be enabled).
fn runs(e: &Enforcer, name: &str) -> u64 {
    e.program_stats()
        .into_iter()
        .find(|p| p.name == name)
        .map_or(0, |p| p.runs)
}

#[test]
fn the_packet_programs_run_for_principals_sockets_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let dest = format!("127.0.0.1:{port}");
    let cg = TestCgroup::new("scope-runs")?;
    let other = TestCgroup::new("scope-runs-other")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    assert_eq!(
        e.maps().covered(),
        Vec::<u64>::new(),
        "nothing before a principal"
    );
    e.maps().add_principal(cg.id()?, cg.level(), 61, Some(0))?;
    e.maps().apply(&udp_to(port), |_, _| Some(0))?;
    assert_eq!(e.maps().covered(), vec![cg.id()?]);
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;

    // 50 packets from a process of no principal: the egress program does not run.
    let mut outside = Session::start(&other.path)?;
    assert_eq!(outside.cmd("udp o")?, "ok");
    let before = runs(&e, "egress");
    assert_eq!(outside.cmd(&format!("calls o sendto {dest} 50"))?, "ok=50");
    assert_eq!(
        runs(&e, "egress"),
        before,
        "no packet program for the node's own sockets"
    );

    // 50 from the principal's: it runs for each.
    let mut inside = Session::start(&cg.path)?;
    assert_eq!(inside.cmd("udp i")?, "ok");
    let before = runs(&e, "egress");
    assert_eq!(inside.cmd(&format!("calls i sendto {dest} 50"))?, "ok=50");
    let ran = runs(&e, "egress") - before;
    assert!(ran >= 50, "egress ran {ran} times for 50 packets");

    // Removed, the principal's cgroup keeps them while it exists (its connections end at
    // their next packet), and loses them once it is gone.
    let id = cg.id()?;
    e.maps().remove_principal(id)?;
    assert_eq!(e.maps().covered(), Vec::<u64>::new());
    assert_eq!(e.maps().covered_retired(), vec![id]);
    let before = runs(&e, "egress");
    assert_eq!(inside.cmd(&format!("calls i sendto {dest} 10"))?, "ok=10");
    assert!(
        runs(&e, "egress") - before >= 10,
        "kept while the cgroup exists"
    );
    drop(inside);
    drop(cg);
    // The next change finds the cgroup gone.
    e.maps()
        .add_principal(other.id()?, other.level(), 65, Some(0))?;
    assert_eq!(e.maps().covered_retired(), Vec::<u64>::new(), "released");
    assert_eq!(e.maps().covered(), vec![other.id()?]);
    Ok(())
}

#[test]
fn a_socket_handed_over_from_outside_every_principal_is_refused() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let dest = format!("127.0.0.1:{port}");
    let cg = TestCgroup::new("scope-handed")?;
    let other = TestCgroup::new("scope-handed-other")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 62, Some(0))?;
    e.maps().apply(&udp_to(port), |_, _| Some(0))?;
    let mut reader = EventReader::take(e.maps())?;

    let mut owner = Session::start(&other.path)?;
    assert_eq!(owner.cmd("udp a")?, "ok");
    let fd = owner.cmd("fd a")?;
    let mut p = Session::start(&cg.path)?;
    assert_eq!(p.cmd("udp own")?, "ok");
    assert_eq!(
        p.cmd(&format!("calls own sendto {dest} 3"))?,
        "ok=3",
        "its own socket"
    );
    assert_eq!(p.cmd(&format!("steal s {} {fd}", owner.pid()))?, "ok");
    assert_eq!(
        p.cmd(&format!("calls s sendto {dest} 3"))?,
        "ok=0 EPERM=3",
        "an allowed destination, through a socket of another cgroup"
    );
    assert_eq!(p.cmd(&format!("calls s connect {dest} 3"))?, "ok=0 EPERM=3");
    // The owner, outside, is not policed.
    assert_eq!(owner.cmd(&format!("calls a sendto {dest} 3"))?, "ok=3");

    let evs: Vec<_> = reader
        .drain_connects()
        .into_iter()
        .filter(|c| c.port == port && c.header.verdict == Verdict::Deny)
        .collect();
    assert!(!evs.is_empty(), "the refusals are recorded");
    assert!(
        evs.iter()
            .all(|c| c.header.reason == Reason::Containment && c.header.principal == 62),
        "{evs:#?}"
    );
    let refused: u64 = evs.iter().map(|c| 1 + u64::from(c.repeats)).sum();
    assert_eq!(refused, 6, "every refused call accounted for: {evs:#?}");
    Ok(())
}

#[test]
fn a_socket_opened_before_joining_the_cgroup_is_refused() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let dest = format!("127.0.0.1:{port}");
    let cg = TestCgroup::new("scope-joined")?;
    let other = TestCgroup::new("scope-joined-other")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 63, Some(0))?;
    e.maps().apply(&udp_to(port), |_, _| Some(0))?;

    let mut s = Session::start(&other.path)?;
    assert_eq!(s.cmd("udp early")?, "ok");
    assert_eq!(
        s.cmd(&format!("calls early sendto {dest} 2"))?,
        "ok=2",
        "not yet policed"
    );
    assert_eq!(s.cmd(&format!("movecg {}", cg.path.display()))?, "ok");
    assert_eq!(
        s.cmd(&format!("calls early sendto {dest} 3"))?,
        "ok=0 EPERM=3",
        "the socket it opened before it joined"
    );
    assert_eq!(s.cmd("udp late")?, "ok");
    assert_eq!(
        s.cmd(&format!("calls late sendto {dest} 3"))?,
        "ok=3",
        "one opened inside"
    );
    Ok(())
}

#[test]
fn a_socket_opened_in_the_cgroup_before_it_was_enrolled_is_the_principals() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let dest = format!("127.0.0.1:{port}");
    let cg = TestCgroup::new("scope-before")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    let mut s = Session::start(&cg.path)?;
    assert_eq!(s.cmd("udp a")?, "ok");
    assert_eq!(s.cmd(&format!("calls a sendto {dest} 2"))?, "ok=2");

    e.maps().add_principal(cg.id()?, cg.level(), 64, Some(0))?;
    e.maps().apply(&udp_to(port), |_, _| Some(0))?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let before = runs(&e, "egress");
    assert_eq!(
        s.cmd(&format!("calls a sendto {dest} 3"))?,
        "ok=3",
        "allowed, as policy says"
    );
    assert!(
        runs(&e, "egress") - before >= 3,
        "and its packets run the programs"
    );
    assert_eq!(
        s.cmd(&format!("calls a sendto 127.0.0.1:{} 3", port ^ 1))?,
        "ok=0 EPERM=3",
        "denied where policy denies"
    );
    Ok(())
}

/// A principal recorded for a cgroup that does not exist (gone, or an id no cgroup has: cgroup
/// ids are never reused) is enrolled without an attachment: no socket can be created there.
#[test]
fn a_principal_whose_cgroup_does_not_exist_is_enrolled_without_an_attachment() -> anyhow::Result<()>
{
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("scope-absent")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    let absent = 0x7fff_0000_0000_u64;
    e.maps().add_principal(absent, cg.level(), 66, Some(0))?;
    e.maps().add_principal(cg.id()?, cg.level(), 67, Some(0))?;
    assert_eq!(e.maps().covered(), vec![cg.id()?]);
    Ok(())
}

/// A socket of principal A's cgroup, used by principal B, is covered only while A is enrolled:
/// once A is removed (and its cgroup's programs may go with it), B's next call through it is
/// refused.
#[test]
fn a_socket_of_a_removed_principal_no_longer_covers_another() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let (_sink, port) = sink()?;
    let dest = format!("127.0.0.1:{port}");
    let a = TestCgroup::new("scope-owner-a")?;
    let b = TestCgroup::new("scope-user-b")?;
    let mut e = Enforcer::load_and_attach(&a.root)?;
    e.maps().add_principal(a.id()?, a.level(), 68, Some(0))?;
    e.maps().add_principal(b.id()?, b.level(), 69, Some(0))?;
    e.maps().apply(&udp_to(port), |_, _| Some(0))?;

    let mut owner = Session::start(&a.path)?;
    assert_eq!(owner.cmd("udp a")?, "ok");
    let fd = owner.cmd("fd a")?;
    let mut user = Session::start(&b.path)?;
    assert_eq!(user.cmd(&format!("steal s {} {fd}", owner.pid()))?, "ok");
    assert_eq!(
        user.cmd(&format!("calls s sendto {dest} 3"))?,
        "ok=3",
        "A's socket, A enrolled"
    );
    e.maps().remove_principal(a.id()?)?;
    assert_eq!(
        user.cmd(&format!("calls s sendto {dest} 3"))?,
        "ok=0 EPERM=3",
        "A removed: its socket covers nobody"
    );
    Ok(())
}

/// Where opening a cgroup by handle is refused (no CAP_DAC_READ_SEARCH, as in the DaemonSet),
/// the agent finds it by inode number: a cgroup v2 directory's inode number is its id.
#[test]
fn a_cgroup_is_found_by_its_id() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("scope-find")?;
    let mount = std::fs::File::open(&cg.root)?;
    let found = corral_agent::ebpf::coverage::find_cgroup_by_id(&mount, cg.id()?)?;
    assert_eq!(found.as_deref(), Some(cg.path.as_path()));
    assert_eq!(
        corral_agent::ebpf::coverage::find_cgroup_by_id(&mount, 0x7fff_0000_0000)?,
        None
    );
    Ok(())
}
