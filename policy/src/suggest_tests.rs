use std::net::IpAddr;

use super::*;
use crate::{compile_str, eval::ConnectCall, simulate::simulate};

fn rec(session: &str, call: Call, name: Option<&str>, t: u64) -> Recorded {
    Recorded {
        identity: "spiffe://example.org/agent/a".into(),
        session: session.into(),
        call,
        went_through: true,
        by_grant: false,
        what: String::new(),
        name: name.map(str::to_owned),
        time_unix_nano: t,
    }
}

fn tcp(addr: &str, port: u16) -> Call {
    Call::Connect(ConnectCall {
        addr: addr.parse::<IpAddr>().expect("addr"),
        port,
        proto: 6,
    })
}

fn recording() -> Vec<Recorded> {
    vec![
        rec(
            "s1",
            tcp("127.0.0.1", 8080),
            None,
            1_764_979_200_000_000_000,
        ),
        rec("s1", tcp("10.1.2.3", 5432), None, 1_764_979_201_000_000_000),
        rec(
            "s2",
            tcp("151.101.0.223", 443),
            Some("pypi.org"),
            1_764_979_202_000_000_000,
        ),
        rec(
            "s2",
            tcp("127.0.0.1", 9090),
            None,
            1_764_979_203_000_000_000,
        ),
        rec(
            "s2",
            Call::Unix("/run/docker.sock".into()),
            None,
            1_764_979_204_000_000_000,
        ),
        rec(
            "s1",
            Call::Exec("/usr/bin/python3".into()),
            None,
            1_764_979_205_000_000_000,
        ),
        Recorded {
            went_through: false,
            ..rec("s1", tcp("192.0.2.1", 25), None, 1_764_979_206_000_000_000)
        },
    ]
}

#[test]
fn the_suggestion_is_a_valid_policy_that_changes_nothing_of_the_recording() {
    let calls = recording();
    let yaml = suggest(
        &calls,
        "suggested",
        &["spiffe://example.org/agent/*".into()],
    );
    let set = compile_str("suggested.yaml", &yaml, 1).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let r = simulate(&set, &calls);
    assert_eq!(r.newly_denied(), 0, "{r:?}\n{yaml}");
    assert_eq!(
        r.newly_allowed(),
        0,
        "the denied call stays denied: {r:?}\n{yaml}"
    );
}

#[test]
fn zones_rules_and_comments_say_what_was_seen() {
    let yaml = suggest(
        &recording(),
        "suggested",
        &["spiffe://example.org/agent/*".into()],
    );
    for want in [
        "pypi-org: { hosts: [\"pypi.org\"] }",
        "local: { cidrs: [127.0.0.0/8, \"::1/128\"] }",
        "ip-10-1-2-3: { cidrs: [10.1.2.3/32] }",
        "unix-docker-sock: { unix: [\"/run/docker.sock\"] }",
        "- { action: allow, zones: [local], ports: [8080, 9090], protocols: [tcp] }",
        "# 2 calls, 2 sessions, first 2025-12-06T00:00:00Z, last 2025-12-06T00:00:03Z",
        "- { action: allow, paths: [\"/usr/bin/python3\"] }",
        "defaultAction: deny",
        "(1 not covered",
    ] {
        assert!(yaml.contains(want), "missing {want:?} in\n{yaml}");
    }
    assert!(
        !yaml.contains("192.0.2.1"),
        "a denied call is not suggested:\n{yaml}"
    );
}

#[test]
fn a_call_outside_the_suggestion_is_denied_by_it() {
    let calls = recording();
    let set = compile_str(
        "s.yaml",
        &suggest(&calls, "s", &["spiffe://example.org/agent/*".into()]),
        1,
    )
    .expect("compiles");
    let new = vec![rec("s3", tcp("10.1.2.3", 22), None, 0)];
    assert_eq!(simulate(&set, &new).newly_denied(), 1);
}
