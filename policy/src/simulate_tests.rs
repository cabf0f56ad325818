use std::net::IpAddr;

use super::*;
use crate::compile_str;

const ID: &str = "spiffe://example.org/agent/a";

fn candidate(extra: &str) -> CompiledSet {
    let src = format!(
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {{ name: cand }}\n\
         spec:\n  identities: [\"spiffe://example.org/agent/**\"]\n  defaultAction: deny\n  \
         zones:\n    web: {{ cidrs: [10.0.0.0/8] }}\n    secrets: {{ cidrs: [10.99.0.0/16] }}\n  \
         connect:\n    - {{ action: allow, zones: [web], ports: [443] }}\n    \
         - {{ action: allow, zones: [secrets], ports: [5432] }}\n{extra}  \
         exec:\n    - {{ action: allow, paths: [/usr/bin/python3] }}\n"
    );
    compile_str("cand.yaml", &src, 1).expect("candidate compiles")
}

fn connect(session: &str, addr: &str, port: u16, went_through: bool) -> Recorded {
    Recorded {
        identity: ID.into(),
        session: session.into(),
        call: Call::Connect(ConnectCall {
            addr: addr.parse::<IpAddr>().expect("addr"),
            port,
            proto: 6,
        }),
        went_through,
        by_grant: false,
        what: format!("connect tcp {addr}:{port}"),
        name: None,
        time_unix_nano: 0,
        calls: 1,
    }
}

#[test]
fn calls_the_candidate_decides_alike_are_unchanged() {
    let calls = vec![
        connect("s1", "10.1.2.3", 443, true),
        connect("s1", "192.0.2.1", 443, false),
    ];
    let r = simulate(&candidate(""), &calls);
    assert_eq!((r.replayed, r.unchanged, r.changes.len()), (2, 2, 0));
    assert_eq!(r.newly_denied(), 0);
}

#[test]
fn newly_denied_and_newly_allowed_are_grouped_by_what_decides_them() {
    let calls = vec![
        // Went through; the candidate has no rule for port 80: default deny, twice.
        connect("s1", "10.1.2.3", 80, true),
        connect("s2", "10.4.5.6", 80, true),
        // Was denied; the candidate's rule 0 allows it.
        connect("s1", "10.1.2.3", 443, false),
        Recorded {
            call: Call::Exec("/usr/bin/curl".into()),
            what: "exec /usr/bin/curl".into(),
            ..connect("s1", "10.1.2.3", 443, true)
        },
    ];
    let r = simulate(&candidate(""), &calls);
    assert_eq!(r.newly_denied(), 3);
    assert_eq!(r.newly_allowed(), 1);
    assert!(r.changes[0].decider.newly_denied, "{r:?}");
    let default = r
        .changes
        .iter()
        .find(|c| c.decider.reason == "default" && c.decider.kind == "connect")
        .expect("default group");
    assert_eq!(default.count, 2);
    // An event standing for repeated calls counts each of them.
    let mut repeated = calls.clone();
    repeated[0].calls = 1 + 41;
    let r = simulate(&candidate(""), &repeated);
    assert_eq!(r.newly_denied(), 3 + 41);
    assert_eq!(r.replayed, 4 + 41);
    assert!(
        r.changes
            .iter()
            .any(|c| c.decider.kind == "exec" && c.example == "exec /usr/bin/curl")
    );
    let allowed = r.changes.last().expect("an allow group");
    assert_eq!(
        (allowed.decider.newly_denied, allowed.decider.rule),
        (false, Some(0))
    );
    assert_eq!(allowed.decider.policy, "cand");
}

#[test]
fn chaining_evolves_per_session_in_recorded_order() {
    let chaining = "  chaining:\n    - { after: [web], deny: [secrets] }\n";
    let calls = vec![
        // s1 reaches secrets first, then the web: both fine.
        connect("s1", "10.99.0.1", 5432, true),
        connect("s1", "10.1.2.3", 443, true),
        // s2 reaches the web first: its later secrets call is chained.
        connect("s2", "10.1.2.3", 443, true),
        connect("s2", "10.99.0.1", 5432, true),
    ];
    let r = simulate(&candidate(chaining), &calls);
    assert_eq!(r.newly_denied(), 1, "{r:?}");
    assert_eq!(r.changes[0].decider.reason, "chaining");
    assert_eq!(r.changes[0].example, "connect tcp 10.99.0.1:5432");
}

#[test]
fn grant_allowed_calls_are_counted_not_replayed() {
    let mut c = connect("s1", "10.1.2.3", 80, true);
    c.by_grant = true;
    let r = simulate(&candidate(""), &[c]);
    assert_eq!((r.replayed, r.by_grant, r.newly_denied()), (0, 1, 0));
}

#[test]
fn an_identity_no_candidate_policy_governs_is_denied_everything() {
    let mut c = connect("s1", "10.1.2.3", 443, true);
    c.identity = "spiffe://other.org/x".into();
    let r = simulate(&candidate(""), &[c]);
    assert_eq!(r.newly_denied(), 1);
    assert_eq!(r.changes[0].decider.reason, "no-policy");
    assert_eq!(r.changes[0].decider.policy, "");
}
