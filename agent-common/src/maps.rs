//! Map names, shared by the `#[map]` statics in `agent-ebpf` and the agent's typed map layer.
//! At most 15 bytes each: the kernel silently truncates longer names.

/// `Array<Config>`, one entry.
pub const CONFIG: &str = "CORRAL_CONFIG";
/// `HashMap<u64 cgroup id, Principal>`.
pub const PRINCIPALS: &str = "CORRAL_PRINC";
/// `HashMap<u32 policy key, PolicyMeta>`.
pub const POLICIES: &str = "CORRAL_POLICY";
/// `LpmTrie<ZoneKey, ZoneValue>`: destination → zone, per policy.
pub const ZONES: &str = "CORRAL_ZONES";
/// `HashMap<RuleKey, RuleValue>`: (policy, zone, port, protocol) → allow/deny rule.
pub const RULES: &str = "CORRAL_RULES";
/// `HashMap<ChainKey, u64>`: (policy, target zone) → zones after which the target is denied.
pub const CHAIN: &str = "CORRAL_CHAIN";
/// `HashMap<u32 principal, u64>`: zones each principal has contacted (chaining state).
pub const SEEN: &str = "CORRAL_SEEN";
/// `HashMap<GrantKey, GrantValue>`: just-in-time grants with absolute expiry.
pub const GRANTS: &str = "CORRAL_GRANTS";
/// Ring buffer of events.
pub const EVENTS: &str = "CORRAL_EVENTS";
/// `Array<u64>`, one entry: the per-node event sequence counter.
pub const SEQ: &str = "CORRAL_SEQ";
/// `PerCpuArray<u64>`, one entry: events lost because the ring buffer was full.
pub const DROPS: &str = "CORRAL_DROPS";
/// `HashMap<u32 principal, RateState>`: allow-event rate limiting and suppressed counts.
pub const RATE: &str = "CORRAL_RATE";
/// `Array<ExecConfig>`, one entry: kernel offsets from BTF, syscall numbers.
pub const EXEC_CFG: &str = "CORRAL_EXECCFG";
/// `Array<ScriptConfig>`, one entry: how the tracepoint finds a `#!` script's file.
pub const EXEC_SCRIPT: &str = "CORRAL_EXECSCR";
/// `HashMap<ExecKey, RuleValue>`: exact executable files by (device, inode), per policy.
pub const EXEC_FILES: &str = "CORRAL_EXFILES";
/// `HashMap<ExecKey, RuleValue>`: prefix-rule directories by (device, inode), per policy.
pub const EXEC_DIRS: &str = "CORRAL_EXDIRS";
/// `LruHashMap<u32 tgid, TaskInfo>`: exec ids per process (lineage).
pub const EXEC_TASKS: &str = "CORRAL_EXTASKS";
/// `HashMap<UnixKey, ZoneValue>`: AF_UNIX destination → zone, per policy (kernel 6.7+ hooks).
/// (`CORRAL_UNIXZ2`: the key gained the name's length; a pinned map of the old layout is not
/// adopted.)
pub const UNIX_ZONES: &str = "CORRAL_UNIXZ2";

/// `HashMap<u32 tgid, u64 cgroup id>`: sticky attribution. A process that belongs to a
/// principal (and every process it forks) stays that principal's whatever cgroup it moves to.
pub const STICKY: &str = "CORRAL_STICKY";
/// `Array<u64>` bitmap (`BPF_F_MMAPABLE` not needed: only the programs write it once the
/// agent runs): bit `pid` set while `STICKY` may hold an entry for `pid`. A clear bit lets the
/// un-enrolled fast path skip the `STICKY` lookup; it is set before the entry is inserted and
/// cleared after it is removed. Covers every possible pid (`PID_MAX_LIMIT`).
pub const STICKY_MARK: &str = "CORRAL_STMARK";
/// `Array<u32>`, one entry: the principals' generation, bumped by the agent after every
/// principal it adds. Tags the entries of `UNENROLLED`.
pub const PRINCIPALS_GEN: &str = "CORRAL_PGEN";
/// `PerCpuArray<Unenrolled>`: cgroups recently found to be in no principal, by
/// `cgroup id % UNENROLLED_SLOTS`, valid under the principals' generation they carry.
pub const UNENROLLED: &str = "CORRAL_UNENR";
/// `Array<u32>`, one entry: the offset of `child_pid` in the `sched_process_fork` tracepoint
/// record (it moved between kernel versions; read from tracefs by the agent), 0 if unknown.
pub const FORK_CFG: &str = "CORRAL_FORKCFG";
/// `Array<u32>`, one entry: the offset of `group_dead` in the `sched_process_exit` record
/// (6.16+; read from tracefs by the agent), 0 if the kernel has none: then a process's sticky
/// entry goes when its thread-group leader exits, else when its last thread does.
pub const EXIT_CFG: &str = "CORRAL_EXITCFG";

/// `SkStorage<SockState>` (a BTF map): per-socket decision state of principals' sockets.
pub const SOCKS: &str = "CORRAL_SOCKS";
/// `Array<SockCgroupConfig>` (one entry): the kernel offsets that lead from a socket to its
/// cgroup's ancestors (see `conn`), written by the agent at load time.
pub const SOCK_CG_CFG: &str = "CORRAL_SKCGCFG";
/// `Array<u64>`, one entry: moved on by the agent whenever a decision may have become a deny
/// (policy swap, grant revocation, principal removal); the egress program re-decides
/// connections decided under an older value.
pub const EPOCH: &str = "CORRAL_EPOCH";

/// `HashMap<Addr, u32>`: the node's own addresses (IPv4 as `::ffff:a.b.c.d`), kept by the
/// agent. A connect to one of them reaches this host, so it is decided as loopback.
pub const LOCAL_ADDRS: &str = "CORRAL_LOCAL";

/// `HashMap<LearnedKey, LearnedValue>`: addresses opened for one principal by the DNS answer
/// of a name in one of its zones, written by the agent's DNS proxy before it releases the
/// answer, removed by the agent after they expire.
pub const LEARNED: &str = "CORRAL_LEARNED";

/// `Array<DnsConfig>` (one entry): the DNS proxy's port, see `dns`.
pub const DNS_CFG: &str = "CORRAL_DNSCFG";

/// Socket-local storage of `DnsOrig`: the resolver a redirected DNS socket was sent to.
pub const DNS_ORIG: &str = "CORRAL_DNSORIG";

/// `HashMap<ExecKey, u32>` (policy 0): the identities of the node's dynamic loaders
/// (`ld-linux*.so*`, `ld-musl-*.so*`), kept by the agent. Executing one directly is allowed
/// only by a rule naming it.
pub const LOADERS: &str = "CORRAL_LOADERS";
/// `PerCpuArray<u64>`, one entry: when this CPU last woke the event reader for a deny
/// (monotonic ns), so a burst of denies wakes it once per `DENY_WAKE_NS`.
pub const WAKE: &str = "CORRAL_WAKE";

/// Every map name above: the kernel object must define exactly these (checked by the agent's
/// `ebpf::object` tests against the built object).
pub const ALL: &[&str] = &[
    CONFIG,
    PRINCIPALS,
    POLICIES,
    ZONES,
    RULES,
    CHAIN,
    SEEN,
    GRANTS,
    EVENTS,
    SEQ,
    DROPS,
    RATE,
    EXEC_CFG,
    EXEC_SCRIPT,
    EXEC_FILES,
    EXEC_DIRS,
    EXEC_TASKS,
    UNIX_ZONES,
    STICKY,
    STICKY_MARK,
    PRINCIPALS_GEN,
    UNENROLLED,
    FORK_CFG,
    EXIT_CFG,
    SOCKS,
    SOCK_CG_CFG,
    EPOCH,
    LOCAL_ADDRS,
    LOADERS,
    LEARNED,
    DNS_CFG,
    DNS_ORIG,
    WAKE,
];

/// The kernel keeps at most this many bytes of a map name (`BPF_OBJ_NAME_LEN` - 1) and cuts
/// longer ones silently.
pub const MAX_NAME_BYTES: usize = 15;

const _: () = {
    let mut i = 0;
    while i < ALL.len() {
        assert!(
            ALL[i].len() <= MAX_NAME_BYTES,
            "a map name is over 15 bytes"
        );
        i += 1;
    }
};

/// Capacity limits (also the `max_entries` of the maps).
pub mod limits {
    pub const PRINCIPALS: u32 = 16_384;
    pub const POLICIES: u32 = 1_024;
    pub const ZONES: u32 = 262_144;
    pub const RULES: u32 = 262_144;
    pub const CHAIN: u32 = 65_536;
    pub const GRANTS: u32 = 65_536;
    /// Unix-socket destinations (over both generations).
    pub const UNIX_ZONES: u32 = 16_384;
    /// Default ring buffer size in bytes (a power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Zones per policy that can take part in chaining (bits of the `SEEN` mask).
    pub const CHAIN_ZONES: u32 = 64;
    /// Exact exec files and prefix directories (each, over both generations).
    pub const EXEC_FILES: u32 = 65_536;
    /// Processes tracked for exec lineage (LRU: the least recently used entry is evicted).
    pub const EXEC_TASKS: u32 = 65_536;
    /// Dynamic loader files.
    pub const LOADERS: u32 = 256;
    /// Addresses of the node's own interfaces.
    pub const LOCAL_ADDRS: u32 = 4_096;
    /// (principal, address) pairs opened by DNS answers, over all principals.
    pub const LEARNED: u32 = 131_072;
    /// Processes (and threads) of principals attributed stickily.
    pub const STICKY: u32 = 65_536;
    /// Words of the `STICKY_MARK` bitmap: one bit for each pid up to the kernel's
    /// `PID_MAX_LIMIT` (4,194,304 on 64-bit), 512 KiB.
    pub const STICKY_MARK_WORDS: u32 = 4_194_304 / 64;
    /// Per-CPU slots of the un-enrolled cgroup cache (a power of two).
    pub const UNENROLLED_SLOTS: u32 = 256;
}
