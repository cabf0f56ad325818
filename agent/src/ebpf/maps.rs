//! The typed map layer: the only code that touches the kernel maps.
//!
//! Policy swap is a generation flip: the new policy set is written under the inactive
//! generation (every policy map key carries it), principals get their slot for that
//! generation, then one write to `CONFIG.generation` makes it live, and the old generation is
//! deleted. A program run sees either the old or the new policy, never a mix.

use agent_common::{
    ChainKey, Config, GrantKey, GrantValue, NONE, PolicyMeta, Principal, RateState, RuleKey,
    RuleValue, UnixKey, ZoneKey, ZoneValue, maps as names, policy_key,
};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
};

use corral_policy::compiled::{CompiledPolicy, CompiledSet};

use super::{
    dns_maps::DnsMaps,
    exec::ExecMaps,
    map_access::{MapError, op, take},
};

fn is_not_found(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::KeyNotFound)
}

/// All kernel maps, typed.
pub struct PolicyMaps {
    config: Array<MapData, Config>,
    principals: HashMap<MapData, u64, Principal>,
    policies: HashMap<MapData, u32, PolicyMeta>,
    zones: LpmTrie<MapData, ZoneKey, ZoneValue>,
    unix_zones: HashMap<MapData, UnixKey, ZoneValue>,
    rules: HashMap<MapData, RuleKey, RuleValue>,
    chain: HashMap<MapData, ChainKey, u64>,
    seen: HashMap<MapData, u32, u64>,
    grants: HashMap<MapData, GrantKey, GrantValue>,
    drops: PerCpuArray<MapData, u64>,
    rate: HashMap<MapData, u32, RateState>,
    sticky: HashMap<MapData, u32, u64>,
    principals_gen: Array<MapData, u32>,
    epoch: Array<MapData, u64>,
    local_addrs: HashMap<MapData, agent_common::Addr, u32>,
    pub(super) events: Option<aya::maps::Map>,
    exec: ExecMaps,
    dns: DnsMaps,
    /// The packet programs' attachments at the principals' cgroups (`None`: not attached
    /// anywhere, for tools that load the object without the programs).
    coverage: Option<super::coverage::Coverage>,
}

impl PolicyMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            config: take(ebpf, names::CONFIG)?,
            principals: take(ebpf, names::PRINCIPALS)?,
            policies: take(ebpf, names::POLICIES)?,
            zones: take(ebpf, names::ZONES)?,
            unix_zones: take(ebpf, names::UNIX_ZONES)?,
            rules: take(ebpf, names::RULES)?,
            chain: take(ebpf, names::CHAIN)?,
            seen: take(ebpf, names::SEEN)?,
            grants: take(ebpf, names::GRANTS)?,
            drops: take(ebpf, names::DROPS)?,
            rate: take(ebpf, names::RATE)?,
            sticky: take(ebpf, names::STICKY)?,
            principals_gen: take(ebpf, names::PRINCIPALS_GEN)?,
            epoch: take(ebpf, names::EPOCH)?,
            local_addrs: take(ebpf, names::LOCAL_ADDRS)?,
            exec: ExecMaps::take(ebpf)?,
            dns: DnsMaps::take(ebpf)?,
            coverage: None,
            events: Some(ebpf.take_map(names::EVENTS).ok_or(MapError::Missing {
                name: names::EVENTS,
            })?),
        })
    }

    /// Hands over the packet programs' attachments: from now on each principal added gets
    /// them at its cgroup, and each removed loses them. The principals already enrolled
    /// (pinned state of an earlier agent) are covered now. Returns how many were.
    pub(super) fn set_coverage(
        &mut self,
        mut coverage: super::coverage::Coverage,
    ) -> Result<usize, MapError> {
        let ids: Vec<u64> = self.principals.keys().filter_map(Result::ok).collect();
        let n = coverage.adopt(&ids);
        self.coverage = Some(coverage);
        Ok(n)
    }

    /// The principals' cgroup ids where the packet programs are attached.
    pub fn covered(&self) -> Vec<u64> {
        self.coverage
            .as_ref()
            .map(super::coverage::Coverage::covered)
            .unwrap_or_default()
    }

    /// Attaches the packet programs at one more cgroup that is no principal's (the enforce
    /// benchmark attaches them at the root, as before they were scoped, to measure both in one
    /// run). They stay until the programs are unloaded.
    pub fn attach_packet_programs_at(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        if let Some(c) = &mut self.coverage {
            c.cover(cgroup_id)?;
        }
        Ok(())
    }

    /// Cgroup ids of removed principals where they stay attached while the cgroup exists.
    pub fn covered_retired(&self) -> Vec<u64> {
        self.coverage
            .as_ref()
            .map(super::coverage::Coverage::retired)
            .unwrap_or_default()
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

    /// Moves `EPOCH` on: every established connection of a principal is decided again at its
    /// next packet, and ended if its destination is now denied (`agent-ebpf/src/egress.rs`).
    /// Called after every change that can turn an allow into a deny.
    fn bump_epoch(&mut self) -> Result<(), MapError> {
        let now = self.epoch.get(&0, 0).map_err(op("read", names::EPOCH))?;
        self.epoch
            .set(0, now.wrapping_add(1), 0)
            .map_err(op("write", names::EPOCH))
    }

    /// Makes `LOCAL_ADDRS` hold exactly `addrs` (the node's own addresses, decided as
    /// loopback); returns how many changed.
    pub fn set_local_addrs(
        &mut self,
        addrs: &std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<usize, MapError> {
        let want: std::collections::BTreeSet<agent_common::Addr> = addrs
            .iter()
            .map(|a| corral_policy::compiled::addr_words(corral_policy::compiled::to_mapped(*a)))
            .collect();
        let have: std::collections::BTreeSet<agent_common::Addr> =
            self.local_addrs.keys().filter_map(Result::ok).collect();
        let mut changed = 0;
        for a in want.difference(&have) {
            self.local_addrs
                .insert(*a, 1, 0)
                .map_err(op("insert", names::LOCAL_ADDRS))?;
            changed += 1;
        }
        for a in have.difference(&want) {
            let _ = self.local_addrs.remove(a);
            changed += 1;
        }
        if changed > 0 {
            // Decisions cached on sockets (repeats, connected sockets) were made with the old
            // set: made again.
            self.bump_epoch()?;
        }
        Ok(changed)
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
        // Before the principal exists for the hooks: a socket they find covered runs the
        // packet programs.
        if let Some(c) = &mut self.coverage {
            c.cover(cgroup_id)?;
        }
        let added = self.add_principal_entry(cgroup_id, level, index, slot);
        if added.is_err()
            && let Some(c) = &mut self.coverage
        {
            c.uncover(cgroup_id);
        }
        added
    }

    fn add_principal_entry(
        &mut self,
        cgroup_id: u64,
        level: u32,
        index: u32,
        slot: u32,
    ) -> Result<(), MapError> {
        // A fresh rate budget and no suppressed count left from an earlier holder of the index,
        // and none of its grants: a new principal never inherits an old one's access.
        let _ = self.rate.remove(&index);
        self.remove_grants_of(index);
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
        self.set_config(cfg)?;
        // After the insert: every cgroup the programs remember as un-enrolled is looked at
        // again (the new principal may be one of them, or above one).
        self.bump_principals_gen()
    }

    /// Invalidates the programs' per-CPU cache of un-enrolled cgroups (see
    /// `agent-ebpf/src/principal.rs`).
    fn bump_principals_gen(&mut self) -> Result<(), MapError> {
        let g = self
            .principals_gen
            .get(&0, 0)
            .map_err(op("read", names::PRINCIPALS_GEN))?;
        self.principals_gen
            .set(0, g.wrapping_add(1), 0)
            .map_err(op("update", names::PRINCIPALS_GEN))
    }

    /// Processes (and threads) attributed to a principal stickily, and their cgroup ids (see
    /// `agent-ebpf/src/principal.rs`).
    pub fn sticky(&self) -> Vec<(u32, u64)> {
        self.sticky.iter().filter_map(Result::ok).collect()
    }

    /// The cgroup id process `tgid` is stickily attributed to, if any.
    pub fn sticky_cgroup(&self, tgid: u32) -> Option<u64> {
        self.sticky.get(&tgid, 0).ok()
    }

    /// Removes a principal and its chaining state and grants.
    /// Its cgroup's packet programs stay attached while the cgroup exists, so its connections
    /// end at their next packet (see `coverage`).
    pub fn remove_principal(&mut self, cgroup_id: u64) -> Result<(), MapError> {
        let removed = self.remove_principal_entry(cgroup_id);
        if let Some(c) = &mut self.coverage {
            c.uncover(cgroup_id);
        }
        removed
    }

    fn remove_principal_entry(&mut self, cgroup_id: u64) -> Result<(), MapError> {
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
        let _ = self.rate.remove(&p.index);
        self.remove_grants_of(p.index);
        // Its connections end with it.
        self.bump_epoch()
    }

    /// Removes every grant entry of principal index `index` (best effort).
    fn remove_grants_of(&mut self, index: u32) {
        let stale: Vec<GrantKey> = self
            .grants
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.principal == index)
            .collect();
        for k in stale {
            let _ = self.grants.remove(&k);
        }
    }

    /// Every installed grant entry.
    pub fn grants(&self) -> Result<std::collections::HashMap<GrantKey, GrantValue>, MapError> {
        let mut out = std::collections::HashMap::new();
        for kv in self.grants.iter() {
            match kv {
                Ok((k, v)) => {
                    out.insert(k, v);
                }
                // Removed between the key walk and the lookup: not installed.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(op("read", names::GRANTS)(e)),
            }
        }
        Ok(out)
    }

    /// Zones a principal has contacted (bit per zone index).
    pub fn seen(&self, principal: u32) -> Result<u64, MapError> {
        self.seen
            .get(&principal, 0)
            .map_err(op("read", names::SEEN))
    }

    /// Installs a grant: `expires_ns` is absolute on CLOCK_BOOTTIME.
    /// (A grant rewritten with an earlier expiry shortens the connections it allowed too.)
    pub fn add_grant(&mut self, key: GrantKey, value: GrantValue) -> Result<(), MapError> {
        self.grants
            .insert(key, value, 0)
            .map_err(op("insert", names::GRANTS))?;
        self.bump_epoch()
    }

    /// Removes a grant entry; connections it allowed end at their next packet.
    pub fn remove_grant(&mut self, key: &GrantKey) -> Result<(), MapError> {
        match self.grants.remove(key) {
            Err(e) if !is_not_found(&e) => Err(op("remove", names::GRANTS)(e)),
            _ => self.bump_epoch(),
        }
    }

    /// Events lost because the ring buffer was full, summed over CPUs.
    pub fn kernel_drops(&self) -> Result<u64, MapError> {
        let v = self.drops.get(&0, 0).map_err(op("read", names::DROPS))?;
        Ok(v.iter().sum())
    }

    /// Limits allow events to `rate` per second and principal (burst `burst`, 0: one second's
    /// worth); `rate` 0 removes the limit. Deny and audit-deny events are never limited.
    pub fn set_allow_rate(&mut self, rate: u32, burst: u32) -> Result<(), MapError> {
        let cfg = self.config()?;
        self.set_config(Config {
            allow_rate: rate,
            allow_burst: burst,
            ..cfg
        })
    }

    /// Allow events suppressed by the rate limit and not yet carried on an emitted event,
    /// summed over principals.
    pub fn suppressed_pending(&self) -> u64 {
        self.rate
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.suppressed)
            .sum()
    }

    /// The DNS proxy's port and the addresses DNS answers opened per principal.
    pub fn dns(&mut self) -> &mut DnsMaps {
        &mut self.dns
    }

    /// The exec maps (rules are written by [`Self::apply`]).
    pub fn exec(&mut self) -> &mut ExecMaps {
        &mut self.exec
    }

    /// Atomically replaces the enforced policy set: every policy's connect rules, exec rules
    /// and unix-socket destinations are written under one generation flip. `slot_of` gives
    /// each enrolled principal (by cgroup id) its policy slot in `set`, or `None` for no
    /// policy.
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
        for (i, policy) in set.policies.iter().enumerate() {
            let slot = u32::try_from(i).unwrap_or(NONE);
            // Exec entries before the policy's meta (written last by write_policy).
            // Unix sockets are destinations like any other: every policy polices them (a path
            // in no zone takes the default action), whether or not it names any.
            let mut flags = agent_common::POLICY_F_UNIX;
            if policy.allows_ping() {
                flags |= agent_common::POLICY_F_ICMP;
            }
            if policy.allows_vsock() {
                flags |= agent_common::POLICY_F_VSOCK;
            }
            if policy.has_hosts() {
                flags |= agent_common::POLICY_F_DNS;
            }
            let views = self
                .exec
                .views_for(|identity| set.policy_for(identity) == Some(slot));
            self.exec
                .write(policy_key(new, slot), &policy.exec, views)?;
            self.write_unix(policy_key(new, slot), &policy.unix)?;
            self.write_policy(policy_key(new, slot), policy, set.revision, flags)?;
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
        // The old generation stays until the next apply clears it before writing: a program
        // that read the configuration just before the flip may still be looking its entries
        // up. Clearing them here let such a call see no policy and deny an allowed connect
        // (seen once in 46k connects over 200 back-to-back swaps, accounting.rs). Both
        // generations fit: every apply holds them together while it writes. Its exec rules
        // are no longer re-statted.
        self.exec.forget_generation(old);
        self.bump_epoch()
    }

    /// Writes one policy slot's connect entries and, last, its meta with `flags` (`POLICY_F_*`).
    fn write_policy(
        &mut self,
        key: u32,
        policy: &CompiledPolicy,
        revision: u64,
        flags: u8,
    ) -> Result<(), MapError> {
        let mut kp =
            corral_policy::compiled::expand(key, policy, revision).map_err(|e| match e {
                corral_policy::compiled::ExpandError::ChainZone { policy, zone, max } => {
                    MapError::TooManyZones {
                        policy,
                        zone: zone as usize,
                        max,
                    }
                }
                corral_policy::compiled::ExpandError::ZoneCount { policy } => {
                    MapError::TooManyZones {
                        policy,
                        zone: usize::MAX,
                        max: u32::MAX,
                    }
                }
            })?;
        kp.meta.flags = flags;
        for (len, k, v) in &kp.zones {
            self.zones
                .insert(&Key::new(*len, *k), *v, 0)
                .map_err(op("insert", names::ZONES))?;
        }
        for (k, v) in kp.rules {
            self.rules
                .insert(k, v, 0)
                .map_err(op("insert", names::RULES))?;
        }
        for (k, v) in kp.chain {
            self.chain
                .insert(k, v, 0)
                .map_err(op("insert", names::CHAIN))?;
        }
        // Meta last: a slot without meta is "no policy" (denied), never half a policy.
        self.policies
            .insert(key, kp.meta, 0)
            .map_err(op("insert", names::POLICIES))
    }

    /// Unix-socket destination → zone entries of policy slot `key` (read by the unix hooks,
    /// kernel 6.7+; written regardless, so the maps are the same on every kernel). Every
    /// policy gets `POLICY_F_UNIX`: a path in no zone takes the default action.
    fn write_unix(
        &mut self,
        key: u32,
        unix: &[corral_policy::compiled::UnixDest],
    ) -> Result<(), MapError> {
        for u in unix {
            let k = u.kernel_key(key).ok_or_else(|| MapError::UnixPath {
                policy: key,
                path: u.path.clone(),
            })?;
            self.unix_zones
                .insert(k, ZoneValue { zone: u.zone }, 0)
                .map_err(op("insert", names::UNIX_ZONES))?;
        }
        Ok(())
    }

    /// Deletes every policy map entry of generation `gen`.
    fn clear_generation(&mut self, generation: u32) -> Result<(), MapError> {
        let of_gen = |k: u32| agent_common::policy_key_generation(k) == generation;
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
        let keys: Vec<UnixKey> = self
            .unix_zones
            .keys()
            .filter_map(Result::ok)
            .filter(|k| of_gen(k.policy))
            .collect();
        for k in keys {
            let _ = self.unix_zones.remove(&k);
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
        self.exec.clear_generation(generation);
        Ok(())
    }
}
