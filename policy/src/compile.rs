//! Validated [`PolicyDoc`]s → the compiled form ([`CompiledSet`]): one [`CompiledPolicy`] per
//! document, with where every compiled item was written ([`Sources`]).
//!
//! Indices are stable: connect rule `i` is the `i`-th entry of the policy's `connect` list and
//! exec rule `i` the `i`-th entry of its `exec` list, so an event's rule index names the line.
//! Zones that appear in `chaining.after` get the lowest zone indices (declaration order), the
//! others follow (declaration order): only the first 64 zone indices can mark the chaining
//! state, and validation has checked at most 64 zones need to.

use std::collections::HashMap;

pub use crate::compiled::Sources;
use crate::compiled::{
    ChainRule, CompiledPolicy, CompiledSet, ConnectRule, ExecRule, GrantTemplate, HostZone,
    UnixDest, Zone,
};

use super::{
    ast::{ExecPath, PolicyDoc},
    diag::Spanned,
};

/// Compiles documents that [`super::validate::check`] accepted. Unknown zone names (which
/// validation rejects) are left out rather than panicking.
pub fn compile(file: &str, docs: &[PolicyDoc], revision: u64) -> CompiledSet {
    CompiledSet {
        revision,
        policies: docs.iter().map(|d| policy(file, d)).collect(),
    }
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn policy(file: &str, d: &PolicyDoc) -> CompiledPolicy {
    let chained: Vec<&str> = d
        .chaining
        .iter()
        .flat_map(|c| c.after.iter().map(|z| z.value.as_str()))
        .collect();
    let (first, rest): (Vec<_>, Vec<_>) = d
        .zones
        .iter()
        .partition(|z| chained.contains(&z.name.value.as_str()));
    let order: Vec<_> = first.into_iter().chain(rest).collect();
    let zone_index: HashMap<&str, u32> = order
        .iter()
        .enumerate()
        .map(|(i, z)| (z.name.value.as_str(), index(i)))
        .collect();
    let refs = |names: &[Spanned<String>]| -> Vec<u32> {
        let mut v: Vec<u32> = names
            .iter()
            .filter_map(|n| zone_index.get(n.value.as_str()).copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let dedup = |mut v: Vec<u16>| {
        v.sort_unstable();
        v.dedup();
        v
    };
    let dedup8 = |mut v: Vec<u8>| {
        v.sort_unstable();
        v.dedup();
        v
    };

    let zones = order
        .iter()
        .map(|z| {
            let mut nets = Vec::with_capacity(z.nets.len());
            for n in &z.nets {
                if !nets.contains(&n.value) {
                    nets.push(n.value);
                }
            }
            Zone {
                name: z.name.value.clone(),
                nets,
            }
        })
        .collect();
    let unix = order
        .iter()
        .enumerate()
        .flat_map(|(i, z)| {
            z.unix.iter().map(move |u| UnixDest {
                zone: index(i),
                path: u.value.clone(),
            })
        })
        .collect();
    let hosts = order
        .iter()
        .enumerate()
        .flat_map(|(i, z)| {
            z.hosts.iter().map(move |h| HostZone {
                zone: index(i),
                pattern: h.value.clone(),
            })
        })
        .collect();
    let connect = d
        .connect
        .iter()
        .enumerate()
        .map(|(i, r)| ConnectRule {
            index: index(i),
            action: r.action,
            zones: refs(&r.zones),
            ports: dedup(r.ports.clone()),
            protocols: dedup8(r.protocols.clone()),
        })
        .collect();
    let chaining = d
        .chaining
        .iter()
        .map(|c| ChainRule {
            after: refs(&c.after),
            deny: refs(&c.deny),
        })
        .collect();
    let exec = d
        .exec
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut rule = ExecRule {
                index: index(i),
                action: r.action,
                exact: Vec::new(),
                prefixes: Vec::new(),
            };
            for p in &r.paths {
                match &p.value {
                    ExecPath::Exact(s) => rule.exact.push(s.clone()),
                    ExecPath::Prefix(s) => rule.prefixes.push(s.clone()),
                }
            }
            rule
        })
        .collect();
    let grants = d
        .grants
        .iter()
        .map(|g| GrantTemplate {
            name: g.name.value.clone(),
            zones: refs(&g.zones),
            ports: dedup(g.ports.clone()),
            protocols: dedup8(g.protocols.clone()),
            max_ttl: g.max_ttl,
            approval: g.approval,
        })
        .collect();
    let source = Sources {
        file: file.to_owned(),
        policy: d.name.pos,
        connect: d.connect.iter().map(|r| r.pos).collect(),
        exec: d.exec.iter().map(|r| r.pos).collect(),
        zones: order.iter().map(|z| z.name.pos).collect(),
        chaining: d.chaining.iter().map(|c| c.pos).collect(),
        grants: d.grants.iter().map(|g| g.pos).collect(),
        identities: d.identities.iter().map(|i| i.pos).collect(),
    };
    let mut p = CompiledPolicy {
        name: d.name.value.clone(),
        identities: d.identities.iter().map(|i| i.value.clone()).collect(),
        mode: d.mode,
        default_action: d.default_action,
        zones,
        connect,
        chaining,
        exec,
        grants,
        unix,
        hosts,
        dns_allow_unlisted: d.dns_allow_unlisted,
        source,
    };
    crate::dns_bypass::close(&mut p);
    p
}
