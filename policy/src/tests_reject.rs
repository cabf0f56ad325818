//! Every rejection: its message (what is wrong and what to write instead) and its location.
//! Expected columns are computed from the source text, so each test pins the exact token.

use super::{Diagnostic, parse_str};

const BASE: &str = "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: p
spec:
  identities: [spiffe://e.org/a/*]
  zones:
    local: { cidrs: [127.0.0.0/8] }
  connect:
    - { action: allow, zones: [local], ports: [80] }
";

fn diags(src: &str) -> Vec<Diagnostic> {
    match parse_str("p.yaml", src) {
        Ok(_) => panic!("accepted but should be rejected:\n{src}"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

/// Column (1-based) of the `nth` occurrence of `needle` on line `line` of `src`.
fn col_of(src: &str, line: u32, needle: &str, nth: usize) -> u32 {
    let l = src.lines().nth(line as usize - 1).expect("line exists");
    let mut from = 0;
    for _ in 0..nth {
        from += l[from..].find(needle).expect("needle on line") + needle.len();
    }
    let at = from + l[from..].find(needle).expect("needle on line");
    u32::try_from(at + 1).expect("small")
}

/// Asserts one diagnostic at `line`, at the `needle` token there, containing every `parts`.
fn rejects(src: &str, line: u32, needle: &str, parts: &[&str]) {
    rejects_nth(src, line, needle, 0, parts);
}

fn rejects_nth(src: &str, line: u32, needle: &str, nth: usize, parts: &[&str]) {
    let ds = diags(src);
    let col = col_of(src, line, needle, nth);
    let found = ds.iter().find(|d| {
        d.pos.line == line && d.pos.col == col && parts.iter().all(|p| d.message.contains(p))
    });
    assert!(
        found.is_some(),
        "expected p.yaml:{line}:{col}: …{parts:?}… in:\n{}",
        ds.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let d = found.expect("checked");
    assert_eq!(d.to_string(), format!("p.yaml:{line}:{col}: {}", d.message));
}

#[test]
fn base_is_valid() {
    parse_str("p.yaml", BASE).expect("base policy is valid");
}

#[test]
fn unknown_fields() {
    rejects(
        &format!("extra: 1\n{BASE}"),
        1,
        "extra",
        &["unknown field `extra`", "`apiVersion`"],
    );
    let src = BASE.replace("  zones:\n", "  defaultaction: deny\n  zones:\n");
    rejects(&src, 7, "defaultaction", &["did you mean `defaultAction`?"]);
    let src = BASE.replace("zones: [local], ports", "zone: [local], ports");
    rejects(
        &src,
        10,
        "zone:",
        &["unknown field `zone`", "did you mean `zones`?"],
    );
    let src = BASE.replace("{ cidrs: [127.0.0.0/8] }", "{ cidr: [127.0.0.0/8] }");
    rejects(
        &src,
        8,
        "cidr",
        &["zone `local`: unknown field `cidr`", "`cidrs`"],
    );
    let src = BASE.replace("  name: p\n", "  name: p\n  labels: {}\n");
    rejects(&src, 5, "labels", &["metadata: unknown field `labels`"]);
}

#[test]
fn repeated_field() {
    let src = BASE.replace(
        "    - { action: allow,",
        "    - { action: allow, action: deny,",
    );
    rejects_nth(
        &src,
        10,
        "action",
        1,
        &["field `action` is given twice", "keep one"],
    );
}

#[test]
fn bad_cidrs() {
    let src = BASE.replace("127.0.0.0/8", "127.0.0.0/33");
    rejects(
        &src,
        8,
        "127.0.0.0/33",
        &["not a valid CIDR", "0-32 for IPv4"],
    );
    let src = BASE.replace("127.0.0.0/8", "127.0.0.1/8");
    rejects(
        &src,
        8,
        "127.0.0.1/8",
        &["host bits set", "write `127.0.0.0/8`"],
    );
    let src = BASE.replace("127.0.0.0/8", "127.0.0.1");
    rejects(
        &src,
        8,
        "127.0.0.1",
        &["no prefix length", "`127.0.0.1/32`"],
    );
    let src = BASE.replace("127.0.0.0/8", "\"fd00::1/16\"");
    rejects(&src, 8, "\"fd00", &["host bits set", "write `fd00::/16`"]);
    let src = BASE.replace("127.0.0.0/8", "example.com/8");
    rejects(&src, 8, "example.com/8", &["not a valid CIDR"]);
}

#[test]
fn undefined_zone() {
    let src = BASE.replace("zones: [local]", "zones: [locl]");
    rejects(
        &src,
        10,
        "locl",
        &["zone `locl` is not defined in policy `p`", "`local`"],
    );
}

#[test]
fn duplicate_zone() {
    let src = BASE.replace(
        "  connect:\n",
        "    local: { cidrs: [10.0.0.0/8] }\n  connect:\n",
    );
    rejects(
        &src,
        9,
        "local",
        &["zone `local` is defined twice (first at 8:5)"],
    );
}

#[test]
fn same_cidr_in_two_zones() {
    let src = BASE.replace(
        "  connect:\n",
        "    lo2: { cidrs: [127.0.0.0/8] }\n  connect:\n",
    );
    rejects(&src, 9, "127.0.0.0/8", &["already in zone `local`"]);
}

#[test]
fn duplicate_policy_names() {
    let second = BASE.replace("spiffe://e.org/a/*", "spiffe://e.org/b/*");
    let src = format!("{BASE}---\n{second}");
    rejects(
        &src,
        15,
        "p",
        &["policy name `p` is used twice (first at 4:9)"],
    );
}

#[test]
fn equally_specific_overlapping_identities() {
    let second = BASE
        .replace("name: p", "name: q")
        .replace("spiffe://e.org/a/*", "spiffe://e.org/*/x");
    let src = format!("{BASE}---\n{second}");
    rejects(
        &src,
        17,
        "spiffe://e.org/*/x",
        &[
            "overlaps `spiffe://e.org/a/*` of policy `p`",
            "exactly as specific",
        ],
    );
    // More specific, or disjoint: accepted.
    let ok = BASE
        .replace("name: p", "name: q")
        .replace("spiffe://e.org/a/*", "spiffe://e.org/a/x");
    parse_str("p.yaml", &format!("{BASE}---\n{ok}")).expect("more specific is fine");
    let ok = BASE
        .replace("name: p", "name: q")
        .replace("spiffe://e.org/a/*", "spiffe://e.org/b/*");
    parse_str("p.yaml", &format!("{BASE}---\n{ok}")).expect("disjoint is fine");
}

#[test]
fn ports_out_of_range() {
    for (bad, msg) in [
        ("0", "out of range"),
        ("65536", "out of range"),
        ("-1", "not a port"),
        ("http", "not a port"),
        ("8.5", "not a port"),
        ("[80]", "not a port"),
    ] {
        let src = BASE.replace("ports: [80]", &format!("ports: [{bad}]"));
        rejects(&src, 10, bad, &[msg, "from 1 to 65535"]);
    }
    let src = BASE.replace("ports: [80]", "ports: [\"80\"]");
    rejects(
        &src,
        10,
        "\"80\"",
        &["port `80` is quoted: write the number without quotes"],
    );
    let src = BASE.replace("ports: [80]", "ports: 80");
    rejects(&src, 10, "80", &["ports must be a list", "[443]"]);
}

#[test]
fn protocols() {
    let src = BASE.replace("ports: [80]", "ports: [80], protocols: [sctp]");
    rejects(
        &src,
        10,
        "sctp",
        &["protocol `sctp` is not valid", "`tcp`, `udp`, `icmp`"],
    );
    // icmp is a protocol, without ports: the position is the protocols list.
    let src = BASE.replace("ports: [80]", "ports: [80], protocols: [icmp]");
    rejects(&src, 10, "[icmp]", &["icmp has no ports"]);
}

#[test]
fn ttl_limits() {
    let grant = "  grants:\n    - { name: g, zones: [local], maxTtl: TTL }\n";
    for (ttl, msg) in [
        ("25h", "above the limit of 24h"),
        ("24h1s", "above the limit of 24h"),
        ("0s", "above zero"),
        ("15", "not a duration"),
        ("1d", "not a duration"),
    ] {
        let src = format!("{BASE}{}", grant.replace("TTL", ttl));
        rejects(&src, 12, ttl, &[msg]);
    }
    let src = format!("{BASE}{}", grant.replace("TTL", "24h"));
    parse_str("p.yaml", &src).expect("24h is the limit");
    let src = format!("{BASE}  grants:\n    - {{ name: g, zones: [local] }}\n");
    rejects(
        &src,
        12,
        "{",
        &["grant: missing field `maxTtl`", "maxTtl: 15m"],
    );
}

#[test]
fn empty_identities() {
    let src = BASE.replace("[spiffe://e.org/a/*]", "[]");
    rejects(&src, 6, "[]", &["identities is empty", "spiffe://"]);
    let src = BASE.replace("  identities: [spiffe://e.org/a/*]\n", "");
    rejects(&src, 6, "zones", &["spec: missing field `identities`"]);
    let src = BASE.replace(
        "    - { action: allow, zones: [local], ports: [80] }",
        "    - ports: [80]\n      zones: [local]",
    );
    rejects(
        &src,
        10,
        "ports",
        &["connect rule: missing field `action`", "action: allow"],
    );
}

#[test]
fn bad_spiffe_ids() {
    for (bad, msg) in [
        ("http://e.org/a", "must start with spiffe://"),
        ("spiffe://E.org/a", "invalid trust domain"),
        ("spiffe://e.org/a//b", "invalid path segment"),
        ("spiffe://e.org/**/a", "`**` may only be the last segment"),
        ("spiffe://e.org/a/../b", "invalid path segment"),
    ] {
        let src = BASE.replace("spiffe://e.org/a/*", bad);
        rejects(
            &src,
            6,
            bad,
            &[msg, "e.g. `spiffe://example.org/agent/research/*`"],
        );
    }
}

#[test]
fn bad_actions_and_modes() {
    let src = BASE.replace("action: allow", "action: permit");
    rejects(
        &src,
        10,
        "permit",
        &["action `permit` is not valid", "`allow`, `deny`"],
    );
    let src = BASE.replace("  zones:\n", "  mode: block\n  zones:\n");
    rejects(
        &src,
        7,
        "block",
        &["mode `block` is not valid", "`enforce`, `audit`"],
    );
    let src = BASE.replace("  zones:\n", "  defaultAction: reject\n  zones:\n");
    rejects(&src, 7, "reject", &["defaultAction `reject` is not valid"]);
    let src = format!(
        "{BASE}  grants:\n    - {{ name: g, zones: [local], maxTtl: 1h, approval: maybe }}\n"
    );
    rejects(
        &src,
        12,
        "maybe",
        &["approval `maybe` is not valid", "`required`, `auto`"],
    );
}

#[test]
fn header_fields() {
    let src = BASE.replace("corral.dev/v1alpha1", "corral.dev/v2");
    rejects(
        &src,
        1,
        "corral.dev/v2",
        &[
            "apiVersion `corral.dev/v2` is not supported",
            "corral.dev/v1alpha1",
        ],
    );
    let src = BASE.replace("AgentPolicy", "NetworkPolicy");
    rejects(
        &src,
        2,
        "NetworkPolicy",
        &["kind `NetworkPolicy` is not supported"],
    );
    let src = BASE.replace("name: p", "name: My_Policy");
    rejects(
        &src,
        4,
        "My_Policy",
        &["policy name `My_Policy` is not valid", "lowercase"],
    );
}

#[test]
fn exec_paths() {
    for bad in [
        "bin/curl",
        "/usr/../bin/curl",
        "/usr/bin/*",
        "/usr//bin",
        "/opt/**/x",
    ] {
        let src = format!("{BASE}  exec:\n    - {{ action: deny, paths: [{bad}] }}\n");
        rejects(&src, 12, bad, &["exec path", "not valid", "/opt/agent/**"]);
    }
}

#[test]
fn too_many_chaining_zones() {
    let mut zones = String::new();
    let mut after = Vec::new();
    for i in 0..65 {
        zones.push_str(&format!("    z{i}: {{ cidrs: [10.{i}.0.0/16] }}\n"));
        after.push(format!("z{i}"));
    }
    let src = BASE.replace("  connect:\n", &format!("{zones}  connect:\n"))
        + &format!(
            "  chaining:\n    - {{ after: [{}], deny: [local] }}\n",
            after.join(", ")
        );
    rejects(
        &src,
        77,
        "z64",
        &["65th distinct zone in `chaining.after`", "at most 64"],
    );
}

#[test]
fn yaml_syntax_error_is_located() {
    let src = BASE.replace("ports: [80] }", "ports: [80 }");
    let ds = diags(&src);
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert!(ds[0].message.starts_with("invalid YAML"), "{ds:?}");
    assert_eq!(ds[0].pos.line, 10);
}

#[test]
fn empty_file_and_empty_lists() {
    let ds = diags("# nothing here\n");
    assert_eq!((ds[0].pos.line, ds[0].pos.col), (1, 1));
    assert!(ds[0].message.contains("no policy in this file"));
    let src = BASE.replace("zones: [local]", "zones: []");
    rejects(&src, 10, "[]", &["zones is empty"]);
    let src = BASE.replace("{ cidrs: [127.0.0.0/8] }", "{ cidrs: [] }");
    rejects(&src, 8, "{", &["zone `local` has no destinations"]);
}

#[test]
fn duplicate_grant_names() {
    let src = format!(
        "{BASE}  grants:\n    - {{ name: g, zones: [local], maxTtl: 1h }}\n    - {{ name: g, zones: [local], maxTtl: 2h }}\n"
    );
    rejects(
        &src,
        13,
        "g,",
        &["grant `g` is defined twice", "(first at 12:15)"],
    );
}

#[test]
fn file_is_rejected_whole_with_every_error() {
    let bad = BASE
        .replace("name: p", "name: q")
        .replace("spiffe://e.org/a/*", "spiffe://e.org/b/*")
        .replace("ports: [80]", "ports: [0, 70000]");
    let src = format!("{BASE}---\n{bad}");
    let ds = diags(&src);
    assert_eq!(ds.len(), 2, "both bad ports reported: {ds:?}");
    assert!(ds.iter().all(|d| d.pos.line == 21));
    assert!(super::compile_str("p.yaml", &src, 1).is_err());
}

#[test]
fn anchors_and_tags_refused() {
    let src = BASE.replace("[127.0.0.0/8]", "&n [127.0.0.0/8]");
    rejects(&src, 8, "[127", &["anchors"]);
    let src = BASE.replace("ports: [80]", "ports: !!seq [80]");
    rejects(&src, 10, "[80]", &["tags"]);
}

#[test]
fn bad_hosts_are_rejected_where_written() {
    let src = BASE.replace(
        "    local: { cidrs: [127.0.0.0/8] }\n",
        "    local: { cidrs: [127.0.0.0/8] }\n    web: { hosts: [api.github.com, \"*\"] }\n",
    );
    rejects(&src, 9, "\"*\"", &["host `*`", "whole first label"]);
    let src = BASE.replace(
        "    local: { cidrs: [127.0.0.0/8] }\n",
        "    local: { cidrs: [127.0.0.0/8] }\n    web: { hosts: [\"*.com\"] }\n",
    );
    rejects(&src, 9, "\"*.com\"", &["too wide", "*.example.com"]);
    let src = BASE.replace(
        "    local: { cidrs: [127.0.0.0/8] }\n",
        "    local: { cidrs: [127.0.0.0/8], hosts: [pypi.org] }\n    web: { hosts: [PyPI.org] }\n",
    );
    rejects(&src, 9, "PyPI.org", &["already in zone `local`"]);
    let src = BASE.replace(
        "  zones:\n",
        "  dns: { allowUnlisted: yes, cache: 1 }\n  zones:\n",
    );
    let ds = diags(&src);
    assert!(
        ds.iter().any(|d| d.message.contains("allowUnlisted")),
        "{ds:?}"
    );
    assert!(ds.iter().any(|d| d.message.contains("cache")), "{ds:?}");
}
