//! The first enforcement test: the real cgroup connect4 program in the real kernel denies a
//! real process's connect() with EPERM.

use std::net::{IpAddr, Ipv4Addr, TcpStream};

use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, KernelEvent, Reason, Verdict},
};
use corral_policy::{
    compiled::{Action, CompiledPolicy, CompiledSet, ConnectRule, Mode, Net, Zone},
    identity::IdentityPattern,
};
use corral_tests::{Listener, Outcome, TestCgroup, privileged, probe_in};

fn loopback_policy(allowed_port: u16) -> anyhow::Result<CompiledSet> {
    Ok(CompiledSet {
        revision: 1,
        policies: vec![CompiledPolicy {
            name: "first".into(),
            identities: vec![IdentityPattern::parse("spiffe://test.corral/t/*")?],
            mode: Mode::Enforce,
            default_action: Action::Deny,
            zones: vec![Zone {
                name: "local".into(),
                nets: vec![
                    Net::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8)
                        .ok_or_else(|| anyhow::anyhow!("net"))?,
                ],
            }],
            connect: vec![ConnectRule {
                index: 0,
                action: Action::Allow,
                zones: vec![0],
                ports: vec![allowed_port],
                protocols: vec![agent_common::PROTO_TCP],
            }],
            chaining: vec![],
            ..CompiledPolicy::default()
        }],
    })
}

#[test]
fn connect4_denies_with_eperm_inside_the_cgroup_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let allowed = Listener::tcp("127.0.0.1:0")?;
    let denied = Listener::tcp("127.0.0.1:0")?;
    let cg = TestCgroup::new("connect4")?;

    let mut enforcer = Enforcer::load_and_attach(&cg.root)?;
    println!(
        "loaded and attached {} sock_addr programs at {}",
        enforcer.attached(),
        cg.root.display()
    );
    let maps = enforcer.maps();
    maps.add_principal(cg.id()?, cg.level(), 7, Some(0))?;
    maps.apply(&loopback_policy(allowed.port)?, |_, _| Some(0))?;

    let got = probe_in(
        &cg.path,
        &[
            &format!("tcp:127.0.0.1:{}", denied.port),
            &format!("tcp:127.0.0.1:{}", allowed.port),
        ],
    )?;
    assert_eq!(
        got,
        vec![Outcome::Errno("EPERM".into()), Outcome::Ok],
        "inside the cgroup: denied port must fail with EPERM, allowed port must connect"
    );

    // The test process is not in the enrolled cgroup: not policed.
    TcpStream::connect(("127.0.0.1", denied.port))?;

    let mut reader = EventReader::take(enforcer.maps())?;
    let mut events = Vec::new();
    reader.drain(&mut events);
    let deny = events
        .iter()
        .find_map(|e| match e {
            KernelEvent::Connect(c) if c.port == denied.port => Some(c.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("no event for the denied connect in {events:?}"))?;
    assert_eq!(deny.header.verdict, Verdict::Deny);
    assert_eq!(deny.header.reason, Reason::Default);
    assert_eq!(deny.header.principal, 7);
    assert_eq!(deny.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
    let allow = events
        .iter()
        .find_map(|e| match e {
            KernelEvent::Connect(c) if c.port == allowed.port => Some(c.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("no event for the allowed connect"))?;
    assert_eq!(
        (allow.header.verdict, allow.header.reason, allow.header.rule),
        (Verdict::Allow, Reason::Rule, Some(0))
    );
    assert!(
        events.iter().all(|e| match e {
            KernelEvent::Connect(c) => c.header.principal == 7,
        }),
        "un-enrolled connects must not produce events"
    );
    println!(
        "ran: denied connect got EPERM, allowed connected, outside cgroup unaffected; {} events",
        events.len()
    );
    Ok(())
}
