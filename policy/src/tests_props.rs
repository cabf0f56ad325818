//! Property: for random policies (rendered as YAML and run through the whole parser and
//! compiler) and random call sequences with random grants, the userspace model of the kernel
//! lookups over the compiled maps decides exactly as the reference evaluator, call by call,
//! including the chaining state each call leaves behind.

use std::{fmt::Write as _, net::IpAddr};

use agent_common::{GrantValue, NONE, PROTO_TCP, PROTO_UDP};
use proptest::prelude::*;

use super::{
    compile_str,
    eval::{self, ActiveGrant, ConnectCall, GrantKey, PrincipalState},
    model::{KernelDecision, KernelModel},
};

/// Prefixes zones are drawn from: nested, disjoint, v4, v6, and the catch-alls.
pub(crate) const NETS: &[&str] = &[
    "127.0.0.0/8",
    "127.1.0.0/16",
    "127.1.2.0/24",
    "127.1.2.3/32",
    "127.2.0.0/16",
    "127.2.128.0/17",
    "127.3.0.0/16",
    "0.0.0.0/0",
    "\"::/0\"",
    "\"::1/128\"",
    "\"fd00::/16\"",
    "\"fd00:1::/32\"",
];

pub(crate) const ADDRS: &[&str] = &[
    "127.0.0.1",
    "127.1.2.3",
    "127.1.2.4",
    "127.1.9.9",
    "127.2.0.1",
    "127.2.200.1",
    "127.3.3.3",
    "127.9.9.9",
    "10.0.0.1",
    "::1",
    "::ffff:127.1.2.3",
    "fd00::1",
    "fd00:1::7",
    "2001:db8::1",
];

pub(crate) const PORTS: &[u16] = &[53, 80, 443, 8080, 9999];

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub deny: bool,
    pub zones: Vec<usize>,
    pub ports: Vec<u16>,
    pub protos: Vec<u8>,
}

#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// Zone of each net in `NETS` order (`None`: unused).
    pub net_zone: Vec<Option<usize>>,
    pub zones: usize,
    pub rules: Vec<Rule>,
    pub chains: Vec<(Vec<usize>, Vec<usize>)>,
    pub audit: bool,
    pub default_allow: bool,
}

fn subset<T: Clone + std::fmt::Debug + 'static>(pool: Vec<T>) -> impl Strategy<Value = Vec<T>> {
    proptest::sample::subsequence(pool.clone(), 0..=pool.len())
}

fn nonempty_zones(n: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::sample::subsequence((0..n).collect::<Vec<_>>(), 1..=n)
}

pub(crate) fn spec() -> impl Strategy<Value = Spec> {
    (
        1usize..=5,
        proptest::collection::vec(proptest::option::of(0usize..5), NETS.len()),
    )
        .prop_flat_map(|(zones, raw)| {
            // Every zone gets at least its own net; the rest land where `raw` says.
            let mut net_zone: Vec<Option<usize>> =
                raw.iter().map(|z| z.map(|z| z % zones)).collect();
            for (z, slot) in net_zone.iter_mut().enumerate().take(zones) {
                *slot = Some(z);
            }
            let rule = (
                any::<bool>(),
                nonempty_zones(zones),
                subset(PORTS.to_vec()),
                subset(vec![PROTO_TCP, PROTO_UDP]),
            )
                .prop_map(|(deny, zones, ports, protos)| Rule {
                    deny,
                    zones,
                    ports,
                    protos,
                });
            (
                Just(net_zone),
                Just(zones),
                proptest::collection::vec(rule, 0..10),
                proptest::collection::vec((nonempty_zones(zones), nonempty_zones(zones)), 0..3),
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_map(
            |(net_zone, zones, rules, chains, audit, default_allow)| Spec {
                net_zone,
                zones,
                rules,
                chains,
                audit,
                default_allow,
            },
        )
}

fn names(zs: &[usize]) -> String {
    zs.iter()
        .map(|z| format!("z{z}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The spec as an `AgentPolicy` document for `identity`.
pub(crate) fn render(s: &Spec, name: &str, identity: &str) -> String {
    let mut y = format!(
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         identities: [{identity}]\n  mode: {}\n  defaultAction: {}\n  zones:\n",
        if s.audit { "audit" } else { "enforce" },
        if s.default_allow { "allow" } else { "deny" },
    );
    for z in 0..s.zones {
        let nets: Vec<&str> = NETS
            .iter()
            .zip(&s.net_zone)
            .filter(|(_, nz)| **nz == Some(z))
            .map(|(n, _)| *n)
            .collect();
        let _ = writeln!(y, "    z{z}: {{ cidrs: [{}] }}", nets.join(", "));
    }
    y.push_str("  connect:\n");
    for r in &s.rules {
        let _ = write!(
            y,
            "    - {{ action: {}, zones: [{}]",
            if r.deny { "deny" } else { "allow" },
            names(&r.zones)
        );
        if !r.ports.is_empty() {
            let p: Vec<String> = r.ports.iter().map(u16::to_string).collect();
            let _ = write!(y, ", ports: [{}]", p.join(", "));
        }
        if !r.protos.is_empty() {
            let p: Vec<&str> = r
                .protos
                .iter()
                .map(|p| if *p == PROTO_TCP { "tcp" } else { "udp" })
                .collect();
            let _ = write!(y, ", protocols: [{}]", p.join(", "));
        }
        y.push_str(" }\n");
    }
    y.push_str("  chaining:\n");
    for (after, deny) in &s.chains {
        let _ = writeln!(
            y,
            "    - {{ after: [{}], deny: [{}] }}",
            names(after),
            names(deny)
        );
    }
    y
}

/// The reference decision in the kernel's encoding.
pub(crate) fn encode(d: &eval::Decision) -> KernelDecision {
    KernelDecision {
        verdict: d.verdict.to_kernel(),
        reason: d.reason.to_kernel(),
        rule: d.rule.unwrap_or(NONE),
        zone: d.zone.unwrap_or(NONE),
        grant_id: d.grant.unwrap_or(0),
    }
}

type Grant = (usize, u16, u8, u64, bool);

fn grant() -> impl Strategy<Value = Grant> {
    (
        0usize..5,
        prop_oneof![Just(0u16), proptest::sample::select(PORTS.to_vec())],
        prop_oneof![Just(0u8), Just(PROTO_TCP), Just(PROTO_UDP)],
        1u64..1000,
        any::<bool>(),
    )
}

fn call() -> impl Strategy<Value = (usize, u16, u8)> {
    (
        0..ADDRS.len(),
        proptest::sample::select(PORTS.to_vec()),
        prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn kernel_model_agrees_with_reference(
        s in spec(),
        grants in proptest::collection::vec(grant(), 0..4),
        calls in proptest::collection::vec(call(), 1..40),
        enrolled_without_policy in proptest::bool::weighted(0.05),
    ) {
        let src = render(&s, "prop", "spiffe://prop.corral/agent/*");
        let compiled = compile_str("prop.yaml", &src, 1)
            .map_err(|e| TestCaseError::fail(format!("generated policy rejected: {e}\n{src}")))?;
        let mut model = KernelModel::load(&compiled)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let principal = 3;
        let slot = compiled.policy_for("spiffe://prop.corral/agent/a1");
        prop_assert_eq!(slot, Some(0));
        let slot = if enrolled_without_policy { None } else { slot };
        model.add_principal(principal, slot);
        let policy = slot.and_then(|s| compiled.policies.get(s as usize));

        let now = 500;
        let mut state = PrincipalState::default();
        for (i, (z, port, proto, expires, _)) in grants.iter().enumerate() {
            let zone = u32::try_from(*z % s.zones).unwrap_or(0);
            let id = 100 + i as u64;
            model.add_grant(
                agent_common::GrantKey { principal, zone, port: *port, proto: *proto, _pad: 0 },
                GrantValue { expires_ns: *expires, grant_id: id },
            );
            state.grants.insert(
                GrantKey { zone, port: *port, proto: *proto },
                ActiveGrant { id, expires_ns: *expires },
            );
        }

        for (n, (a, port, proto)) in calls.iter().enumerate() {
            let addr: IpAddr = ADDRS[*a].parse().map_err(|_| TestCaseError::fail("addr"))?;
            let c = ConnectCall { addr, port: *port, proto: *proto };
            let want = eval::connect(policy, &state, &c, now);
            let got = model.connect(principal, addr, *port, *proto, now);
            prop_assert_eq!(
                got, encode(&want),
                "call #{} {}:{}/{} disagrees\nreference: {:?}\npolicy:\n{}", n, addr, port, proto, want, src
            );
            eval::record(&mut state, &want);
            let seen: u64 = state.seen.iter().filter(|z| **z < 64).map(|z| 1u64 << z).sum();
            prop_assert_eq!(model.seen(principal), seen);
        }
    }
}
