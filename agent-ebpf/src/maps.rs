//! The map definitions. Names come from `agent_common::maps` so userspace finds the same ones.

use agent_common::{
    Addr, ChainKey, Config, DnsConfig, DnsOrig, ExecConfig, ExecKey, GrantKey, GrantValue,
    LearnedKey, LearnedValue, PolicyMeta, Principal, RateState, RuleKey, RuleValue, ScriptConfig,
    SockCgroupConfig, SockState, TaskInfo, Unenrolled, UnixKey, ZoneKey, ZoneValue, maps::limits,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

#[map(name = "CORRAL_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_PRINC")]
pub static PRINCIPALS: HashMap<u64, Principal> =
    HashMap::with_max_entries(limits::PRINCIPALS, BPF_F_NO_PREALLOC);

// Policy maps are not preallocated: a removed element is freed after an RCU grace period, so a
// program that still holds a pointer into the old generation never reads a reused element.
#[map(name = "CORRAL_POLICY")]
pub static POLICIES: HashMap<u32, PolicyMeta> =
    HashMap::with_max_entries(limits::POLICIES, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_ZONES")]
pub static ZONES: LpmTrie<ZoneKey, ZoneValue> = LpmTrie::with_max_entries(limits::ZONES, 0);

// Unix-socket destinations (see unix.rs): exact match on (policy key, path).
#[map(name = "CORRAL_UNIXZ2")]
pub static UNIX_ZONES: HashMap<UnixKey, ZoneValue> =
    HashMap::with_max_entries(limits::UNIX_ZONES, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_RULES")]
pub static RULES: HashMap<RuleKey, RuleValue> =
    HashMap::with_max_entries(limits::RULES, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_CHAIN")]
pub static CHAIN: HashMap<ChainKey, u64> =
    HashMap::with_max_entries(limits::CHAIN, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_SEEN")]
pub static SEEN: HashMap<u32, u64> =
    HashMap::with_max_entries(limits::PRINCIPALS, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_GRANTS")]
pub static GRANTS: HashMap<GrantKey, GrantValue> =
    HashMap::with_max_entries(limits::GRANTS, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

#[map(name = "CORRAL_SEQ")]
pub static SEQ: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "CORRAL_WAKE")]
pub static WAKE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// Preallocated: the rate words are updated with atomics in place.
#[map(name = "CORRAL_RATE")]
pub static RATE: HashMap<u32, RateState> = HashMap::with_max_entries(limits::PRINCIPALS, 0);

// Sticky attribution (see principal.rs).

#[map(name = "CORRAL_STICKY")]
pub static STICKY: HashMap<u32, u64> = HashMap::with_max_entries(limits::STICKY, 0);

#[map(name = "CORRAL_STMARK")]
pub static STICKY_MARK: Array<u64> = Array::with_max_entries(limits::STICKY_MARK_WORDS, 0);

// The un-enrolled fast path (see principal.rs).

#[map(name = "CORRAL_PGEN")]
pub static PRINCIPALS_GEN: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_UNENR")]
pub static UNENROLLED: PerCpuArray<Unenrolled> =
    PerCpuArray::with_max_entries(limits::UNENROLLED_SLOTS, 0);

#[map(name = "CORRAL_FORKCFG")]
pub static FORK_CFG: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_EXITCFG")]
pub static EXIT_CFG: Array<u32> = Array::with_max_entries(1, 0);

// Revocation of established connections (see egress.rs). Socket-local storage needs BTF for
// its key and value, so this one map is a BTF map (`.maps`); it lives and dies with each socket.

#[btf_map(name = "CORRAL_SOCKS")]
pub static SOCKS: SkStorage<SockState> = SkStorage::new();

#[map(name = "CORRAL_SKCGCFG")]
pub static SOCK_CG_CFG: Array<SockCgroupConfig> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_EPOCH")]
pub static EPOCH: Array<u64> = Array::with_max_entries(1, 0);

// The DNS proxy's port (see dns.rs).
#[map(name = "CORRAL_DNSCFG")]
pub static DNS_CFG: Array<DnsConfig> = Array::with_max_entries(1, 0);

// Where a redirected DNS socket was sent (see dns.rs).
#[btf_map(name = "CORRAL_DNSORIG")]
pub static DNS_ORIG: SkStorage<DnsOrig> = SkStorage::new();

// Addresses DNS answers opened for one principal (see connect.rs `learned_zone`).
#[map(name = "CORRAL_LEARNED")]
pub static LEARNED: HashMap<LearnedKey, LearnedValue> =
    HashMap::with_max_entries(limits::LEARNED, BPF_F_NO_PREALLOC);

// The node's own addresses (see connect.rs `effective`).
#[map(name = "CORRAL_LOCAL")]
pub static LOCAL_ADDRS: HashMap<Addr, u32> =
    HashMap::with_max_entries(limits::LOCAL_ADDRS, BPF_F_NO_PREALLOC);

// Exec enforcement (see exec.rs).

#[map(name = "CORRAL_EXECCFG")]
pub static EXEC_CFG: Array<ExecConfig> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_EXECSCR")]
pub static EXEC_SCRIPT: Array<ScriptConfig> = Array::with_max_entries(1, 0);

#[map(name = "CORRAL_EXFILES")]
pub static EXEC_FILES: HashMap<ExecKey, RuleValue> =
    HashMap::with_max_entries(limits::EXEC_FILES, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_EXDIRS")]
pub static EXEC_DIRS: HashMap<ExecKey, RuleValue> =
    HashMap::with_max_entries(limits::EXEC_FILES, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_LOADERS")]
pub static LOADERS: HashMap<ExecKey, u32> =
    HashMap::with_max_entries(limits::LOADERS, BPF_F_NO_PREALLOC);

#[map(name = "CORRAL_EXTASKS")]
pub static EXEC_TASKS: LruHashMap<u32, TaskInfo> =
    LruHashMap::with_max_entries(limits::EXEC_TASKS, 0);
