//! Types and map names shared by Corral's kernel programs (`agent-ebpf`) and its agent.
//!
//! Every struct here is `#[repr(C)]`, `Copy`, made of fixed-width integers, with its padding
//! written out and its size asserted, because the kernel and userspace read the same bytes.
//! Enumerations travel as `u8`/`u32` constants; userspace decodes them with `TryFrom`.
//!
//! Addresses are always 16 bytes in network byte order: IPv4 is stored as the IPv4-mapped IPv6
//! address `::ffff:a.b.c.d`, so an IPv4-mapped IPv6 destination is decided exactly as IPv4.
//!
//! - [`decision`]: verdicts, reasons and policy keys: the constants the kernel writes and their
//!   one userspace decoding.
//! - [`event`]: the ring-buffer records (one [`EventHeader`] first in each).
//! - [`policy`]: the policy map keys and values.
//! - [`exec`]: the exec decision's maps, configuration and shared logic.
//! - [`conn`]: per-socket decision state, so revocation reaches established connections.
//! - [`maps`]: every map name (and [`maps::ALL`], checked against the built object) and the
//!   capacity limits.
#![no_std]

pub mod conn;
pub mod decision;
pub mod dns;
pub mod event;
pub mod exec;
pub mod maps;
pub mod policy;

pub use conn::*;
pub use decision::*;
pub use dns::{DnsConfig, DnsOrig};
pub use event::*;
pub use exec::*;
pub use policy::*;

/// Placeholder for "none" in u32 index fields (no policy, no zone, no rule).
pub const NONE: u32 = u32::MAX;

/// Deepest cgroup level the kernel programs look at when resolving a principal (the bounded
/// ancestor walk). Levels are counted from the cgroup v2 root (level 0).
pub const MAX_CGROUP_LEVEL: u32 = 31;

/// A cgroup the kernel programs found in no principal (no principal at it or above it), under
/// principals' generation `gen` (`PRINCIPALS_GEN`); the per-CPU `UNENROLLED` cache's slot.
/// `check` ties the two, so an entry torn by a preempted writer is never taken for valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Unenrolled {
    pub cgroup_id: u64,
    pub generation: u32,
    pub check: u32,
}
const _: () = assert!(core::mem::size_of::<Unenrolled>() == 16);

impl Unenrolled {
    #[inline(always)]
    pub const fn new(cgroup_id: u64, generation: u32) -> Self {
        Self {
            cgroup_id,
            generation,
            check: Self::check_of(cgroup_id, generation),
        }
    }

    #[inline(always)]
    const fn check_of(cgroup_id: u64, generation: u32) -> u32 {
        (cgroup_id as u32) ^ ((cgroup_id >> 32) as u32) ^ generation ^ 0x9e37_79b9
    }

    /// Whether this slot says `cgroup_id` is in no principal under `generation`.
    #[inline(always)]
    pub const fn holds(&self, cgroup_id: u64, generation: u32) -> bool {
        self.cgroup_id == cgroup_id
            && self.generation == generation
            && self.check == Self::check_of(cgroup_id, generation)
    }
}

/// Global settings the agent writes into the `CONFIG` array (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Which of the two policy generations is live (0 or 1). Flipping it is the atomic policy
    /// swap: every key in the policy maps carries its generation.
    pub generation: u32,
    /// Bit `n` set: some principal's cgroup sits at cgroup level `n`. The ancestor walk only
    /// looks up those levels.
    pub level_mask: u32,
    /// Allow events per second and principal that reach the ring buffer; 0: unlimited. Deny
    /// and audit-deny events are never limited; exec events are not limited either. Suppressed
    /// allow events are counted per principal ([`RateState::suppressed`]) and carried on that
    /// principal's next connect/sendmsg event (`EventHeader::suppressed`) that reaches the ring.
    pub allow_rate: u32,
    /// Allow events a principal may emit back to back before `allow_rate` applies; 0: equal to
    /// `allow_rate` (one second's worth).
    pub allow_burst: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// What a principal's cgroup id maps to in `PRINCIPALS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Principal {
    /// Stable principal index (identity + session), used in events, grants and chaining state.
    pub index: u32,
    /// `PRINCIPAL_F_*` bits.
    pub flags: u32,
    /// Policy slot per generation, or [`NONE`]: enrolled with no policy, denied everything.
    pub policy: [u32; 2],
}
const _: () = assert!(core::mem::size_of::<Principal>() == 16);

/// Addresses as the kernel sees them: four `u32`s, each holding network-order bytes.
pub type Addr = [u32; 4];

/// `::ffff:a.b.c.d` for an IPv4 address given as its network-order `u32`.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> Addr {
    [0, 0, 0xffffu32.to_be(), ip4_be]
}

/// Whether a 16-byte address is an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffffu32.to_be()
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type below is #[repr(C)], Copy, made only of integers, with no implicit
    // padding (sizes are asserted beside each struct), so every bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Principal {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ZoneKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ZoneValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ChainKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GrantKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GrantValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnectEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExecEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExecConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockCgroupConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ScriptConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExecKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TaskInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RateState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnixKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnixEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SocketEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockState {}
    // SAFETY: as above (`LearnedKey` is five u32s, 20 bytes, no padding).
    unsafe impl aya::Pod for LearnedKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LearnedValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DnsConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DnsOrig {}

    /// Copies a `T` out of possibly unaligned bytes (ring buffer records); `None` if too short.
    pub fn read_unaligned<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
        if bytes.len() < core::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: the length is checked above, `read_unaligned` has no alignment requirement,
        // and `T: Pod` means any bit pattern is a valid `T`.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }
}

#[cfg(feature = "user")]
pub use pod::read_unaligned;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_bytes_are_network_order() {
        let ip = u32::from_ne_bytes([10, 20, 30, 40]);
        let a = v4_mapped(ip);
        let mut bytes = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 20, 30, 40]
        );
        assert!(is_v4_mapped(&a));
    }
}
