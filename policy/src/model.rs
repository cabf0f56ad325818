//! A userspace model of the kernel's lookups: the maps as [`crate::compiled::expand`] fills
//! them, read the way `agent-ebpf/src/connect.rs` reads them (LPM trie on the key bytes, the
//! four rule keys, the chaining bitmask, the four grant keys, the seen bitmask). Comparing it
//! with the reference evaluator ([`super::eval`]) checks the compiler and the map layout; the
//! privileged differential test checks the real kernel against the same evaluator.

use std::{collections::HashMap, net::IpAddr};

use agent_common::{
    ACTION_ALLOW, ANY_PORT, ANY_PROTO, ChainKey, GrantKey, GrantValue, MODE_AUDIT, NONE,
    POLICY_F_UNIX, PolicyMeta, REASON_CHAINING, REASON_DEFAULT, REASON_GRANT, REASON_NO_POLICY,
    REASON_RULE, RuleKey, RuleValue, UnixKey, VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_DENY,
    ZoneKey, ZoneValue, maps::limits, policy_key, zone_prefix_len,
};

use crate::compiled::{CompiledSet, ExpandError, addr_words, expand, to_mapped, unix_name_bytes};

/// A decision in the kernel's own encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelDecision {
    pub verdict: u8,
    pub reason: u8,
    pub rule: u32,
    pub zone: u32,
    pub grant_id: u64,
}

/// The policy maps of one generation, and the per-principal maps.
#[derive(Debug, Default)]
pub struct KernelModel {
    generation: u32,
    policies: HashMap<u32, PolicyMeta>,
    /// LPM trie entries keyed by (prefix length, key bytes): a rewrite replaces.
    zones: HashMap<(u32, [u8; 20]), ZoneValue>,
    rules: HashMap<RuleKey, RuleValue>,
    chain: HashMap<ChainKey, u64>,
    /// `UNIX_ZONES`: exact match on (policy key, path bytes).
    unix_zones: HashMap<UnixKey, ZoneValue>,
    /// principal index → policy slot (or NONE).
    principals: HashMap<u32, u32>,
    seen: HashMap<u32, u64>,
    grants: HashMap<GrantKey, GrantValue>,
}

fn key_bytes(k: &ZoneKey) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&k.policy.to_ne_bytes());
    for (i, w) in k.addr.iter().enumerate() {
        b[4 + i * 4..8 + i * 4].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn prefix_eq(a: &[u8; 20], b: &[u8; 20], bits: u32) -> bool {
    let full = (bits / 8) as usize;
    let rem = bits % 8;
    if a[..full.min(20)] != b[..full.min(20)] {
        return false;
    }
    if rem == 0 || full >= 20 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    a[full] & mask == b[full] & mask
}

impl KernelModel {
    /// The maps after `PolicyMaps::apply(set, ..)` into generation 0, slot = policy index.
    pub fn load(set: &CompiledSet) -> Result<Self, ExpandError> {
        let mut m = Self::default();
        for (slot, p) in set.policies.iter().enumerate() {
            let key = policy_key(m.generation, u32::try_from(slot).unwrap_or(NONE));
            let kp = expand(key, p, set.revision)?;
            for (len, k, v) in kp.zones {
                m.zones.insert((len, key_bytes(&k)), v);
            }
            m.rules.extend(kp.rules);
            m.chain.extend(kp.chain);
            let mut meta = kp.meta;
            // As `PolicyMaps::apply` writes it: every policy polices unix sockets.
            meta.flags |= POLICY_F_UNIX;
            m.policies.insert(key, meta);
            for u in &p.unix {
                if let Some(k) = u.kernel_key(key) {
                    m.unix_zones.insert(k, ZoneValue { zone: u.zone });
                }
            }
        }
        Ok(m)
    }

    /// Number of entries per map: (zones, rules, chain).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.zones.len(), self.rules.len(), self.chain.len())
    }

    /// Enrols principal `index` with policy `slot` (`None`: no policy); empty chaining state.
    pub fn add_principal(&mut self, index: u32, slot: Option<u32>) {
        self.principals.insert(index, slot.unwrap_or(NONE));
        self.seen.insert(index, 0);
    }

    pub fn add_grant(&mut self, key: GrantKey, value: GrantValue) {
        self.grants.insert(key, value);
    }

    pub fn seen(&self, principal: u32) -> u64 {
        self.seen.get(&principal).copied().unwrap_or(0)
    }

    fn lookup_zone(&self, policy: u32, addr: IpAddr) -> u32 {
        let q = key_bytes(&ZoneKey {
            policy,
            addr: addr_words(to_mapped(addr)),
        });
        let full = zone_prefix_len(128);
        self.zones
            .iter()
            .filter(|((len, k), _)| *len <= full && prefix_eq(k, &q, *len))
            .max_by_key(|((len, _), _)| *len)
            .map_or(NONE, |(_, v)| v.zone)
    }

    /// A connect by `principal` (enrolled) at time `now_ns`, with its chaining side effect.
    pub fn connect(
        &mut self,
        principal: u32,
        addr: IpAddr,
        port: u16,
        proto: u8,
        now_ns: u64,
    ) -> KernelDecision {
        self.call(principal, 0, port, proto, now_ns, |m, policy| {
            m.lookup_zone(policy, addr)
        })
        .unwrap_or_else(|| unreachable!("IP calls require no policy flag"))
    }

    /// A connect/sendmsg to unix socket `path` (`@name`: abstract), as `agent-ebpf/src/unix.rs`
    /// decides it: only under a policy with `POLICY_F_UNIX` (`None`: not policed), the
    /// exact-match zone, then the IP decision with port and protocol "any".
    pub fn connect_unix(
        &mut self,
        principal: u32,
        path: &str,
        now_ns: u64,
    ) -> Option<KernelDecision> {
        let bytes = unix_name_bytes(path);
        self.call(
            principal,
            POLICY_F_UNIX,
            ANY_PORT,
            ANY_PROTO,
            now_ns,
            |m, policy| {
                UnixKey::new(policy, &bytes)
                    .and_then(|key| m.unix_zones.get(&key))
                    .map_or(NONE, |v| v.zone)
            },
        )
    }

    /// `None`: the policy lacks a `POLICY_F_*` bit of `requires` (the call is not policed).
    fn call(
        &mut self,
        principal: u32,
        requires: u8,
        port: u16,
        proto: u8,
        now_ns: u64,
        zone_of: impl FnOnce(&Self, u32) -> u32,
    ) -> Option<KernelDecision> {
        let slot = self.principals.get(&principal).copied().unwrap_or(NONE);
        let mut zone = NONE;
        let no_policy = KernelDecision {
            verdict: VERDICT_DENY,
            reason: REASON_NO_POLICY,
            rule: NONE,
            zone: NONE,
            grant_id: 0,
        };
        let mut d = if slot == NONE {
            no_policy
        } else {
            let policy = policy_key(self.generation & 1, slot);
            match self.policies.get(&policy) {
                None => no_policy,
                Some(meta) => {
                    if meta.flags & requires != requires {
                        return None;
                    }
                    zone = zone_of(self, policy);
                    let mut d = self.decide(
                        policy,
                        principal,
                        zone,
                        port,
                        proto,
                        meta.default_action,
                        now_ns,
                    );
                    if d.verdict == VERDICT_DENY && meta.mode == MODE_AUDIT {
                        d.verdict = VERDICT_AUDIT_DENY;
                    }
                    d
                }
            }
        };
        if d.verdict != VERDICT_DENY && zone < limits::CHAIN_ZONES {
            *self.seen.entry(principal).or_default() |= 1u64 << zone;
        }
        d.zone = zone;
        Some(d)
    }

    #[expect(clippy::too_many_arguments, reason = "mirrors the kernel's decide()")]
    fn decide(
        &self,
        policy: u32,
        principal: u32,
        zone: u32,
        port: u16,
        proto: u8,
        default_action: u8,
        now_ns: u64,
    ) -> KernelDecision {
        let mut allow_rule = NONE;
        let mut deny_rule = NONE;
        let mk = |verdict, reason, rule, grant_id| KernelDecision {
            verdict,
            reason,
            rule,
            zone,
            grant_id,
        };
        let keys = [
            (port, proto),
            (port, ANY_PROTO),
            (ANY_PORT, proto),
            (ANY_PORT, ANY_PROTO),
        ];
        if zone != NONE {
            for (port, proto) in keys {
                let key = RuleKey {
                    policy,
                    zone,
                    port,
                    proto,
                    _pad: 0,
                };
                if let Some(v) = self.rules.get(&key) {
                    deny_rule = deny_rule.min(v.deny_rule);
                    allow_rule = allow_rule.min(v.allow_rule);
                }
            }
            let forbidden = self.chain.get(&ChainKey { policy, zone });
            let seen = self.seen.get(&principal);
            if let (Some(f), Some(s)) = (forbidden, seen)
                && f & s != 0
            {
                return mk(VERDICT_DENY, REASON_CHAINING, NONE, 0);
            }
        }
        let base = if deny_rule != NONE {
            mk(VERDICT_DENY, REASON_RULE, deny_rule, 0)
        } else if allow_rule != NONE {
            mk(VERDICT_ALLOW, REASON_RULE, allow_rule, 0)
        } else {
            let v = if default_action == ACTION_ALLOW {
                VERDICT_ALLOW
            } else {
                VERDICT_DENY
            };
            mk(v, REASON_DEFAULT, NONE, 0)
        };
        if base.verdict == VERDICT_DENY && zone != NONE {
            for (port, proto) in keys {
                let key = GrantKey {
                    principal,
                    zone,
                    port,
                    proto,
                    _pad: 0,
                };
                if let Some(g) = self.grants.get(&key)
                    && now_ns < g.expires_ns
                {
                    return mk(VERDICT_ALLOW, REASON_GRANT, NONE, g.grant_id);
                }
            }
        }
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{self, PrincipalState};

    /// The unix lookup of the kernel model decides as the reference evaluator: zones by exact
    /// path (abstract names too), rules with ports never match, default for no zone, chaining.
    #[test]
    fn unix_destinations_match_the_evaluator() {
        let src = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: p }\n\
spec:\n  identities: [spiffe://t/a]\n  defaultAction: deny\n  zones:\n    \
docker: { unix: [/run/docker.sock, '@dock'] }\n    web: { cidrs: [10.0.0.0/8], unix: [/run/web.sock] }\n    \
secrets: { unix: [/run/secrets.sock] }\n  connect:\n    \
- { action: allow, zones: [docker, secrets] }\n    - { action: deny, zones: [web], ports: [80] }\n    \
- { action: allow, zones: [web] }\n  chaining:\n    - { after: [docker], deny: [secrets] }\n";
        let compiled = crate::compile_str("t.yaml", src, 1).expect("compiles");
        let policy = &compiled.policies[0];
        let mut model = KernelModel::load(&compiled).expect("expands");
        model.add_principal(1, Some(0));
        let mut state = PrincipalState::default();
        for path in [
            "/run/secrets.sock",
            "/run/web.sock",
            "/run/other.sock",
            "@dock",
            "/run/docker.sock",
            "/run/secrets.sock",
            "@docker",
        ] {
            let want = eval::unix_connect(Some(policy), &state, path, 0)
                .expect("the policy names unix sockets");
            eval::record(&mut state, &want);
            let got = model.connect_unix(1, path, 0);
            assert_eq!(got, Some(crate::tests_props::encode(&want)), "{path}");
        }
        // The first secrets connect was allowed; after docker, chaining denies it.
        let d = eval::unix_connect(Some(policy), &state, "/run/secrets.sock", 0).expect("policed");
        assert_eq!(
            (d.verdict, d.reason),
            (eval::Verdict::Deny, eval::Reason::Chaining)
        );
        let d = eval::unix_connect(Some(policy), &state, "/run/web.sock", 0).expect("policed");
        assert_eq!((d.verdict, d.rule), (eval::Verdict::Allow, Some(2)));
        // A policy that names no unix socket still polices them (default action); no policy
        // denies.
        let mut no_unix = compiled.clone();
        no_unix.policies[0].unix.clear();
        assert_eq!(
            eval::unix_connect(no_unix.policies.first(), &state, "/run/docker.sock", 0)
                .map(|d| (d.verdict, d.reason)),
            Some((eval::Verdict::Deny, eval::Reason::Default))
        );
        let mut bare = KernelModel::load(&no_unix).expect("expands");
        bare.add_principal(1, Some(0));
        bare.add_principal(2, None);
        assert_eq!(
            bare.connect_unix(1, "/run/docker.sock", 0)
                .map(|d| d.reason),
            Some(agent_common::REASON_DEFAULT)
        );
        assert_eq!(
            bare.connect_unix(2, "/run/docker.sock", 0)
                .map(|d| d.reason),
            Some(agent_common::REASON_NO_POLICY)
        );
        let dock = policy.unix.iter().find(|u| u.path == "@dock");
        let docker = policy.unix.iter().find(|u| u.path == "/run/docker.sock");
        assert_eq!(dock.map(|u| u.zone), docker.map(|u| u.zone));
    }

    #[test]
    fn prefix_compare_is_bitwise() {
        let a = [0xffu8; 20];
        let mut b = a;
        b[5] = 0xf0;
        assert!(prefix_eq(&a, &b, 44));
        assert!(!prefix_eq(&a, &b, 45));
        assert!(prefix_eq(&a, &b, 0));
    }
}
