//! Tests of the compiled policy form: expansion into kernel map entries and grant keys.

use super::*;
use std::net::Ipv4Addr;

#[test]
fn v4_nets_live_in_mapped_space() {
    let n = Net::new(IpAddr::V4(Ipv4Addr::new(10, 20, 99, 1)), 16).expect("valid");
    assert_eq!(n.bits(), 112);
    assert!(n.contains(IpAddr::V4(Ipv4Addr::new(10, 20, 0, 7))));
    assert!(n.contains(IpAddr::V6(Ipv4Addr::new(10, 20, 3, 3).to_ipv6_mapped())));
    assert!(!n.contains(IpAddr::V4(Ipv4Addr::new(10, 21, 0, 7))));
    assert!(Net::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 33).is_none());
}

fn policy(chaining: Vec<ChainRule>) -> CompiledPolicy {
    CompiledPolicy {
        name: "p".into(),
        identities: vec![],
        mode: Mode::Audit,
        default_action: Action::Allow,
        zones: vec![Zone {
            name: "z".into(),
            nets: vec![Net::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8).expect("net")],
        }],
        connect: vec![
            ConnectRule {
                index: 0,
                action: Action::Allow,
                zones: vec![0],
                ports: vec![443],
                protocols: vec![],
            },
            ConnectRule {
                index: 1,
                action: Action::Deny,
                zones: vec![0],
                ports: vec![443, 80],
                protocols: vec![agent_common::PROTO_TCP],
            },
            ConnectRule {
                index: 2,
                action: Action::Allow,
                zones: vec![0],
                ports: vec![443],
                protocols: vec![],
            },
        ],
        chaining,
        ..CompiledPolicy::default()
    }
}

#[test]
fn expand_keeps_lowest_index_per_action_and_key() {
    let kp = expand(5, &policy(vec![]), 9).expect("expands");
    assert_eq!(
        (kp.meta.revision, kp.meta.mode, kp.meta.default_action),
        (9, MODE_AUDIT, ACTION_ALLOW)
    );
    assert_eq!(kp.zones.len(), 1);
    assert_eq!(kp.zones[0].0, zone_prefix_len(96 + 8));
    let key = |port, proto| RuleKey {
        policy: 5,
        zone: 0,
        port,
        proto,
        _pad: 0,
    };
    assert_eq!(kp.rules.len(), 3);
    assert_eq!(
        kp.rules[&key(443, ANY_PROTO)],
        RuleValue {
            allow_rule: 0,
            deny_rule: NONE
        }
    );
    assert_eq!(
        kp.rules[&key(443, agent_common::PROTO_TCP)],
        RuleValue {
            allow_rule: NONE,
            deny_rule: 1
        }
    );
    assert!(kp.chain.is_empty());
    // Rules with a port and a protocol, and with a port and any protocol, no chaining: the
    // other two key shapes and the chain lookup are skipped.
    assert_eq!(
        kp.meta.skip,
        agent_common::SKIP_ANY_PROTO | agent_common::SKIP_ANY_ANY | agent_common::SKIP_CHAIN
    );
}

#[test]
fn expand_chaining_bitmask_and_limit() {
    let kp = expand(
        1,
        &policy(vec![ChainRule {
            after: vec![0, 3],
            deny: vec![0],
        }]),
        1,
    )
    .expect("expands");
    assert_eq!(kp.chain[&ChainKey { policy: 1, zone: 0 }], 0b1001);
    assert_eq!(
        kp.meta.skip & agent_common::SKIP_CHAIN,
        0,
        "chaining is looked up"
    );
    let err = expand(
        1,
        &policy(vec![ChainRule {
            after: vec![64],
            deny: vec![0],
        }]),
        1,
    );
    assert!(matches!(
        err,
        Err(ExpandError::ChainZone {
            zone: 64,
            max: 64,
            ..
        })
    ));
}

#[test]
fn grant_keys_cover_every_combination() {
    let g = GrantTemplate {
        name: "g".into(),
        zones: vec![1, 2],
        ports: vec![],
        protocols: vec![agent_common::PROTO_TCP, agent_common::PROTO_UDP],
        max_ttl: Duration::from_secs(60),
        approval: Approval::Auto,
    };
    let keys = grant_keys(7, &g);
    assert_eq!(keys.len(), 4);
    assert!(keys.iter().all(|k| k.principal == 7 && k.port == ANY_PORT));
    assert!(keys.contains(&GrantKey {
        principal: 7,
        zone: 2,
        port: 0,
        proto: agent_common::PROTO_UDP,
        _pad: 0
    }));
}

#[test]
fn grant_available_is_the_first_covering_template() {
    let t = |name: &str, zones: Vec<u32>, ports: Vec<u16>, protocols: Vec<u8>| GrantTemplate {
        name: name.into(),
        zones,
        ports,
        protocols,
        max_ttl: Duration::from_secs(60),
        approval: Approval::Required,
    };
    let tcp = agent_common::PROTO_TCP;
    let udp = agent_common::PROTO_UDP;
    let ts = vec![
        t("db-tcp", vec![1], vec![5432], vec![tcp]),
        t("db-any-port", vec![1, 2], vec![], vec![]),
        t("dns", vec![3], vec![53], vec![]),
    ];
    let name = |zone, port, proto| grant_available(&ts, zone, port, proto).map(|g| g.name.as_str());
    assert_eq!(name(1, 5432, tcp), Some("db-tcp"));
    // Port and protocol must match where the template names them.
    assert_eq!(name(1, 5432, udp), Some("db-any-port"));
    assert_eq!(name(1, 80, tcp), Some("db-any-port"));
    assert_eq!(name(2, 1, udp), Some("db-any-port"));
    assert_eq!(name(3, 53, udp), Some("dns"));
    assert_eq!(name(3, 54, udp), None);
    // A zone no template names.
    assert_eq!(name(0, 5432, tcp), None);
    assert_eq!(grant_available(&[], 1, 5432, tcp), None);
}

#[test]
fn exec_rule_matching() {
    let r = ExecRule {
        index: 0,
        action: Action::Deny,
        exact: vec!["/usr/bin/curl".into()],
        prefixes: vec!["/opt/agent/".into()],
    };
    assert!(r.matches("/usr/bin/curl"));
    assert!(!r.matches("/usr/bin/curl2"));
    assert!(r.matches("/opt/agent/bin/x"));
    assert!(!r.matches("/opt/agent"));
    assert!(!r.matches("/opt/agentx/y"));
}

#[test]
fn unix_keys_encode_paths_and_abstract_names() {
    let d = |path: &str| UnixDest {
        zone: 3,
        path: path.into(),
    };
    let k = d("/run/docker.sock").kernel_key(9).expect("fits");
    assert_eq!(k.policy, 9);
    assert_eq!(&k.path[..17], b"/run/docker.sock\0");
    assert!(k.path[16..].iter().all(|&b| b == 0));
    let k = d("@corral-test").kernel_key(1).expect("fits");
    assert_eq!(&k.path[..12], b"\0corral-test");
    assert!(k.path[12..].iter().all(|&b| b == 0));
    assert_eq!(unix_name_from_bytes(&k.path[..12]), "@corral-test");
    assert_eq!(unix_name_from_bytes(b"/a/b"), "/a/b");
    assert!(d(&format!("/{}", "x".repeat(108))).kernel_key(0).is_none());
    assert!(d(&format!("/{}", "x".repeat(107))).kernel_key(0).is_some());
}

#[test]
fn words_roundtrip() {
    let a: Ipv6Addr = "fd00:20::1".parse().expect("addr");
    assert_eq!(addr_from_words(&addr_words(a)), a);
    let m = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped();
    assert_eq!(
        addr_words(m),
        agent_common::v4_mapped(u32::from(Ipv4Addr::new(127, 0, 0, 1)).to_be())
    );
}
