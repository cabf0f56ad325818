//! Accepted policies: the DESIGN example compiles with the indices, zones and side table the
//! kernel form and `explain` rely on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::compiled::{Action, Approval, Mode};

use super::{
    compile_str,
    diag::Pos,
    eval::{self, ConnectCall, PrincipalState, Reason, Verdict},
    explain::{Call, explain},
};

pub(super) const DESIGN_EXAMPLE: &str = r#"apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: research-agents
spec:
  identities:
    - spiffe://example.org/agent/research/*
  mode: enforce
  defaultAction: deny
  zones:
    llm-api:       { cidrs: [203.0.113.10/32] }
    internal-data: { cidrs: [10.20.0.0/16, "fd00:20::/32"] }
    local:         { cidrs: [127.0.0.0/8, "::1/128"] }
    internet:      { cidrs: [0.0.0.0/0, "::/0"] }
    resolver:      { cidrs: [10.96.0.10/32] }
    docker:        { unix: [/var/run/docker.sock] }
  connect:
    - { action: allow, zones: [llm-api], ports: [443], protocols: [tcp] }
    - { action: allow, zones: [internal-data], ports: [5432] }
    - { action: deny,  zones: [internet], ports: [25] }
  exec:
    - { action: allow, paths: [/usr/bin/python3, /usr/bin/git, /opt/agent/**] }
    - { action: deny,  paths: [/usr/bin/curl, /usr/bin/ssh] }
  chaining:
    - after: [internal-data]
      deny:  [internet, llm-api]
  grants:
    - name: crm-write
      zones: [internal-data]
      ports: [5433]
      maxTtl: 15m
      approval: required
"#;

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[test]
fn design_example_compiles() {
    let c = compile_str("design.yaml", DESIGN_EXAMPLE, 3).expect("design example is valid");
    assert_eq!(c.revision, 3);
    let p = &c.policies[0];
    assert_eq!(p.name, "research-agents");
    assert_eq!((p.mode, p.default_action), (Mode::Enforce, Action::Deny));
    // `internal-data` is in chaining.after: it gets zone index 0.
    let names: Vec<&str> = p.zones.iter().map(|z| z.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "internal-data",
            "llm-api",
            "local",
            "internet",
            "resolver",
            "docker"
        ]
    );
    assert_eq!(p.connect.len(), 3);
    assert_eq!(p.connect[2].index, 2);
    assert_eq!(p.connect[2].zones, vec![3]);
    assert_eq!(p.chaining[0].after, vec![0]);
    assert_eq!(p.chaining[0].deny, vec![1, 3]);
    let a = p;
    assert_eq!(a.exec[0].prefixes, vec!["/opt/agent/".to_owned()]);
    assert_eq!(a.exec[1].exact, vec!["/usr/bin/curl", "/usr/bin/ssh"]);
    assert_eq!(a.grants[0].approval, Approval::Required);
    assert_eq!(a.grants[0].max_ttl.as_secs(), 900);
    assert_eq!(a.unix[0].zone, 5);
    let s = &p.source;
    assert_eq!(s.connect[0], Pos { line: 18, col: 7 });
    assert_eq!(s.exec[1], Pos { line: 23, col: 7 });
    assert_eq!(s.at(s.connect[2]), "design.yaml:20:7");
}

#[test]
fn design_example_decides_as_documented() {
    let c = compile_str("design.yaml", DESIGN_EXAMPLE, 1).expect("valid");
    let p = &c.policies[0];
    let mut st = PrincipalState::default();
    let call = |addr, port, proto| ConnectCall { addr, port, proto };
    let tcp = agent_common::PROTO_TCP;

    let d = eval::connect(Some(p), &st, &call(v4(203, 0, 113, 10), 443, tcp), 0);
    assert_eq!(
        (d.verdict, d.reason, d.rule),
        (Verdict::Allow, Reason::Rule, Some(0))
    );
    // IPv4-mapped IPv6 counts as IPv4.
    let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 10).to_ipv6_mapped());
    assert_eq!(
        eval::connect(Some(p), &st, &call(mapped, 443, tcp), 0).rule,
        Some(0)
    );
    // Longest prefix: 10.96.0.10 is `resolver`, not `internet`; nothing allows it.
    let d = eval::connect(Some(p), &st, &call(v4(10, 96, 0, 10), 53, 17), 0);
    assert_eq!(
        (d.verdict, d.reason, d.zone),
        (Verdict::Deny, Reason::Default, Some(4))
    );
    let d = eval::connect(Some(p), &st, &call(v4(8, 8, 8, 8), 25, tcp), 0);
    assert_eq!((d.verdict, d.rule), (Verdict::Deny, Some(2)));
    // Touch internal data, then the LLM API is refused by chaining.
    let d = eval::connect(Some(p), &st, &call(v4(10, 20, 1, 1), 5432, tcp), 0);
    assert_eq!(d.verdict, Verdict::Allow);
    eval::record(&mut st, &d);
    let d = eval::connect(Some(p), &st, &call(v4(203, 0, 113, 10), 443, tcp), 0);
    assert_eq!((d.verdict, d.reason), (Verdict::Deny, Reason::Chaining));
    let six: IpAddr = IpAddr::V6("fd00:20::5".parse::<Ipv6Addr>().expect("addr"));
    assert_eq!(
        eval::connect(Some(p), &st, &call(six, 5432, 17), 0).zone,
        Some(0)
    );

    assert_eq!(eval::exec(Some(p), "/opt/agent/bin/x").rule, Some(0));
    assert_eq!(eval::exec(Some(p), "/usr/bin/curl").verdict, Verdict::Deny);
    let d = eval::exec(Some(p), "/usr/bin/perl");
    assert_eq!((d.verdict, d.reason), (Verdict::Deny, Reason::Default));
    assert_eq!(eval::exec(Some(p), "/opt/agent").reason, Reason::Default);
}

#[test]
fn explain_names_rule_line_and_zone() {
    let c = compile_str("design.yaml", DESIGN_EXAMPLE, 1).expect("valid");
    let e = explain(
        &c,
        "spiffe://example.org/agent/research/r1",
        Call::Connect(ConnectCall {
            addr: v4(1, 2, 3, 4),
            port: 25,
            proto: agent_common::PROTO_TCP,
        }),
    );
    let text = e.to_string();
    assert!(text.contains("verdict:  deny"), "{text}");
    assert!(text.contains("rule:     #2 at design.yaml:20:7"), "{text}");
    assert!(text.contains("zone:     internet"), "{text}");
    assert!(text.contains("after contacting internal-data"), "{text}");
    let e = explain(
        &c,
        "spiffe://example.org/agent/other/r1",
        Call::Exec {
            given: "/usr/bin/git".into(),
            resolved: "/usr/bin/git".into(),
        },
    );
    assert_eq!(
        (e.decision.verdict, e.decision.reason),
        (Verdict::Deny, Reason::NoPolicy)
    );
    assert!(e.to_string().contains("policy:   none"));
}

#[test]
fn most_specific_identity_pattern_governs() {
    let src = format!(
        "{}---\n{}",
        DESIGN_EXAMPLE,
        DESIGN_EXAMPLE
            .replace("research-agents", "r1-only")
            .replace("research/*", "research/r1")
    );
    let c = compile_str("two.yaml", &src, 1).expect("valid: different specificity");
    assert_eq!(
        c.policy_for("spiffe://example.org/agent/research/r1"),
        Some(1)
    );
    assert_eq!(
        c.policy_for("spiffe://example.org/agent/research/r2"),
        Some(0)
    );
    assert_eq!(c.policy_for("spiffe://example.org/agent/x/r2"), None);
}

#[test]
fn every_example_file_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        if let Err(e) = super::compile_file(&path, 1) {
            panic!("{} fails check:\n{e}", path.display());
        }
        n += 1;
    }
    assert!(
        n >= 5,
        "expected the quickstart and four seed-control examples, found {n}"
    );
}

#[test]
fn zones_by_host_name_compile_with_their_most_specific_pattern() {
    let src = "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: { name: p }
spec:
  identities: [spiffe://e.org/a/*]
  dns: { allowUnlisted: true }
  zones:
    github: { hosts: [api.github.com, \"*.githubusercontent.com\"] }
    any-example: { hosts: [\"**.example.com\"] }
    one-example: { hosts: [\"*.example.com\"], cidrs: [10.0.0.0/8] }
  connect:
    - { action: allow, zones: [github, one-example], ports: [443] }
";
    let mut sink = crate::diag::Sink::new("p.yaml");
    let nodes = crate::yaml::documents(src, &mut sink).expect("yaml");
    let docs = crate::parse::documents(&nodes, &mut sink);
    assert!(sink.is_empty());
    let set = crate::compile::compile("p.yaml", &docs, 1);
    let p = &set.policies[0];
    assert!(p.dns_allow_unlisted && p.has_hosts());
    let zone = |n: &str| {
        p.zone_of_name(n)
            .map(|h| p.zones[h.zone as usize].name.as_str())
    };
    assert_eq!(zone("api.github.com"), Some("github"));
    assert_eq!(zone("raw.githubusercontent.com"), Some("github"));
    assert_eq!(
        zone("a.example.com"),
        Some("one-example"),
        "`*.` beats `**.`"
    );
    assert_eq!(zone("a.b.example.com"), Some("any-example"));
    assert_eq!(zone("example.com"), None);
    assert_eq!(zone("github.com"), None);
}
