//! Containment: address forms that name one destination and reach another. `connect()` or
//! `sendto()` to the unspecified address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) reaches this
//! host's loopback; it must be decided as loopback, not as the zone covering `0.0.0.0/0`.
//! The node's own addresses reach this host too: they are decided as loopback.

use agent_common::{PROTO_TCP, PROTO_UDP};
use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, Verdict},
};
use corral_tests::{
    Listener, Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_in,
};

#[test]
fn the_unspecified_address_is_decided_as_loopback() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let l4 = Listener::tcp("127.0.0.1:0")?;
    let l6 = Listener::tcp("[::1]:0")?;
    let cg = TestCgroup::new("contain-unspecified")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 3, Some(0))?;
    // Loopback denied; "the internet" allowed: an agent may reach the world, not this host.
    e.maps().apply(
        &set(
            1,
            vec![
                policy("unspecified")
                    .zone("local", &["127.0.0.0/8", "::1/128"])
                    .zone("internet", &["0.0.0.0/0", "::/0"])
                    .deny(&["local"], &[], &[])
                    .allow(&["internet"], &[], &[PROTO_TCP, PROTO_UDP])
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let mut reader = EventReader::take(e.maps())?;
    let (p4, p6) = (l4.port, l6.port);
    let ops = [
        format!("tcp:0.0.0.0:{p4}"),
        format!("tcp:[::]:{p6}"),
        format!("tcp:[::ffff:0.0.0.0]:{p4}"),
        "udp:0.0.0.0:5353".to_owned(),
        "sendto:0.0.0.0:5353".to_owned(),
        "sendto:[::]:5353".to_owned(),
    ];
    let refs: Vec<&str> = ops.iter().map(String::as_str).collect();
    let got = probe_in(&cg.path, &refs)?;
    assert_eq!(got, vec![Outcome::eperm(); ops.len()], "{ops:?}");

    // Each was recorded as a loopback destination in zone `local` (index 0), denied.
    let events = reader.drain_connects();
    assert_eq!(events.len(), ops.len(), "{events:#?}");
    for ev in &events {
        assert_eq!(ev.header.verdict, Verdict::Deny, "{ev:?}");
        assert_eq!(ev.zone, Some(0), "decided in zone local: {ev:?}");
        assert!(ev.addr.is_loopback(), "recorded as loopback: {ev:?}");
    }

    // The same calls from outside the principal still reach the listeners.
    assert!(std::net::TcpStream::connect(("0.0.0.0", p4)).is_ok());
    Ok(())
}

/// An address added to `lo` for the test (as a node address on any interface would be), removed
/// on drop.
struct NodeAddr(&'static str);

impl NodeAddr {
    fn add(cidr: &'static str) -> anyhow::Result<Self> {
        let st = std::process::Command::new("ip")
            .args(["addr", "add", cidr, "dev", "lo"])
            .status()?;
        anyhow::ensure!(st.success(), "ip addr add {cidr} dev lo: {st}");
        Ok(Self(cidr))
    }
}

impl Drop for NodeAddr {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", self.0, "dev", "lo"])
            .status();
    }
}

#[test]
fn the_nodes_own_addresses_are_decided_as_loopback() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    // TEST-NET-2, as a node's own address: a connect to it reaches this host.
    let _addr = NodeAddr::add("198.51.100.7/32")?;
    let l = Listener::tcp("198.51.100.7:0")?;
    let cg = TestCgroup::new("contain-node-addr")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 4, Some(0))?;
    // This host is denied; the lab network it sits in is allowed.
    e.maps().apply(
        &set(
            1,
            vec![
                policy("node-addr")
                    .zone("local", &["127.0.0.0/8", "::1/128"])
                    .zone("lab", &["198.51.100.0/24"])
                    .deny(&["local"], &[], &[])
                    .allow(&["lab"], &[], &[PROTO_TCP])
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let addrs = corral_agent::ebpf::local_addrs::node_addresses()?;
    assert!(
        addrs.contains(&"198.51.100.7".parse()?),
        "the node's addresses include the one just added: {addrs:?}"
    );
    let mut reader = EventReader::take(e.maps())?;
    let op = format!("tcp:198.51.100.7:{}", l.port);
    // The enforcer read the node's addresses when it started: the address is this host.
    assert_eq!(probe_in(&cg.path, &[&op])?, vec![Outcome::eperm()]);
    // Without the node's addresses known, the same connect is decided as the lab network's:
    // the mapping is what denies it.
    e.maps().set_local_addrs(&Default::default())?;
    assert_eq!(probe_in(&cg.path, &[&op])?, vec![Outcome::Ok]);
    e.maps().set_local_addrs(&addrs)?;
    assert_eq!(probe_in(&cg.path, &[&op])?, vec![Outcome::eperm()]);
    let events = reader.drain_connects();
    let last = events.last().ok_or_else(|| anyhow::anyhow!("no event"))?;
    assert_eq!(last.header.verdict, Verdict::Deny);
    assert_eq!(last.zone, Some(0), "decided in zone local");
    assert_eq!(last.addr.to_string(), "198.51.100.7", "recorded as called");
    Ok(())
}
