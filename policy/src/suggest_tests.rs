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
        calls: 1,
    }
}

fn tcp(addr: &str, port: u16) -> Call {
    Call::Connect(ConnectCall {
        addr: addr.parse::<IpAddr>().expect("addr"),
        port,
        proto: 6,
    })
}

fn opts() -> Options {
    Options {
        name: "suggested".into(),
        identities: vec!["spiffe://example.org/agent/*".into()],
        ..Options::default()
    }
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
    let yaml = suggest(&calls, &opts());
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
    let yaml = suggest(&recording(), &opts());
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
fn an_event_for_repeated_calls_counts_each_call() {
    let mut calls = recording();
    // The first local call's event reported 9 identical calls before it.
    calls[0].calls = 10;
    let yaml = suggest(&calls, &opts());
    for want in [
        "# 11 calls, 2 sessions, first 2025-12-06T00:00:00Z",
        "from 16 recorded calls",
    ] {
        assert!(yaml.contains(want), "missing {want:?} in\n{yaml}");
    }
}

#[test]
fn a_call_outside_the_suggestion_is_denied_by_it() {
    let calls = recording();
    let set = compile_str("s.yaml", &suggest(&calls, &opts()), 1).expect("compiles");
    let new = vec![rec("s3", tcp("10.1.2.3", 22), None, 0)];
    assert_eq!(simulate(&set, &new).newly_denied(), 1);
}

#[test]
fn times_read_back_as_written() {
    for ns in [0u64, 1_764_979_200_000_000_000, 1_796_522_549_000_000_000] {
        assert_eq!(parse_utc(&utc(ns)), Some(ns), "{}", utc(ns));
    }
    assert_eq!(parse_utc("1764979200"), Some(1_764_979_200_000_000_000));
    assert_eq!(parse_utc("2025-13-01T00:00:00Z"), None);
    assert_eq!(parse_utc("yesterday"), None);
}

#[test]
fn exec_prefixes_only_where_asked_and_where_two_binaries_ran() {
    let calls = vec![
        rec("s1", Call::Exec("/usr/bin/python3".into()), None, 1),
        rec("s1", Call::Exec("/usr/bin/git".into()), None, 2),
        rec("s1", Call::Exec("/opt/tool/run".into()), None, 3),
    ];
    let exact = suggest(&calls, &opts());
    assert!(
        exact.contains("paths: [\"/usr/bin/git\"]") && !exact.contains("**"),
        "{exact}"
    );
    let y = suggest(
        &calls,
        &Options {
            exec_prefixes: true,
            ..opts()
        },
    );
    assert!(y.contains("paths: [\"/usr/bin/**\"] }"), "{y}");
    assert!(y.contains("# 2 calls, 1 session"), "{y}");
    assert!(y.contains("paths: [\"/opt/tool/run\"]"), "{y}");
    compile_str("p.yaml", &y, 1).unwrap_or_else(|e| panic!("{e}\n{y}"));
}

#[test]
fn chaining_is_suggested_where_no_session_went_on_and_changes_nothing_recorded() {
    let calls = vec![
        // Two sessions reach the database, then only loopback; the web is reached by a
        // third session that never touched the database.
        rec("s1", tcp("10.1.2.3", 5432), None, 1),
        rec("s1", tcp("127.0.0.1", 8080), None, 2),
        rec("s2", tcp("10.1.2.3", 5432), None, 3),
        rec("s3", tcp("151.101.0.223", 443), Some("pypi.org"), 4),
    ];
    let o = Options {
        chaining: true,
        ..opts()
    };
    let y = suggest(&calls, &o);
    assert!(
        y.contains("- { after: [ip-10-1-2-3], deny: [pypi-org] }"),
        "{y}"
    );
    assert!(
        y.contains("# suggested: none of the 2 sessions that reached ip-10-1-2-3"),
        "{y}"
    );
    assert!(
        !y.contains("deny: [local"),
        "s1 reached local after the database:\n{y}"
    );
    let set = compile_str("p.yaml", &y, 1).unwrap_or_else(|e| panic!("{e}\n{y}"));
    let r = simulate(&set, &calls);
    assert_eq!((r.newly_denied(), r.newly_allowed()), (0, 0), "{r:?}\n{y}");
    // A later session that reaches the web after the database is what the rule stops.
    let later = vec![
        rec("s4", tcp("10.1.2.3", 5432), None, 5),
        rec("s4", tcp("151.101.0.223", 443), Some("pypi.org"), 6),
    ];
    assert_eq!(simulate(&set, &later).newly_denied(), 1);
}
