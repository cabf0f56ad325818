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
