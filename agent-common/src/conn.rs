//! Per-socket decision state (`SOCKS` socket-local storage), kept by the connect/sendmsg hooks
//! and checked by the cgroup_skb programs, so that revocation reaches established connections.
//!
//! A principal's socket gets a [`SockState`] the first time a connect or sendmsg hook lets it
//! through. For a connected socket (TCP, connected UDP) it records the decision: which
//! principal, destination and zone, the `EPOCH` and `SEEN` values it was made under, and until
//! when the grant that allowed it (if any) lasts. The egress program re-decides when any of
//! those moved on, and ends the connection (drops its packets both ways, [`SOCK_F_CUT`]) when
//! the destination is now denied. Sockets of processes outside every principal have no state,
//! and the programs leave at once.

use crate::Addr;

/// The socket belongs to a principal (set on every state).
pub const SOCK_F_PRINCIPAL: u8 = 1;
/// A connect decision is recorded (the fields below `flags` describe it).
pub const SOCK_F_DECIDED: u8 = 2;
/// The connection was ended: every packet is dropped, both ways.
pub const SOCK_F_CUT: u8 = 4;
/// An audit-mode re-decision was recorded (audit-deny): not recorded again.
pub const SOCK_F_AUDITED: u8 = 8;
/// A packet carrying a source route was dropped and recorded: not recorded again.
pub const SOCK_F_ROUTE_SEEN: u8 = 16;
/// A ping socket (allowed by `POLICY_F_ICMP`): every echo it sends is decided by destination.
pub const SOCK_F_PING: u8 = 32;
/// [`SockCgroupConfig::valid`] when the offsets are filled.
pub const SOCK_CGROUP_CONFIG_VALID: u32 = 0x5343_4731;

/// Kernel structure offsets (bytes, from the kernel's BTF at load time) that lead from a
/// socket to the ids of its cgroup's ancestors: `sock.sk_cgrp_data.cgroup`, then
/// `cgroup.level`, `cgroup.ancestors[]`, `cgroup.kn` and `kernfs_node.id`. The cgroup_skb
/// programs are attached at the principals' cgroups, and run for a socket by the cgroup it was
/// created in: the connect/sendmsg hooks (at the root) use these to check that a principal's
/// socket is one of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockCgroupConfig {
    /// [`SOCK_CGROUP_CONFIG_VALID`] when filled; otherwise every principal's socket is refused
    /// (closed).
    pub valid: u32,
    pub sk_cgroup: u32,
    pub cgroup_level: u32,
    pub cgroup_ancestors: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
}

/// `valid_until` of a decision that no grant expiry limits.
pub const VALID_FOREVER: u64 = u64::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockState {
    /// The principal's cgroup id (its key in `PRINCIPALS`): a principal that has gone is
    /// noticed, and its index reused by another principal is not confused with it.
    pub cgroup_id: u64,
    /// `EPOCH` when decided: the agent moves it on every policy swap, grant revocation and
    /// principal removal.
    pub epoch: u64,
    /// The principal's `SEEN` mask when decided (chaining state).
    pub seen: u64,
    /// CLOCK_BOOTTIME ns after which the decision must be made again (the allowing grant's
    /// expiry), or [`VALID_FOREVER`].
    pub valid_until: u64,
    /// Grant that allowed the connection, or 0.
    pub grant_id: u64,
    /// Destination as decided (IPv4 as `::ffff:a.b.c.d`; the node's own addresses as loopback).
    pub addr: Addr,
    /// Zone index, or `NONE`.
    pub zone: u32,
    /// Principal index.
    pub principal: u32,
    /// Process (tgid) and user that made the call: events from the egress program run in
    /// whatever context sends the packet, so they name the connection's owner from here.
    pub pid: u32,
    pub uid: u32,
    /// Host byte order.
    pub port: u16,
    /// AF_INET / AF_INET6 as the caller used it.
    pub family: u16,
    pub proto: u8,
    /// `SOCK_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The principal's cgroup the socket was created in (or below), where the cgroup_skb
    /// programs run for it; 0 until the connect/sendmsg hooks checked it
    /// ([`SockCgroupConfig`]). Checked again against `PRINCIPALS` at every recorded call, so a
    /// principal removed meanwhile (its programs detached) no longer covers it.
    pub cover: u64,
    /// The socket's last allowed call and the identical calls since its last event.
    pub repeat: Repeat,
}
const _: () = assert!(core::mem::size_of::<SockState>() == 80 + 96 + 8);

/// How long identical allowed calls on one socket are reported together: the first call's
/// event goes out at once; the identical calls after it, within this window, are counted on the
/// socket and carried (`ConnectEvent::repeats`) by the first identical call's event after the
/// window. 1 s.
pub const REPEAT_WINDOW_NS: u64 = 1_000_000_000;

/// The repeat cache of a socket (see `agent-ebpf/src/repeat.rs`): a call decided in full,
/// under what it was decided, and how many identical calls followed it unreported. A call is
/// identical when the same process (so the same principal) makes it through the same hook to
/// the same destination (address as given, port, protocol, family), while `EPOCH` (policy
/// swaps, grants added or revoked, principal removals, node address changes) and the
/// principal's `SEEN` mask (chaining) have not moved and the allowing grant has not expired.
/// Cached: plain allows (no address opened by a DNS answer: those expire on their own; no DNS
/// redirect), and denies nothing but an `EPOCH` move can lift (a deny rule, chaining, or the
/// default of a policy without zones by host name, where no DNS answer can open the address).
/// Never cached: audit-denies, containment, no policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Repeat {
    /// As the caller gave it (the unspecified address made loopback).
    pub addr: Addr,
    pub epoch: u64,
    pub seen: u64,
    /// The allowing grant's expiry (CLOCK_BOOTTIME ns), or [`VALID_FOREVER`].
    pub valid_until: u64,
    /// CLOCK_MONOTONIC (coarse) ns of the socket's last event for this call (or of the
    /// decision when that event was suppressed or lost).
    pub since: u64,
    pub grant_id: u64,
    /// The principal's cgroup id.
    pub cgroup_id: u64,
    pub policy: u32,
    pub rule: u32,
    pub zone: u32,
    /// Identical calls since the last event, not reported yet.
    pub pending: u32,
    /// Process (tgid) that made the call.
    pub pid: u32,
    /// Principal index.
    pub principal: u32,
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub proto: u8,
    pub hook: u8,
    /// `REASON_*` of the decision.
    pub reason: u8,
    /// The cached decision's `VERDICT_ALLOW` or `VERDICT_DENY`; 0: nothing cached. (Byte
    /// for byte the earlier `valid` flag, which was 1 for a cached allow.)
    pub verdict: u8,
}
const _: () = assert!(core::mem::size_of::<Repeat>() == 96);
