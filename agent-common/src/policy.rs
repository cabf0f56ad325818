//! The compiled policy as the kernel reads it: keys and values of the policy maps.

use crate::{Addr, UNIX_PATH_BYTES};

/// `PolicyMeta::default_action` / `RuleValue` actions.
pub const ACTION_DENY: u8 = 0;
pub const ACTION_ALLOW: u8 = 1;

/// `PolicyMeta::mode`.
pub const MODE_ENFORCE: u8 = 0;
pub const MODE_AUDIT: u8 = 1;

/// Wildcards in `RuleKey` / `GrantKey`.
pub const ANY_PORT: u16 = 0;
pub const ANY_PROTO: u8 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// ICMP echo (ping sockets), IPv4 and IPv6 alike (the kernel decides ICMPv6 as this too).
/// Has no ports: rules naming it have none.
pub const PROTO_ICMP: u8 = 1;
/// AF_VSOCK, named in a policy as protocol `vsock`. Not an IP protocol and never in a connect
/// entry: the kernel has no connect hook for vsock, so an allow rule naming it (with no zones
/// and no ports) lets the policy's principals open vsock sockets at all (`POLICY_F_VSOCK`).
/// The value is the family's number.
pub const PROTO_VSOCK: u8 = 40;

/// `PolicyMeta::flags`: the unix hooks decide every unix connect/sendmsg of the policy's
/// principals (a path in no zone takes the default action). The agent sets it for every
/// policy: a unix socket (`/var/run/docker.sock`) is a destination like any other, so a
/// default-deny policy denies the ones it does not allow. Without it unix sockets are not
/// policed (kept so a future policy option can opt out).
pub const POLICY_F_UNIX: u8 = 1;
/// `PolicyMeta::flags`: some allow rule of the policy names protocol `icmp`, so its principals
/// may open ping sockets (`SOCK_DGRAM` + `IPPROTO_ICMP`/`IPPROTO_ICMPV6`); each echo they send
/// is then decided by destination like a call with protocol icmp and no port. Without it ping
/// sockets are refused (raw sockets always are).
pub const POLICY_F_ICMP: u8 = 2;
/// `PolicyMeta::flags`: an allow rule names protocol `vsock`: the policy's principals may
/// create AF_VSOCK sockets (each creation is an allow event). Without it the
/// `sys_enter_socket` guard kills a principal that tries, like for every family with no hook.
pub const POLICY_F_VSOCK: u8 = 4;

/// `PolicyMeta::flags`: the policy has zones by host name, so its principals' DNS goes through
/// the agent's DNS proxy and the addresses in its answers are looked up in `LEARNED`.
pub const POLICY_F_DNS: u8 = 8;

/// `PolicyMeta::skip`: lookups a policy never needs, so the hooks skip them (set by the
/// compiler from the policy's rules; 0, what an older agent left in that byte, skips
/// nothing). A rule key's shape is whether it names a port and whether it names a protocol:
/// no `RULES` entry of the policy has shape port+protocol ...
pub const SKIP_PORT_PROTO: u8 = 1;
/// ... port, any protocol ...
pub const SKIP_PORT_ANY: u8 = 2;
/// ... any port, a protocol ...
pub const SKIP_ANY_PROTO: u8 = 4;
/// ... any port, any protocol.
pub const SKIP_ANY_ANY: u8 = 8;
/// No chaining rule in the policy: no `CHAIN` lookup.
pub const SKIP_CHAIN: u8 = 16;

/// The `SKIP_*` bit of a rule key's shape.
#[inline(always)]
pub const fn rule_shape(port: u16, proto: u8) -> u8 {
    match (port == ANY_PORT, proto == ANY_PROTO) {
        (false, false) => SKIP_PORT_PROTO,
        (false, true) => SKIP_PORT_ANY,
        (true, false) => SKIP_ANY_PROTO,
        (true, true) => SKIP_ANY_ANY,
    }
}

/// Key of `LEARNED`: an address that a DNS answer of an allowed name opened for one principal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    /// Principal index: an address learned by one principal opens nothing for another.
    pub principal: u32,
    /// As the connect hooks see it (IPv4 as `::ffff:a.b.c.d`).
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<LearnedKey>() == 20);

/// Value of `LEARNED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedValue {
    /// The generation-qualified policy key the name was matched under: under any other key
    /// (a policy swap renumbers zones) the entry means nothing.
    pub policy: u32,
    /// The zone of the name, in that policy.
    pub zone: u32,
    /// Until when (CLOCK_BOOTTIME ns) it opens new connections: the answer's TTL, at least the
    /// agent's floor.
    pub expires: u64,
}
const _: () = assert!(core::mem::size_of::<LearnedValue>() == 16);

/// Per policy slot and generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyMeta {
    /// Revision of the policy set this slot was compiled from (reported in events).
    pub revision: u64,
    pub default_action: u8,
    pub mode: u8,
    /// `POLICY_F_*` bits.
    pub flags: u8,
    /// `SKIP_*` bits.
    pub skip: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<PolicyMeta>() == 16);

/// LPM trie key data: the policy key (32 bits, always matched in full) then the address.
/// The trie's prefix length counts from the first bit of `policy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ZoneKey {
    pub policy: u32,
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<ZoneKey>() == 20);

/// Prefix length of an LPM key for an address prefix of `bits` (IPv6 bits; add 96 for IPv4).
pub const fn zone_prefix_len(addr_bits: u32) -> u32 {
    32 + addr_bits
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ZoneValue {
    /// Zone index within the policy (< `limits::CHAIN_ZONES` to take part in chaining).
    pub zone: u32,
}
const _: () = assert!(core::mem::size_of::<ZoneValue>() == 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub policy: u32,
    pub zone: u32,
    /// Host byte order; [`ANY_PORT`] for any.
    pub port: u16,
    /// IP protocol number; [`ANY_PROTO`] for any.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 12);

/// Both actions may be present for one key: deny beats allow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleValue {
    /// Index of the first allow rule for this key, or `NONE`.
    pub allow_rule: u32,
    /// Index of the first deny rule for this key, or `NONE`.
    pub deny_rule: u32,
}
const _: () = assert!(core::mem::size_of::<RuleValue>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChainKey {
    pub policy: u32,
    /// The zone being connected to.
    pub zone: u32,
}
const _: () = assert!(core::mem::size_of::<ChainKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub principal: u32,
    pub zone: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<GrantKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantValue {
    /// Absolute expiry on CLOCK_BOOTTIME, nanoseconds. The kernel treats `now >= expires_ns` as
    /// no grant at all.
    pub expires_ns: u64,
    pub grant_id: u64,
}
const _: () = assert!(core::mem::size_of::<GrantValue>() == 16);

/// `UNIX_ZONES` key: an AF_UNIX destination, per policy (exact match).
///
/// `path` holds the name as the caller passed it in `sockaddr_un.sun_path`, zero-filled after it:
/// a filesystem path is its bytes up to the first NUL (`/run/docker.sock`); an abstract name
/// keeps its leading NUL byte followed by the name (`@name` in policies and events is
/// `\0name`). `len` is the name's length in bytes: abstract names are compared with their
/// exact length, as the kernel compares them (`@x` and `@x\0` are different sockets).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixKey {
    pub policy: u32,
    pub len: u16,
    pub _pad: u16,
    pub path: [u8; UNIX_PATH_BYTES],
}
const _: () = assert!(core::mem::size_of::<UnixKey>() == 116);

impl Default for UnixKey {
    fn default() -> Self {
        Self {
            policy: 0,
            len: 0,
            _pad: 0,
            path: [0; UNIX_PATH_BYTES],
        }
    }
}

impl UnixKey {
    /// The key of the `sun_path` bytes `name` under policy key `policy`; `None` if it does not
    /// fit `sun_path`.
    pub fn new(policy: u32, name: &[u8]) -> Option<Self> {
        let mut key = Self {
            policy,
            len: u16::try_from(name.len()).ok()?,
            ..Self::default()
        };
        key.path.get_mut(..name.len())?.copy_from_slice(name);
        Some(key)
    }
}
