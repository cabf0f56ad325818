//! The typed map layer: the only code that touches the kernel maps.
//!
//! Policy swap is a generation flip: the new policy set is written under the inactive
//! generation (every policy map key carries it), principals get their slot for that
//! generation, then one write to `CONFIG.generation` makes it live, and the old generation is
//! deleted. A program run sees either the old or the new policy, never a mix.

use std::collections::HashMap as StdHashMap;

use agent_common::{
    ChainKey, Config, GrantKey, GrantValue, NONE, PolicyMeta, Principal, RuleKey, RuleValue,
    ZoneKey, ZoneValue, maps as names, policy_key,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
};

use crate::compiled::{CompiledPolicy, CompiledSet};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {name} is missing from the kernel object")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type or size")]
    Type {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{op} in map {name}")]
    Op {
        op: &'static str,
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("policy {policy}: zone index {zone} out of range (at most {max} zones per policy)")]
    TooManyZones {
        policy: String,
        zone: usize,
        max: u32,
    },
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapError::Missing { name })?;
    T::try_from(map).map_err(|source| MapError::Type { name, source })
}

fn op(op: &'static str, name: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |source| MapError::Op { op, name, source }
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
}

/// All kernel maps, typed.
pub struct PolicyMaps {
    config: Array<MapData, Config>,
    principals: HashMap<MapData, u64, Principal>,
    policies: HashMap<MapData, u32, PolicyMeta>,
    zones: LpmTrie<MapData, ZoneKey, ZoneValue>,
    rules: HashMap<MapData, RuleKey, RuleValue>,
    chain: HashMap<MapData, ChainKey, u64>,
    seen: HashMap<MapData, u32, u64>,
    grants: HashMap<MapData, GrantKey, GrantValue>,
    drops: PerCpuArray<MapData, u64>,
    pub(super) events: Option<aya::maps::Map>,
}

impl PolicyMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            config: take(ebpf, names::CONFIG)?,
            principals: take(ebpf, names::PRINCIPALS)?,
            policies: take(ebpf, names::POLICIES)?,
            zones: take(ebpf, names::ZONES)?,
            rules: take(ebpf, names::RULES)?,
            chain: take(ebpf, names::CHAIN)?,
            seen: take(ebpf, names::SEEN)?,
            grants: take(ebpf, names::GRANTS)?,
            drops: take(ebpf, names::DROPS)?,
            events: Some(ebpf.take_map(names::EVENTS).ok_or(MapError::Missing {
                name: names::EVENTS,
            })?),
        })
    }

    pub fn config(&self) -> Result<Config, MapError> {
        self.config
            .get(&0, 0)
            .map_err(op("read config", names::CONFIG))
    }

    fn set_config(&mut self, cfg: Config) -> Result<(), MapError> {
        self.config
            .set(0, cfg, 0)
            .map_err(op("write config", names::CONFIG))
    }

    /// Enrols the cgroup `cgroup_id` at cgroup `level` as principal `index`, governed by policy
    /// slot `slot` (`None`: enrolled without policy, denied everything).
    /// The chaining state starts empty.
    pub fn add_principal(
        &mut self,
        cgroup_id: u64,
        level: u32,
        index: u32,
        slot: Option<u32>,
    ) -> Result<(), MapError> {
        let slot = slot.unwrap_or(NONE);
        self.seen
            .insert(index, 0, 0)
            .map_err(op("insert", names::SEEN))?;
        self.principals
            .insert(
                cgroup_id,
                Principal {
                    index,
                    flags: 0,
                    policy: [slot, slot],
                },
                0,
            )
            .map_err(op("insert", names::PRINCIPALS))?;
        let mut cfg = self.config()?;
        cfg.level_mask |= 1u32 << level.min(agent_common::MAX_CGROUP_LEVEL);
        self.set_config(cfg)
    }

    /// Removes a principal and its chaining state and grants.
    pub fn remove_principal(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        let Ok(p) = self.principals.get(&cgroup_id, 0) else {
            return Ok(());
        };
        self.principals
            .remove(&cgroup_id)
            .map_err(op("remove", names::PRINCIPALS))?;
        match self.seen.remove(&p.index) {
            Err(e) if !is_not_found(&e) => return Err(op("remove", names::SEEN)(e)),
            _ => {}
        }
        let stale: Vec<GrantKey> = self
            .grants
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.principal == p.index)
            .collect();
        for k in stale {
            let _ = self.grants.remove(&k);
        }
        Ok(())
    }

    /// Zones a principal has contacted (bit per zone index).
    pub fn seen(&self, principal: u32) -> Result<u64, MapError> {
        self.seen
            .get(&principal, 0)
            .map_err(op("read", names::SEEN))
    }

    /// Installs a grant: `expires_ns` is absolute on CLOCK_BOOTTIME.
    pub fn add_grant(&mut self, key: GrantKey, value: GrantValue) -> Result<(), MapError> {
        self.grants
            .insert(key, value, 0)
            .map_err(op("insert", names::GRANTS))
    }

    pub fn remove_grant(&mut self, key: &GrantKey) -> Result<(), MapError> {
        match self.grants.remove(key) {
            Err(e) if !is_not_found(&e) => Err(op("remove", names::GRANTS)(e)),
            _ => Ok(()),
        }
    }

    /// Events lost because the ring buffer was full, summed over CPUs.
    pub fn kernel_drops(&self) -> Result<u64, MapError> {
        let v = self.drops.get(&0, 0).map_err(op("read", names::DROPS))?;
        Ok(v.iter().sum())
    }

    /// Atomically replaces the enforced policy set. `slot_of` gives each enrolled principal
    /// (by cgroup id) its policy slot in `set`, or `None` for no policy.
    pub fn apply(
        &mut self,
        set: &CompiledSet,
        mut slot_of: impl FnMut(u64, &Principal) -> Option<u32>,
    ) -> Result<(), MapError> {
        let cfg = self.config()?;
        let old = cfg.generation & 1;
        let new = old ^ 1;
        // Leftovers of an interrupted apply.
        self.clear_generation(new)?;
        for (slot, policy) in set.policies.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(NONE);
            self.write_policy(policy_key(new, slot), policy, set.revision)?;
        }
        let principals: Vec<(u64, Principal)> =
            self.principals.iter().filter_map(Result::ok).collect();
        for (cg, mut p) in principals {
            p.policy[new as usize] = slot_of(cg, &p).unwrap_or(NONE);
            self.principals
                .insert(cg, p, 0)
                .map_err(op("update", names::PRINCIPALS))?;
        }
        self.set_config(Config {
            generation: new,
            ..cfg
        })?;
        self.clear_generation(old)
    }

    fn write_policy(
        &mut self,
        key: u32,
        policy: &CompiledPolicy,
        revision: u64,
    ) -> Result<(), MapError> {
        for (zi, zone) in policy.zones.iter().enumerate() {
            let z = u32::try_from(zi).map_err(|_| MapError::TooManyZones {
                policy: policy.name.clone(),
                zone: zi,
                max: u32::MAX,
            })?;
            for net in &zone.nets {
                let k = Key::new(
                    agent_common::zone_prefix_len(u32::from(net.bits())),
                    ZoneKey {
                        policy: key,
                        addr: net.kernel_addr(),
                    },
                );
                self.zones
                    .insert(&k, ZoneValue { zone: z }, 0)
                    .map_err(op("insert", names::ZONES))?;
            }
        }
        let mut rules: StdHashMap<RuleKey, RuleValue> = StdHashMap::new();
        for r in &policy.connect {
            let ports: Vec<u16> = if r.ports.is_empty() {
                vec![agent_common::ANY_PORT]
            } else {
                r.ports.clone()
            };
            let protos: Vec<u8> = if r.protocols.is_empty() {
                vec![agent_common::ANY_PROTO]
            } else {
                r.protocols.clone()
            };
            for &zone in &r.zones {
                for &port in &ports {
                    for &proto in &protos {
                        let e = rules
                            .entry(RuleKey {
                                policy: key,
                                zone,
                                port,
                                proto,
                                _pad: 0,
                            })
                            .or_insert(RuleValue {
                                allow_rule: NONE,
                                deny_rule: NONE,
                            });
                        let slot = match r.action {
                            crate::compiled::Action::Allow => &mut e.allow_rule,
                            crate::compiled::Action::Deny => &mut e.deny_rule,
                        };
                        *slot = (*slot).min(r.index);
                    }
                }
            }
        }
        for (k, v) in rules {
            self.rules
                .insert(k, v, 0)
                .map_err(op("insert", names::RULES))?;
        }
        let mut chain: StdHashMap<ChainKey, u64> = StdHashMap::new();
        for c in &policy.chaining {
            let mut after = 0u64;
            for &z in &c.after {
                if z >= agent_common::maps::limits::CHAIN_ZONES {
                    return Err(MapError::TooManyZones {
                        policy: policy.name.clone(),
                        zone: z as usize,
                        max: agent_common::maps::limits::CHAIN_ZONES,
                    });
                }
                after |= 1u64 << z;
            }
            for &zone in &c.deny {
                *chain.entry(ChainKey { policy: key, zone }).or_default() |= after;
            }
        }
        for (k, v) in chain {
            self.chain
                .insert(k, v, 0)
                .map_err(op("insert", names::CHAIN))?;
        }
        // Meta last: a slot without meta is "no policy" (denied), never half a policy.
        self.policies
            .insert(
                key,
                PolicyMeta {
                    revision,
                    default_action: policy.default_action.to_kernel(),
                    mode: policy.mode.to_kernel(),
                    _pad: [0; 6],
                },
                0,
            )
            .map_err(op("insert", names::POLICIES))
    }

    /// Deletes every policy map entry of generation `gen`.
    fn clear_generation(&mut self, generation: u32) -> Result<(), MapError> {
        let of_gen = |k: u32| k >> 31 == generation;
        let keys: Vec<u32> = self
            .policies
            .keys()
            .filter_map(Result::ok)
            .filter(|k| of_gen(*k))
            .collect();
        for k in keys {
            let _ = self.policies.remove(&k);
        }
        let keys: Vec<Key<ZoneKey>> = self
            .zones
            .keys()
            .filter_map(Result::ok)
            .filter(|k| of_gen(k.data().policy))
            .collect();
        for k in keys {
            let _ = self.zones.remove(&k);
        }
        let keys: Vec<RuleKey> = self
            .rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| of_gen(k.policy))
            .collect();
        for k in keys {
            let _ = self.rules.remove(&k);
        }
        let keys: Vec<ChainKey> = self
            .chain
            .keys()
            .filter_map(Result::ok)
            .filter(|k| of_gen(k.policy))
            .collect();
        for k in keys {
            let _ = self.chain.remove(&k);
        }
        Ok(())
    }
}
