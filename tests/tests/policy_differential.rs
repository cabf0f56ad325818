//! Differential test: random policies, compiled by the policy compiler and loaded into the
//! real kernel, decide real connects (UDP connect, TCP connect, unconnected UDP sendto, IPv4,
//! IPv6 and IPv4-mapped IPv6, all on loopback) exactly as the reference evaluator does — the
//! verdict the process sees (EPERM or not) and the recorded decision (reason, rule, zone,
//! grant), call after call, including the chaining state earlier calls leave behind.
//!
//! Reproduce a run with `CORRAL_DIFF_SEED=<seed>`; `CORRAL_DIFF_POLICIES` sets the number of
//! random policies (default 200).

use std::{fmt::Write as _, net::IpAddr};

use agent_common::{GrantKey, GrantValue, PROTO_TCP, PROTO_UDP};
use corral_agent::ebpf::{
    Enforcer,
    events::{ConnectDecision, EventReader},
};
use corral_policy::{
    compile_str,
    eval::{self, ActiveGrant, ConnectCall, PrincipalState, Verdict},
};
use corral_tests::{Outcome, TestCgroup, privileged, probe_in};

/// xorshift64*: small, seedable, good enough to pick test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    /// A non-empty subset of 0..n.
    fn zones(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).filter(|_| self.chance(40)).collect();
        if v.is_empty() {
            v.push(self.below(n));
        }
        v
    }
}

/// Zone prefixes: nested, disjoint, catch-alls, IPv6 loopback and an IPv4-mapped IPv6 prefix.
const NETS: &[&str] = &[
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
    "\"::ffff:127.4.0.0/112\"",
    "\"fd00::/16\"",
];

/// Destinations: loopback only, so nothing leaves the host.
const ADDRS: &[&str] = &[
    "127.0.0.1",
    "127.1.2.3",
    "127.1.2.4",
    "127.1.9.9",
    "127.2.0.1",
    "127.2.200.1",
    "127.3.3.3",
    "127.4.5.6",
    "127.9.9.9",
    "::1",
    "::ffff:127.1.2.3",
    "::ffff:127.4.0.1",
    "::ffff:127.9.0.1",
];

const PORTS: &[u16] = &[53, 80, 443, 8080, 9999, 40000];

struct Case {
    yaml: String,
    zones: usize,
    /// (zone, port or 0, proto or 0, active)
    grants: Vec<(u32, u16, u8, bool)>,
}

fn random_case(r: &mut Rng, n: usize) -> Case {
    let zones = 1 + r.below(6);
    let mut y = format!(
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: diff-{n}\nspec:\n  \
         identities: [spiffe://diff.corral/agent/*]\n  mode: {}\n  defaultAction: {}\n  zones:\n",
        if r.chance(20) { "audit" } else { "enforce" },
        if r.chance(30) { "allow" } else { "deny" },
    );
    let mut net_zone: Vec<Option<usize>> = NETS
        .iter()
        .map(|_| r.chance(60).then(|| r.below(zones)))
        .collect();
    // Each zone at least one prefix of its own, from a random position.
    let offset = r.below(NETS.len());
    for z in 0..zones {
        net_zone[(offset + z) % NETS.len()] = Some(z);
    }
    for z in 0..zones {
        let nets: Vec<&str> = NETS
            .iter()
            .zip(&net_zone)
            .filter(|(_, nz)| **nz == Some(z))
            .map(|(n, _)| *n)
            .collect();
        let _ = writeln!(y, "    z{z}: {{ cidrs: [{}] }}", nets.join(", "));
    }
    let names = |zs: &[usize]| {
        zs.iter()
            .map(|z| format!("z{z}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    y.push_str("  connect:\n");
    for _ in 0..r.below(12) {
        let _ = write!(
            y,
            "    - {{ action: {}, zones: [{}]",
            if r.chance(40) { "deny" } else { "allow" },
            names(&r.zones(zones))
        );
        if r.chance(60) {
            let ports: Vec<String> = PORTS
                .iter()
                .filter(|_| r.chance(35))
                .map(u16::to_string)
                .collect();
            if !ports.is_empty() {
                let _ = write!(y, ", ports: [{}]", ports.join(", "));
            }
        }
        match r.below(4) {
            0 => y.push_str(", protocols: [tcp]"),
            1 => y.push_str(", protocols: [udp]"),
            2 => y.push_str(", protocols: [tcp, udp]"),
            _ => {}
        }
        y.push_str(" }\n");
    }
    y.push_str("  chaining:\n");
    for _ in 0..r.below(3) {
        let _ = writeln!(
            y,
            "    - {{ after: [{}], deny: [{}] }}",
            names(&r.zones(zones)),
            names(&r.zones(zones))
        );
    }
    let grants = (0..r.below(3))
        .map(|_| {
            (
                r.below(zones) as u32,
                if r.chance(50) { 0 } else { *r.pick(PORTS) },
                *r.pick(&[0, PROTO_TCP, PROTO_UDP]),
                r.chance(70),
            )
        })
        .collect();
    Case {
        yaml: y,
        zones,
        grants,
    }
}

#[test]
fn kernel_decides_random_policies_like_the_reference_evaluator() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let seed = std::env::var("CORRAL_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let policies: usize = std::env::var("CORRAL_DIFF_POLICIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!("policy_differential: seed {seed} (CORRAL_DIFF_SEED to reproduce)");
    let mut r = Rng(seed);

    let cg = TestCgroup::new("policy-diff")?;
    let mut enforcer = Enforcer::load_and_attach(&cg.root)?;
    let mut reader = EventReader::take(enforcer.maps())?;
    let cg_id = cg.id()?;
    let (mut calls_run, mut denied, mut events_compared) = (0usize, 0usize, 0usize);
    let mut by_kind = [0usize; 3];

    for n in 0..policies {
        let case = random_case(&mut r, n);
        let compiled = compile_str("diff.yaml", &case.yaml, n as u64 + 1)
            .map_err(|e| anyhow::anyhow!("generated policy rejected: {e}\n{}", case.yaml))?;
        let policy = &compiled.policies[0];
        assert_eq!(case.zones, policy.zones.len());

        // A fresh principal per policy: empty chaining state, its own grants.
        let principal = 1000 + n as u32;
        let maps = enforcer.maps();
        maps.remove_principal(cg_id)?;
        maps.add_principal(cg_id, cg.level(), principal, Some(0))?;
        maps.apply(&compiled, |_, _| Some(0))?;
        let mut state = PrincipalState::default();
        for (i, (zone, port, proto, active)) in case.grants.iter().enumerate() {
            // Expiry is absolute CLOCK_BOOTTIME: far future, or long past (1 ns after boot).
            let expires_ns = if *active { u64::MAX / 2 } else { 1 };
            let id = 77_000 + i as u64;
            maps.add_grant(
                GrantKey {
                    principal,
                    zone: *zone,
                    port: *port,
                    proto: *proto,
                    _pad: 0,
                },
                GrantValue {
                    expires_ns,
                    grant_id: id,
                },
            )?;
            state.grants.insert(
                eval::GrantKey {
                    zone: *zone,
                    port: *port,
                    proto: *proto,
                },
                ActiveGrant { id, expires_ns },
            );
        }
        let _ = reader.drain_connects();

        let mut ops = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..40 + r.below(30) {
            let addr: IpAddr = r.pick(ADDRS).parse()?;
            let port = if r.chance(85) {
                *r.pick(PORTS)
            } else {
                20_000 + r.below(20_000) as u16
            };
            let kind = r.below(3);
            let host = match addr {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let (op, proto) = match kind {
                0 => ("udp", PROTO_UDP),
                1 => ("tcp", PROTO_TCP),
                _ => ("sendto", PROTO_UDP),
            };
            by_kind[kind] += 1;
            ops.push(format!("{op}:{host}:{port}"));
            calls.push(ConnectCall { addr, port, proto });
        }
        let op_refs: Vec<&str> = ops.iter().map(String::as_str).collect();
        let outcomes = probe_in(&cg.path, &op_refs)?;
        assert_eq!(outcomes.len(), calls.len(), "probe printed one line per op");
        let events: Vec<ConnectDecision> = reader
            .drain_connects()
            .into_iter()
            .filter(|e| e.header.principal == principal)
            .collect();
        assert_eq!(
            events.len(),
            calls.len(),
            "one decision event per call (policy {n}, seed {seed})"
        );

        for (i, ((call, outcome), ev)) in calls.iter().zip(&outcomes).zip(&events).enumerate() {
            let want = eval::connect(Some(policy), &state, call, 1_000_000);
            let ctx = || {
                format!(
                    "seed {seed}, policy {n}, call #{i} `{}`\nreference: {want:?}\nkernel event: \
                     {ev:?}\noutcome: {outcome:?}\npolicy:\n{}\ngrants: {:?}",
                    ops[i], case.yaml, case.grants
                )
            };
            let kernel_denied = match outcome {
                Outcome::Errno(e) if e == "EPERM" => true,
                Outcome::Ok => false,
                Outcome::Errno(e) if e == "ECONNREFUSED" => false,
                other => panic!("unexpected outcome {other:?}: {}", ctx()),
            };
            assert_eq!(
                kernel_denied,
                want.verdict == Verdict::Deny,
                "verdict: {}",
                ctx()
            );
            assert_eq!(
                (
                    ev.header.verdict,
                    ev.header.reason,
                    ev.header.rule,
                    ev.zone,
                    ev.grant_id
                ),
                (
                    want.verdict,
                    want.reason,
                    want.rule,
                    want.zone,
                    want.grant.unwrap_or(0)
                ),
                "decision: {}",
                ctx()
            );
            assert_eq!((ev.port, ev.proto), (call.port, call.proto), "{}", ctx());
            eval::record(&mut state, &want);
            denied += usize::from(kernel_denied);
            calls_run += 1;
            events_compared += 1;
        }
        let seen: u64 = state
            .seen
            .iter()
            .filter(|z| **z < 64)
            .map(|z| 1u64 << z)
            .sum();
        assert_eq!(
            enforcer.maps().seen(principal)?,
            seen,
            "chaining state after policy {n} (seed {seed})"
        );
    }
    enforcer.maps().remove_principal(cg_id)?;
    println!(
        "policy_differential: {policies} random policies, {calls_run} real calls \
         (udp connect {}, tcp connect {}, udp sendto {}), {denied} denied with EPERM; \
         kernel verdict and recorded decision equal the reference evaluator in all \
         {events_compared} cases",
        by_kind[0], by_kind[1], by_kind[2]
    );
    Ok(())
}
