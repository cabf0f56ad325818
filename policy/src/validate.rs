//! Checks that need more than one value: zone references, overlapping zones, grant names
//! within a policy; policy names and identity patterns across the documents of a file.

use std::collections::{HashMap, HashSet};

use agent_common::maps::limits;

use super::{
    ast::PolicyDoc,
    diag::{Sink, Spanned},
};

/// Reports every cross-field and cross-document problem in `docs`.
pub fn check(docs: &[PolicyDoc], sink: &mut Sink) {
    for d in docs {
        policy(d, sink);
    }
    across(docs, sink);
}

fn policy(d: &PolicyDoc, sink: &mut Sink) {
    let defined: HashSet<&str> = d.zones.iter().map(|z| z.name.value.as_str()).collect();
    let check_ref = |r: &Spanned<String>, sink: &mut Sink| {
        if !defined.contains(r.value.as_str()) {
            let known = if defined.is_empty() {
                "this policy defines no zones: add it under `spec.zones`".to_owned()
            } else {
                let mut names: Vec<&str> = defined.iter().copied().collect();
                names.sort_unstable();
                format!(
                    "define it under `spec.zones` or use one of {}",
                    names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            sink.error(
                r.pos,
                format!(
                    "zone `{}` is not defined in policy `{}`: {known}",
                    r.value, d.name.value
                ),
            );
        }
    };
    for r in &d.connect {
        r.zones.iter().for_each(|z| check_ref(z, sink));
    }
    for c in &d.chaining {
        c.after.iter().for_each(|z| check_ref(z, sink));
        c.deny.iter().for_each(|z| check_ref(z, sink));
    }
    for g in &d.grants {
        g.zones.iter().for_each(|z| check_ref(z, sink));
    }

    // One prefix in two zones would make the zone of a destination depend on write order.
    let mut owner: HashMap<(std::net::Ipv6Addr, u8), &str> = HashMap::new();
    for z in &d.zones {
        for n in &z.nets {
            let k = (
                crate::compiled::addr_from_words(&n.value.kernel_addr()),
                n.value.bits(),
            );
            match owner.get(&k) {
                Some(other) if *other != z.name.value => sink.error(
                    n.pos,
                    format!(
                        "this CIDR is already in zone `{other}`: a destination must belong to one \
                         zone, so remove it from one of them"
                    ),
                ),
                _ => {
                    owner.insert(k, &z.name.value);
                }
            }
        }
    }
    let mut unix_owner: HashMap<&str, &str> = HashMap::new();
    for z in &d.zones {
        for u in &z.unix {
            match unix_owner.get(u.value.as_str()) {
                Some(other) if *other != z.name.value => sink.error(
                    u.pos,
                    format!(
                        "unix socket `{}` is already in zone `{other}`: remove it from one of them",
                        u.value
                    ),
                ),
                _ => {
                    unix_owner.insert(&u.value, &z.name.value);
                }
            }
        }
    }
    let mut host_owner: HashMap<&crate::hosts::HostPattern, &str> = HashMap::new();
    for z in &d.zones {
        for h in &z.hosts {
            match host_owner.get(&h.value) {
                Some(other) if *other != z.name.value => sink.error(
                    h.pos,
                    format!(
                        "host `{}` is already in zone `{other}`: a name must belong to one zone, \
                         so remove it from one of them",
                        h.value
                    ),
                ),
                _ => {
                    host_owner.insert(&h.value, &z.name.value);
                }
            }
        }
    }

    // The kernel's unix hooks compare the path string the caller passed. Under
    // `defaultAction: allow` a deny (a deny rule, or a chaining rule's deny list) is then the
    // only thing between a principal and the socket, and another path to the same socket (a
    // symlink, `/proc/self/root/...`, `//run/...`, a relative path, a bind mount) passes it.
    // Under default deny an alias is in no zone and is denied like any other path.
    if d.default_action == crate::compiled::Action::Allow {
        let with_unix: HashSet<&str> = d
            .zones
            .iter()
            .filter(|z| !z.unix.is_empty())
            .map(|z| z.name.value.as_str())
            .collect();
        let denied = d
            .connect
            .iter()
            .filter(|r| r.action == crate::compiled::Action::Deny)
            .flat_map(|r| r.zones.iter())
            .chain(d.chaining.iter().flat_map(|c| c.deny.iter()));
        for z in denied.filter(|z| with_unix.contains(z.value.as_str())) {
            sink.error(
                z.pos,
                format!(
                    "zone `{}` has unix sockets, and under `defaultAction: allow` denying them \
                     protects nothing: the kernel compares the path a caller passes, so another \
                     path to the same socket (a symlink, /proc/self/root/..., a bind mount) gets \
                     through. Write `defaultAction: deny` and allow the unix sockets the agent \
                     may use instead",
                    z.value
                ),
            );
        }
    }

    // A unix socket has no port and no protocol: a rule or grant that names ports or
    // protocols never matches one. Naming such a rule's zone is a mistake when the zone has
    // nothing else (a zone with CIDRs too: the rule applies to its IP destinations only).
    let unix_only: HashSet<&str> = d
        .zones
        .iter()
        .filter(|z| z.nets.is_empty() && !z.unix.is_empty())
        .map(|z| z.name.value.as_str())
        .collect();
    let check_unix_only = |what: &str, zones: &[Spanned<String>], sink: &mut Sink| {
        for z in zones
            .iter()
            .filter(|z| unix_only.contains(z.value.as_str()))
        {
            sink.error(
                z.pos,
                format!(
                    "zone `{}` has only unix sockets, which have no port or protocol, so this \
                     {what} (it names `ports` or `protocols`) would never apply to it: name the \
                     zone in a {what} without `ports` and `protocols`",
                    z.value
                ),
            );
        }
    };
    for r in d
        .connect
        .iter()
        .filter(|r| !r.ports.is_empty() || !r.protocols.is_empty())
    {
        check_unix_only("rule", &r.zones, sink);
    }
    for g in d
        .grants
        .iter()
        .filter(|g| !g.ports.is_empty() || !g.protocols.is_empty())
    {
        check_unix_only("grant", &g.zones, sink);
    }

    let mut after: Vec<&str> = Vec::new();
    for c in &d.chaining {
        for z in &c.after {
            if !after.contains(&z.value.as_str()) {
                after.push(&z.value);
                if after.len() as u64 == u64::from(limits::CHAIN_ZONES) + 1 {
                    sink.error(
                        z.pos,
                        format!(
                            "zone `{}` is the {}th distinct zone in `chaining.after`: the kernel \
                             tracks at most {} per policy; merge zones or split the policy",
                            z.value,
                            after.len(),
                            limits::CHAIN_ZONES
                        ),
                    );
                }
            }
        }
    }

    let mut grants: HashMap<&str, &Spanned<String>> = HashMap::new();
    for g in &d.grants {
        if let Some(first) = grants.get(g.name.value.as_str()) {
            sink.error(
                g.name.pos,
                format!(
                    "grant `{}` is defined twice in this policy (first at {}): rename one",
                    g.name.value, first.pos
                ),
            );
        } else {
            grants.insert(&g.name.value, &g.name);
        }
    }
}

fn across(docs: &[PolicyDoc], sink: &mut Sink) {
    let mut names: HashMap<&str, &Spanned<String>> = HashMap::new();
    for d in docs {
        if let Some(first) = names.get(d.name.value.as_str()) {
            sink.error(
                d.name.pos,
                format!(
                    "policy name `{}` is used twice (first at {}): policy names must be unique, rename one",
                    d.name.value, first.pos
                ),
            );
        } else {
            names.insert(&d.name.value, &d.name);
        }
    }
    for (i, a) in docs.iter().enumerate() {
        for b in &docs[i + 1..] {
            for pb in &b.identities {
                for pa in &a.identities {
                    if pa.value.specificity() == pb.value.specificity()
                        && pa.value.overlaps(&pb.value)
                    {
                        sink.error(
                            pb.pos,
                            format!(
                                "identity pattern `{}` of policy `{}` overlaps `{}` of policy `{}` \
                                 (at {}) and is exactly as specific, so an identity matching both \
                                 has no governing policy: make one pattern more specific or make \
                                 them disjoint",
                                pb.value.as_str(),
                                b.name.value,
                                pa.value.as_str(),
                                a.name.value,
                                pa.pos
                            ),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    const HEAD: &str = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: p }\n\
spec:\n  identities: [spiffe://e.org/a/*]\n  zones:\n    docker: { unix: [/run/docker.sock] }\n    \
web: { cidrs: [10.0.0.0/8], unix: [/run/web.sock] }\n";

    fn errors(tail: &str) -> Vec<String> {
        match super::super::parse_str("p.yaml", &format!("{HEAD}{tail}")) {
            Ok(_) => vec![],
            Err(e) => e.diagnostics().iter().map(|d| d.message.clone()).collect(),
        }
    }

    #[test]
    fn ports_or_protocols_on_a_unix_only_zone_are_rejected() {
        let e = errors("  connect:\n    - { action: allow, zones: [docker], ports: [443] }\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("zone `docker` has only unix sockets"),
            "{e:?}"
        );
        let e = errors("  connect:\n    - { action: deny, zones: [docker], protocols: [tcp] }\n");
        assert_eq!(e.len(), 1, "{e:?}");
        let e = errors(
            "  grants:\n    - { name: g, zones: [docker], ports: [1], maxTtl: 5m, approval: auto }\n",
        );
        assert!(e[0].contains("this grant"), "{e:?}");
    }

    #[test]
    fn unix_zones_without_ports_and_mixed_zones_with_ports_are_accepted() {
        assert_eq!(
            errors(
                "  connect:\n    - { action: allow, zones: [docker, web] }\n    \
                 - { action: deny, zones: [web], ports: [80] }\n"
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn icmp_is_a_protocol_without_ports() {
        assert_eq!(
            errors("  connect:\n    - { action: allow, zones: [web], protocols: [icmp] }\n"),
            Vec::<String>::new()
        );
        let e = errors(
            "  connect:\n    - { action: allow, zones: [web], ports: [443], protocols: [tcp, icmp] }\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("icmp has no ports"), "{e:?}");
    }

    #[test]
    fn vsock_is_allowed_whole_by_a_rule_of_its_own() {
        assert_eq!(
            errors("  connect:\n    - { action: allow, protocols: [vsock] }\n"),
            Vec::<String>::new()
        );
        for (rule, want) in [
            (
                "{ action: allow, zones: [web], protocols: [vsock] }",
                "vsock has no zones",
            ),
            (
                "{ action: allow, ports: [22], protocols: [vsock] }",
                "vsock has no ports",
            ),
            (
                "{ action: allow, protocols: [tcp, vsock] }",
                "cannot share a rule",
            ),
            ("{ action: deny, protocols: [vsock] }", "changes nothing"),
            ("{ action: allow, protocols: [tcp] }", "zones"),
        ] {
            let e = errors(&format!("  connect:\n    - {rule}\n"));
            assert_eq!(e.len(), 1, "{rule}: {e:?}");
            assert!(e[0].contains(want), "{rule}: {e:?}");
        }
    }

    #[test]
    fn denying_unix_sockets_under_default_allow_is_refused() {
        let allow = "  defaultAction: allow\n";
        let e = errors(&format!(
            "{allow}  connect:\n    - {{ action: deny, zones: [docker] }}\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("defaultAction: deny"), "{e:?}");
        let e = errors(&format!(
            "{allow}  connect:\n    - {{ action: allow, zones: [web] }}\n  chaining:\n    \
             - {{ after: [web], deny: [docker] }}\n"
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        // Under default deny the same deny is harmless: aliases are in no zone.
        assert_eq!(
            errors("  connect:\n    - { action: deny, zones: [docker] }\n"),
            Vec::<String>::new()
        );
    }
}
