//! Events the kernel programs write to the `EVENTS` ring buffer.

use crate::{
    Addr,
    exec::{ARGV_BYTES, EXEC_PATH_BYTES},
};

/// `EventHeader::kind`.
pub const KIND_CONNECT: u8 = 1;
/// [`ExecEvent`].
pub const KIND_EXEC: u8 = 2;
/// [`UnixEvent`]: a connect/sendmsg decision on an AF_UNIX socket.
pub const KIND_UNIX: u8 = 3;
/// [`SocketEvent`]: a containment guard refused a socket or a socket option.
pub const KIND_SOCKET: u8 = 4;

/// `ConnectEvent::hook`: which cgroup sock_addr hook decided.
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
/// cgroup unix hooks (kernel 6.7+): `connect()` on an AF_UNIX socket, and `sendmsg()`/`sendto()`
/// with a destination address on an AF_UNIX datagram socket.
pub const HOOK_CONNECT_UNIX: u8 = 5;
pub const HOOK_SENDMSG_UNIX: u8 = 6;

/// [`SocketEvent::hook`]: `socket()` (cgroup `sock_create`, kernel 4.10+).
pub const HOOK_SOCK_CREATE: u8 = 7;
/// [`SocketEvent::hook`]: `setsockopt()` (cgroup `setsockopt`, kernel 5.3+).
pub const HOOK_SETSOCKOPT: u8 = 8;
/// [`SocketEvent::hook`]: `socket()` of a family `sock_create` does not see (tracepoint
/// `syscalls:sys_enter_socket`; a deny kills the process).
pub const HOOK_SOCKET_SYSCALL: u8 = 9;
/// [`ConnectEvent::hook`]: an established IPv4 / IPv6 connection was ended because its
/// destination is now denied (cgroup_skb egress re-decided it: a grant expired or was revoked,
/// chaining tripped, the policy changed, the principal ended). The event's verdict, reason and
/// rule are the new decision's; `grant_id` is the grant that had allowed the connection.
pub const HOOK_CUT4: u8 = 10;
pub const HOOK_CUT6: u8 = 11;
/// [`SocketEvent::hook`]: a principal's packet carrying an IPv4 source route or an IPv6
/// routing header (set per message, with a control message) was dropped (cgroup_skb egress).
pub const HOOK_ROUTE_EGRESS: u8 = 12;
/// [`ConnectEvent::hook`]: an ICMP echo request a principal's ping socket sent, decided by its
/// destination with protocol icmp and no port (cgroup_skb egress; a deny drops it and the
/// `sendto()` fails with EPERM). Ping sockets exist only under a policy naming icmp.
pub const HOOK_PING4: u8 = 13;
pub const HOOK_PING6: u8 = 14;

/// `sockaddr_un.sun_family`.
pub const AF_UNIX: u16 = 1;
/// Bytes of `sockaddr_un.sun_path`.
pub const UNIX_PATH_BYTES: usize = 108;

/// Common first part of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventHeader {
    /// Per-node sequence number, strictly increasing; a gap is a lost event.
    pub seq: u64,
    /// CLOCK_BOOTTIME nanoseconds.
    pub time_ns: u64,
    pub cgroup_id: u64,
    /// Thread id and process id (tgid) of the caller.
    pub tid: u32,
    pub pid: u32,
    pub uid: u32,
    pub principal: u32,
    pub kind: u8,
    /// `VERDICT_*` ([`crate::Verdict`]).
    pub verdict: u8,
    /// `REASON_*` ([`crate::Reason`]).
    pub reason: u8,
    pub _pad: u8,
    /// Policy key (generation-qualified slot) that decided, or `NONE`.
    pub policy: u32,
    /// Rule index that decided, or `NONE`.
    pub rule: u32,
    /// Allow events suppressed by rate limiting since the previous event of this principal.
    pub suppressed: u32,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 56);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub addr: Addr,
    /// Zone index, or `NONE`.
    pub zone: u32,
    /// Host byte order.
    pub port: u16,
    /// AF_INET / AF_INET6 as the caller used it.
    pub family: u16,
    pub proto: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
    /// Identical allowed calls on the same socket before this one, since its previous event
    /// for them, reported with this event instead of one by one (see `agent_common::Repeat`).
    /// This event stands for `1 + repeats` calls.
    pub repeats: u32,
    /// Grant that allowed the call, or 0.
    pub grant_id: u64,
}
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 96);

/// A decision on an AF_UNIX destination (hooks [`HOOK_CONNECT_UNIX`], [`HOOK_SENDMSG_UNIX`]).
/// Rules, chaining and grants are looked up as for an IP destination with port [`crate::ANY_PORT`]
/// and protocol [`crate::ANY_PROTO`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixEvent {
    pub header: EventHeader,
    /// Zone index, or `NONE`.
    pub zone: u32,
    pub hook: u8,
    pub _pad: u8,
    /// Bytes of `path` that belong to the name (see [`crate::UnixKey::path`] for the encoding).
    pub path_len: u16,
    /// Grant that allowed the call, or 0.
    pub grant_id: u64,
    /// The destination as in [`crate::UnixKey::path`].
    pub path: [u8; UNIX_PATH_BYTES],
    pub _pad2: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<UnixEvent>() == 184);

/// A containment guard's decision on a socket: a family, type or protocol no connect hook
/// polices (raw and ping sockets, AF_PACKET, AF_VSOCK, ...) at `socket()`, or a source-routing
/// option at `setsockopt()`. Guards only deny: allowed sockets are not recorded here (their
/// connects and sends are).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketEvent {
    pub header: EventHeader,
    /// `AF_*`.
    pub family: u16,
    /// `SOCK_*` (`SOCK_RAW` is 3).
    pub sock_type: u16,
    /// `IPPROTO_*` (or the family's protocol number).
    pub protocol: u16,
    /// [`HOOK_SOCK_CREATE`], [`HOOK_SETSOCKOPT`] or [`HOOK_SOCKET_SYSCALL`].
    pub hook: u8,
    pub _pad: u8,
    /// `setsockopt()` level and option name; 0 for `socket()`.
    pub level: u32,
    pub optname: u32,
}
const _: () = assert!(core::mem::size_of::<SocketEvent>() == 72);

/// An exec decision (see [`crate::exec`]). Written in place in the ring buffer (it is larger
/// than the BPF stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Exec id of the new image (equal to `header.seq`: the exec's own event); 0 when the
    /// exec never happened (denied by the LSM).
    pub exec_id: u64,
    /// Exec id of the image that exec'd (or forked the process that exec'd); 0 if unknown.
    pub parent_exec_id: u64,
    /// Identity of the file that decided: the executed file, or for a `#!` script on the
    /// tracepoint path the script (`EXEC_F_SCRIPT`) unless its interpreter was the one denied
    /// (`EXEC_F_BY_INTERPRETER`); 0/0 when it could not be read (`EXEC_F_NO_IDENTITY`).
    pub ino: u64,
    pub dev: u32,
    /// Bytes used in `argv` (NUL-terminated arguments; see `EXEC_F_ARGV_TRUNCATED`).
    pub argv_len: u16,
    pub _pad2: u16,
    /// `EXEC_HOOK_*`.
    pub hook: u8,
    /// `EXEC_F_*`.
    pub flags: u8,
    /// Bytes of `path` before its NUL.
    pub path_len: u16,
    pub _pad: [u8; 4],
    /// The path as passed to execve (possibly relative), NUL-terminated; best effort.
    pub path: [u8; EXEC_PATH_BYTES],
    pub argv: [u8; ARGV_BYTES],
}
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 96 + EXEC_PATH_BYTES + ARGV_BYTES);

/// Per-principal allow-event rate limiter (`RATE` map), a GCRA token bucket: one word that
/// only moves forward, updated with compare-and-swap, so CPUs share one budget per principal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateState {
    /// Theoretical arrival time (CLOCK_BOOTTIME ns): an allow event at `now` is emitted when
    /// `tat_ns - now <= (burst - 1) * interval`, and then moves it to `max(tat_ns, now) + interval`.
    pub tat_ns: u64,
    /// Allow events suppressed and not yet carried on an emitted event of this principal.
    pub suppressed: u64,
}
const _: () = assert!(core::mem::size_of::<RateState>() == 16);
