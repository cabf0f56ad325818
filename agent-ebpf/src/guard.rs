//! Containment guards: cgroup `sock_create` and `setsockopt` programs that refuse principals
//! the sockets and options that would get around the connect/sendmsg hooks.
//!
//! - `socket()`: only AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK; for IP only TCP (and MPTCP,
//!   whose subflows are TCP sockets that pass the connect hooks) and UDP (and UDP-Lite, which
//!   shares UDP's send path). Raw sockets, ping sockets (`SOCK_DGRAM` + `IPPROTO_ICMP`, whose
//!   `sendto` has no cgroup hook), SCTP, AF_PACKET, AF_VSOCK and every other family are
//!   refused. Minimum kernel: 4.10. Ping sockets are allowed under a policy with an allow rule
//!   naming protocol icmp (`POLICY_F_ICMP`); each echo is then decided by destination in
//!   `egress.rs`.
//! - `setsockopt()`: IPv4 `IP_OPTIONS` carrying a loose or strict source route, and the IPv6
//!   routing header options (`IPV6_RTHDR`, `IPV6_2292RTHDR`, `IPV6_2292PKTOPTIONS`): the hook
//!   decides on the address given to `connect()`, but a source-routed packet goes to the
//!   route's first hop. Minimum kernel: 5.3.
//!
//! - `socket()` of any other family: cgroup `sock_create` runs for AF_INET/AF_INET6 only, so
//!   `socket_enter`, on the `syscalls:sys_enter_socket` tracepoint, refuses AF_PACKET,
//!   AF_VSOCK and every family but AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK: a tracepoint
//!   cannot fail the call, so the process is killed (`bpf_send_signal(SIGKILL)`, delivered
//!   before the syscall returns to user space), as on the exec fallback path. Where BPF LSM
//!   loads, `lsm/socket_create` would fail it with EPERM instead (not implemented: the
//!   machines this is tested on refuse BPF LSM). Minimum kernel: 5.3. AF_VSOCK is the one
//!   family a policy can allow (`protocols: [vsock]`, `POLICY_F_VSOCK`): then its creation is
//!   let through and recorded as an allow event; its destinations cannot be decided.
//!
//! - `socket()` of an IP socket by a process attributed to a principal stickily while it is in
//!   no principal's cgroup: refused, as the packet programs would not run for the socket (see
//!   scope.rs).
//!
//! The cgroup guards are attached at the cgroup v2 root and leave at once for sockets of processes that are
//! not enrolled (the option check comes before the principal lookup). A refusal returns 0
//! (the call fails with EPERM) and records a [`SocketEvent`] with reason containment; under
//! an audit-mode policy it is recorded as audit-deny and let through.

use agent_common::{
    Config, EventHeader, HOOK_SETSOCKOPT, HOOK_SOCK_CREATE, HOOK_SOCKET_SYSCALL, KIND_SOCKET,
    MODE_AUDIT, NONE, POLICY_F_ICMP, POLICY_F_VSOCK, REASON_CONTAINMENT, REASON_RULE, SocketEvent,
    VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_DENY, policy_key,
};
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::generated::bpf_send_signal,
    macros::{cgroup_sock, cgroup_sockopt, tracepoint},
    programs::{SockContext, SockoptContext, TracePointContext},
};

use crate::{
    connect::ALLOW,
    egress, events,
    maps::POLICIES,
    principal::{self, Caller},
};

const DENY: i32 = 0;

const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_NETLINK: u32 = 16;
const AF_VSOCK: u32 = 40;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_UDPLITE: u32 = 136;
const IPPROTO_MPTCP: u32 = 262;

const SOL_IP: i32 = 0;
const IP_OPTIONS: i32 = 4;
const SOL_IPV6: i32 = 41;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_RTHDR: i32 = 57;

/// IPv4 option types: end of list, no-op, loose and strict source route.
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;
/// At most 40 bytes of IPv4 options.
const MAX_IP_OPTIONS: usize = 40;

const SIGKILL: u32 = 9;

/// Offsets of `family`, `type` and `protocol` in the `sys_enter_socket` record (after the
/// common header and `__syscall_nr`, each argument is 8 bytes): fixed by the syscall ABI.
const ARG_FAMILY: usize = 16;
const ARG_TYPE: usize = 24;
const ARG_PROTOCOL: usize = 32;

#[tracepoint(category = "syscalls", name = "sys_enter_socket")]
pub fn socket_enter(ctx: TracePointContext) -> u32 {
    match try_socket_enter(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[inline(always)]
fn try_socket_enter(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: reads within the tracepoint record, whose layout is the syscall ABI's.
    let family = unsafe { ctx.read_at::<u64>(ARG_FAMILY) }.map_err(|_| 0u32)? as u32;
    if matches!(family, AF_UNIX | AF_INET | AF_INET6 | AF_NETLINK) {
        // IP sockets are checked in detail by `sock_create`.
        return Ok(0);
    }
    // SAFETY: as above.
    let (sock_type, protocol) = unsafe {
        (
            ctx.read_at::<u64>(ARG_TYPE).unwrap_or(0) as u32,
            ctx.read_at::<u64>(ARG_PROTOCOL).unwrap_or(0) as u32,
        )
    };
    let cfg = principal::config();
    let Some(caller) = principal::resolve(&cfg) else {
        return Ok(0);
    };
    let event = SocketEvent {
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        hook: HOOK_SOCKET_SYSCALL,
        ..SocketEvent::default()
    };
    if family == AF_VSOCK && policy_flags(&cfg, &caller) & POLICY_F_VSOCK != 0 {
        let policy = containment_verdict(&cfg, &caller).1;
        record(&caller, event, (VERDICT_ALLOW, REASON_RULE, policy));
        return Ok(0);
    }
    if refuse(&cfg, &caller, event) == DENY {
        // SAFETY: helper call with a plain integer argument.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    Ok(0)
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    match try_sock_create(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    match try_setsockopt(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

/// Whether a socket of this family, type and protocol is one the connect hooks police.
#[inline(always)]
fn policed_socket(family: u32, sock_type: u32, protocol: u32) -> bool {
    match family {
        AF_UNIX | AF_NETLINK => true,
        AF_INET | AF_INET6 => match sock_type {
            SOCK_STREAM => protocol == 0 || protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP,
            SOCK_DGRAM => protocol == 0 || protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE,
            _ => false,
        },
        _ => false,
    }
}

/// A ping socket: `SOCK_DGRAM` with `IPPROTO_ICMP` (IPv4) or `IPPROTO_ICMPV6` (IPv6).
#[inline(always)]
fn ping_socket(family: u32, sock_type: u32, protocol: u32) -> bool {
    sock_type == SOCK_DGRAM
        && ((family == AF_INET && protocol == IPPROTO_ICMP)
            || (family == AF_INET6 && protocol == IPPROTO_ICMPV6))
}

/// A ping socket is allowed to a principal whose policy names icmp (`POLICY_F_ICMP`); the
/// egress program then decides each echo by destination. `Some(ALLOW)` when allowed (or not
/// a principal's); `None`: refuse it as any other unpoliced socket.
#[inline(always)]
fn allow_ping(sk: *mut bpf_sock) -> Option<i32> {
    let cfg = principal::config();
    let Some(caller) = principal::resolve(&cfg) else {
        return Some(ALLOW);
    };
    if policy_flags(&cfg, &caller) & POLICY_F_ICMP == 0 {
        return None;
    }
    // Its echoes are decided only by the packet programs: the socket itself must be of a
    // principal's cgroup (the task may have been moved since the socket took its cgroup).
    if !crate::scope::socket_in_a_principal(sk) {
        return None;
    }
    // SAFETY: the program's context pointer.
    let family = unsafe { (*sk).family } as u16;
    egress::record_ping(sk, &caller, family).then_some(ALLOW)
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) -> Result<i32, i32> {
    let sk = ctx.sock;
    // SAFETY: the program's context pointer; family, type and protocol are readable in
    // cgroup sock programs (checked by the verifier).
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let event = SocketEvent {
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        hook: HOOK_SOCK_CREATE,
        ..SocketEvent::default()
    };
    if !crate::scope::created_in_scope() {
        // A principal's process outside every principal's cgroup (see scope.rs): this socket
        // would run no cgroup_skb program.
        return Ok(refuse_principal(event));
    }
    if policed_socket(family, sock_type, protocol) {
        return Ok(ALLOW);
    }
    if ping_socket(family, sock_type, protocol)
        && let Some(ret) = allow_ping(sk)
    {
        return Ok(ret);
    }
    Ok(refuse_principal(event))
}

#[inline(always)]
fn try_setsockopt(ctx: &SockoptContext) -> Result<i32, i32> {
    let so = ctx.sockopt;
    // SAFETY: the program's context pointer; these fields are readable in sockopt programs.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    let routes = match (level, optname) {
        (SOL_IP, IP_OPTIONS) => ip_options_route(ctx),
        (SOL_IPV6, IPV6_RTHDR | IPV6_2292RTHDR | IPV6_2292PKTOPTIONS) => true,
        _ => false,
    };
    if !routes {
        return Ok(ALLOW);
    }
    // SAFETY: as above; `sk` is readable in sockopt programs.
    let (family, sock_type, protocol) = unsafe {
        let sk = (*so).__bindgen_anon_1.sk;
        ((*sk).family, (*sk).type_, (*sk).protocol)
    };
    Ok(refuse_principal(SocketEvent {
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: protocol as u16,
        hook: HOOK_SETSOCKOPT,
        level: level as u32,
        optname: optname as u32,
        ..SocketEvent::default()
    }))
}

/// Whether an `IP_OPTIONS` value carries a loose or strict source route. Options the program
/// cannot see whole (past the kernel's copy) count as a route: fail closed.
#[inline(always)]
fn ip_options_route(ctx: &SockoptContext) -> bool {
    let so = ctx.sockopt;
    // SAFETY: the program's context pointer.
    let (start, end, optlen) = unsafe {
        (
            (*so).__bindgen_anon_2.optval as usize,
            (*so).__bindgen_anon_3.optval_end as usize,
            (*so).optlen,
        )
    };
    if optlen <= 0 {
        return false;
    }
    let len = optlen as usize;
    if len > MAX_IP_OPTIONS {
        // The kernel rejects more than 40 bytes of options itself.
        return false;
    }
    if start + len > end {
        // Part of the value is not in the kernel's copy: refused unseen.
        return true;
    }
    let mut i = 0usize;
    for _ in 0..MAX_IP_OPTIONS {
        if i >= len || i >= MAX_IP_OPTIONS {
            return false;
        }
        let p = start + i;
        if p + 2 > end {
            // One byte left: END or NOOP, or a truncated option the kernel rejects.
            return false;
        }
        // SAFETY: `p + 2 <= optval_end`, checked above against the verifier's bound.
        let (kind, olen) = unsafe { (*(p as *const u8), *((p + 1) as *const u8)) };
        match kind {
            IPOPT_END => return false,
            IPOPT_NOOP => i += 1,
            IPOPT_LSRR | IPOPT_SSRR => return true,
            _ => {
                if olen < 2 {
                    // Malformed: the kernel rejects it.
                    return false;
                }
                i += olen as usize;
            }
        }
    }
    false
}

/// For a caller that belongs to a principal: records the refusal of `event` and returns the
/// program's code, EPERM or (audit mode) let through. Anyone else: let through, no event.
#[inline(always)]
fn refuse_principal(event: SocketEvent) -> i32 {
    let cfg = principal::config();
    match principal::resolve(&cfg) {
        Some(caller) => refuse(&cfg, &caller, event),
        None => ALLOW,
    }
}

/// The verdict on a containment refusal of `caller` and the policy key it was made under:
/// deny, or audit-deny under an audit-mode policy.
#[inline(always)]
pub(crate) fn containment_verdict(cfg: &Config, caller: &Caller) -> (u8, u32) {
    let slot = caller.policy_slot(cfg);
    if slot == NONE {
        return (VERDICT_DENY, NONE);
    }
    let policy = policy_key(cfg.generation & 1, slot);
    let audit = POLICIES
        .get_ptr(policy)
        // SAFETY: map value pointer, valid for this run.
        .is_some_and(|meta| unsafe { (*meta).mode } == MODE_AUDIT);
    (
        if audit {
            VERDICT_AUDIT_DENY
        } else {
            VERDICT_DENY
        },
        policy,
    )
}

/// `PolicyMeta::flags` of the caller's policy (`POLICY_F_*`); 0 without one.
#[inline(always)]
fn policy_flags(cfg: &Config, caller: &Caller) -> u8 {
    let slot = caller.policy_slot(cfg);
    if slot == NONE {
        return 0;
    }
    POLICIES
        .get_ptr(policy_key(cfg.generation & 1, slot))
        // SAFETY: map value pointer, valid for this run.
        .map_or(0, |meta| unsafe { (*meta).flags })
}

/// Records the refusal and returns the program's code: EPERM, or (audit mode) let through.
#[inline(always)]
fn refuse(cfg: &Config, caller: &Caller, event: SocketEvent) -> i32 {
    let (verdict, policy) = containment_verdict(cfg, caller);
    record(caller, event, (verdict, REASON_CONTAINMENT, policy));
    if verdict == VERDICT_DENY { DENY } else { ALLOW }
}

/// Emits `event` for `caller` with its decision: verdict, reason and policy key.
#[inline(always)]
fn record(caller: &Caller, mut event: SocketEvent, (verdict, reason, policy): (u8, u8, u32)) {
    let index = caller.principal.index;
    let mut header: EventHeader = events::header(KIND_SOCKET, caller.cgroup_id, index);
    header.verdict = verdict;
    header.reason = reason;
    header.policy = policy;
    header.rule = NONE;
    header.suppressed = events::take_suppressed(index);
    event.header = header;
    if !events::emit(&event, verdict) {
        events::restore_suppressed(index, header.suppressed);
    }
}
