//! The DNS maps, typed:
//! - `DNS_CFG`: the proxy's port (0: no redirect), see `agent_common::dns`;
//! - `LEARNED`: the addresses a DNS answer opened for one principal, each with the zone of
//!   the name it answered and the policy key it was matched under, until an expiry on
//!   CLOCK_BOOTTIME (the kernel compares it with `bpf_ktime_get_boot_ns`). Written by the DNS
//!   proxy before it releases an answer; expired entries and those of principals that are
//!   gone are removed by [`DnsMaps::sweep`].

use std::net::IpAddr;

use agent_common::{DnsConfig, LearnedKey, LearnedValue, maps as names};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};

use super::map_access::{MapError, op, take};

pub struct DnsMaps {
    map: HashMap<MapData, LearnedKey, LearnedValue>,
    cfg: Array<MapData, DnsConfig>,
}

fn key(principal: u32, addr: IpAddr) -> LearnedKey {
    LearnedKey {
        principal,
        addr: corral_policy::compiled::addr_words(corral_policy::compiled::to_mapped(addr)),
    }
}

impl DnsMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            map: take(ebpf, names::LEARNED)?,
            cfg: take(ebpf, names::DNS_CFG)?,
        })
    }

    /// The port the proxy listens on at every principal's proxy address; 0 turns the
    /// redirect off.
    pub fn set_proxy_port(&mut self, port: u16) -> Result<(), MapError> {
        self.cfg
            .set(0, DnsConfig { port, _pad: [0; 6] }, 0)
            .map_err(op("write", names::DNS_CFG))
    }

    /// Opens `addr` for `principal` in `zone` of policy key `policy` until `expires`
    /// (CLOCK_BOOTTIME ns). An entry already there under the same policy and zone keeps the
    /// later expiry; one under another zone or policy is replaced (the latest answer decides).
    pub fn learn(
        &mut self,
        principal: u32,
        addr: IpAddr,
        policy: u32,
        zone: u32,
        expires: u64,
    ) -> Result<(), MapError> {
        let k = key(principal, addr);
        let expires = match self.map.get(&k, 0) {
            Ok(old) if old.policy == policy && old.zone == zone => old.expires.max(expires),
            _ => expires,
        };
        self.map
            .insert(
                k,
                LearnedValue {
                    policy,
                    zone,
                    expires,
                },
                0,
            )
            .map_err(op("insert", names::LEARNED))
    }

    /// Removes the entries expired at `now` (CLOCK_BOOTTIME ns) and those of principals for
    /// which `live` is false; returns how many went.
    pub fn sweep(&mut self, now: u64, live: impl Fn(u32) -> bool) -> usize {
        let gone: Vec<LearnedKey> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.expires <= now || !live(k.principal))
            .map(|(k, _)| k)
            .collect();
        gone.iter().filter(|k| self.map.remove(k).is_ok()).count()
    }

    pub fn len(&self) -> usize {
        self.map.keys().filter_map(Result::ok).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
