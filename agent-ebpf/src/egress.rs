//! Revocation that reaches established connections, and per-message source routes: cgroup_skb
//! programs on the principals' packets.
//!
//! The connect/sendmsg hooks record what they let through on the socket ([`record`], the
//! `SOCKS` socket-local storage, see `agent_common::conn`). Both programs are attached at each
//! principal's cgroup, not at the root, so they run only for sockets created there (see
//! scope.rs for what keeps a principal on such sockets). The egress program runs for every
//! packet such a socket sends, and leaves at once for sockets with no state. For
//! a principal's connected socket it re-decides, with the hooks' own [`evaluate`], when the
//! decision may have changed:
//! - `EPOCH` moved on (the agent bumps it on a policy swap, a grant revocation, a principal's
//!   removal);
//! - the principal's `SEEN` mask changed (it contacted a new zone: chaining may now forbid
//!   this one);
//! - the grant that allowed the connection has expired (checked against the clock here, so
//!   an expiry needs no agent: it holds with the agent stopped).
//!
//! A destination that is now denied ends the connection: the socket is marked cut, its
//! packets are dropped from then on both ways (egress here, ingress in [`ingress`]), so it
//! stops carrying data at its next packet, and one event says which connection ended and
//! why (hook `cut4`/`cut6`, the new decision's reason and rule, the grant that had allowed
//! it). A UDP send on a cut socket fails with EPERM; TCP sees its packets vanish.
//!
//! Every packet of a principal's socket is also checked for an IPv4 source route (LSRR/SSRR
//! option) or an IPv6 routing header, which a process can attach to one message with a
//! control message (`IP_RETOPTS`, `IPV6_RTHDR`) without any `setsockopt()`: such a packet is
//! dropped and recorded once per socket (hook `egress_route`, reason containment).
//!
//! Ping sockets (allowed only under a policy naming protocol icmp, see guard.rs) have no
//! connect or sendmsg hook: each echo request they send is decided here by its destination.
//!
//! Minimum kernel: 5.2 (socket-local storage from cgroup_skb), 5.9 for sock_addr programs'
//! access to it (the agent's kernel floor is higher).

use core::ptr;

use agent_common::{
    ANY_PORT, Addr, ConnectEvent, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_CUT4, HOOK_CUT6, HOOK_PING4,
    HOOK_PING6, HOOK_ROUTE_EGRESS, KIND_CONNECT, KIND_SOCKET, NONE, PROTO_ICMP, REASON_CONTAINMENT,
    REASON_NO_POLICY, SOCK_F_AUDITED, SOCK_F_CUT, SOCK_F_DECIDED, SOCK_F_PING, SOCK_F_PRINCIPAL,
    SOCK_F_ROUTE_SEEN, SockState, SocketEvent, VALID_FOREVER, VERDICT_ALLOW, VERDICT_AUDIT_DENY,
    VERDICT_DENY, is_v4_mapped, v4_mapped,
};
use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_ktime_get_boot_ns, bpf_sk_fullsock, bpf_sk_storage_get},
    },
    macros::cgroup_skb,
    programs::{SkBuffContext, SockAddrContext},
};

use crate::{
    connect::{Decision, Dest, Outcome, evaluate, lookup_zone, zone_addr},
    events, guard,
    maps::{EPOCH, PRINCIPALS, SEEN, SOCKS},
    principal::{self, Caller},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// IPv4 option types (see guard.rs).
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;
const IPV4_HEADER: usize = 20;
const MAX_IP_OPTIONS: usize = 40;

/// IPv6 next-header values: hop-by-hop, routing, destination options.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPV6_HEADER: usize = 40;
/// Extension headers walked before the routing header must show (hop-by-hop and destination
/// options may precede it); a longer chain of them is dropped unread (fail closed).
const MAX_EXT_HEADERS: usize = 4;

#[inline(always)]
pub(crate) fn socks() -> *mut core::ffi::c_void {
    ptr::from_ref(&SOCKS).cast_mut().cast()
}

#[inline(always)]
pub(crate) fn epoch() -> u64 {
    EPOCH.get(0).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn seen(principal: u32) -> u64 {
    // SAFETY: map value read, valid for this run.
    unsafe { SEEN.get(principal) }.copied().unwrap_or(0)
}

/// Records on the socket of a call the hooks let through (`out` allowed it, or audit mode
/// let it pass) what the egress program needs: for a connect (or a TCP fast-open send) the
/// decision; for an unconnected send only that the socket is a principal's. False when no
/// state could be stored (the caller then fails the call: closed).
#[inline(always)]
pub(crate) fn record(
    ctx: &SockAddrContext,
    caller: &Caller,
    d: &Dest,
    out: &Outcome,
    hook: u8,
) -> bool {
    // SAFETY: the program's context pointer; `sk` is readable in sock_addr programs.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    let Some(st) = principal_state(sk, caller) else {
        return false;
    };
    // A socket of a cgroup where the packet programs do not run: refused (see scope.rs).
    if !crate::scope::covered(sk, st) {
        return false;
    }
    let connects = hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6 || d.proto == IPPROTO_TCP;
    if !connects {
        return true;
    }
    st.addr = d.zone_addr;
    st.port = d.port;
    st.family = d.family;
    st.proto = d.proto;
    st.zone = out.zone;
    st.grant_id = out.decision.grant_id;
    st.valid_until = out.decision.valid_until;
    st.epoch = epoch();
    st.seen = seen(caller.principal.index);
    st.flags &= !(SOCK_F_CUT | SOCK_F_AUDITED);
    if out.decision.verdict == VERDICT_AUDIT_DENY {
        st.flags |= SOCK_F_AUDITED;
    }
    st.flags |= SOCK_F_DECIDED;
    true
}

/// The state of `sk` (created zeroed if it has none), marked as `caller`'s socket, opened by
/// the current process; `None` if no state could be stored.
#[inline(always)]
pub(crate) fn principal_state(
    sk: *mut bpf_sock,
    caller: &Caller,
) -> Option<&'static mut SockState> {
    // SAFETY: helper call with the map and the program's socket; the value pointer may be
    // null (a zeroed state is created).
    let st = unsafe {
        bpf_sk_storage_get(
            socks(),
            sk.cast(),
            ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<SockState>();
    // SAFETY: a socket storage pointer, valid for this run; the socket is locked by the
    // socket()/connect/sendmsg path that calls this.
    let st = unsafe { st.as_mut() }?;
    let pid_tgid = bpf_get_current_pid_tgid();
    st.flags |= SOCK_F_PRINCIPAL;
    st.cgroup_id = caller.cgroup_id;
    st.principal = caller.principal.index;
    st.pid = (pid_tgid >> 32) as u32;
    st.uid = bpf_get_current_uid_gid() as u32;
    Some(st)
}

/// The principal that owns the socket, if it is still enrolled.
#[inline(always)]
fn owner(st: &SockState) -> Option<Caller> {
    let p = PRINCIPALS.get_ptr(st.cgroup_id)?;
    Some(Caller {
        // SAFETY: map value pointer, valid for this run.
        principal: unsafe { *p },
        cgroup_id: st.cgroup_id,
    })
}

/// The state of the socket that sent or receives this packet, or `None` (not a principal's:
/// the node's own sockets leave here).
#[inline(always)]
fn state(ctx: &SkBuffContext) -> Option<&'static mut SockState> {
    // SAFETY: the program's context pointer; `sk` is readable in cgroup_skb programs.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: helper call on the context's socket pointer (checked non-null).
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    // SAFETY: helper call with the map and a full socket; no creation.
    let st = unsafe { bpf_sk_storage_get(socks(), full.cast(), ptr::null_mut(), 0) };
    // SAFETY: a socket storage pointer, valid for this run.
    unsafe { st.cast::<SockState>().as_mut() }
}

#[cgroup_skb(egress)]
pub fn egress(ctx: SkBuffContext) -> i32 {
    match try_egress(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_skb(ingress)]
pub fn ingress(ctx: SkBuffContext) -> i32 {
    match state(&ctx) {
        Some(st) if st.flags & SOCK_F_CUT != 0 => DROP,
        _ => PASS,
    }
}

#[inline(always)]
fn try_egress(ctx: &SkBuffContext) -> Result<i32, i32> {
    let Some(st) = state(ctx) else {
        return Ok(PASS);
    };
    if st.flags & SOCK_F_CUT != 0 {
        return Ok(DROP);
    }
    if source_routed(ctx) {
        return Ok(refuse_route(ctx, st));
    }
    if st.flags & SOCK_F_PING != 0 {
        return Ok(decide_ping(ctx, st));
    }
    if st.flags & SOCK_F_DECIDED == 0 {
        return Ok(PASS);
    }
    let current = st.valid_until == VALID_FOREVER
        // SAFETY: helper without arguments.
        || unsafe { bpf_ktime_get_boot_ns() } < st.valid_until;
    if current && st.epoch == epoch() && st.seen == seen(st.principal) {
        return Ok(PASS);
    }
    Ok(redecide(st))
}

/// Records a ping socket a principal may open (its policy has `POLICY_F_ICMP`): every echo
/// it sends is then decided here. False when no state could be stored (refused: closed).
#[inline(always)]
pub(crate) fn record_ping(sk: *mut bpf_sock, caller: &Caller, family: u16) -> bool {
    let Some(st) = principal_state(sk, caller) else {
        return false;
    };
    st.flags |= SOCK_F_PING;
    st.family = family;
    st.proto = PROTO_ICMP;
    st.zone = NONE;
    true
}

/// Decides one echo request of a ping socket by its destination (protocol icmp, no port),
/// as the connect hooks decide a call: an allowed one is recorded as contact (chaining), a
/// denied one is dropped (the `sendto()` fails with EPERM).
#[inline(always)]
fn decide_ping(ctx: &SkBuffContext, st: &SockState) -> i32 {
    let (addr, hook) = match ping_destination(ctx) {
        Some(d) => d,
        // Unreadable: closed.
        None => return DROP,
    };
    let Some(caller) = owner(st) else {
        return DROP;
    };
    let cfg = principal::config();
    let za = zone_addr(&addr);
    let Some(out) = evaluate(
        &cfg,
        &caller,
        0,
        ANY_PORT,
        PROTO_ICMP,
        |policy| lookup_zone(policy, &za),
        Some((&za, true)),
        true,
    ) else {
        return PASS;
    };
    let index = st.principal;
    if out.decision.verdict != VERDICT_ALLOW || events::allow_event_permitted(&cfg, index) {
        let mut header =
            events::header_for(KIND_CONNECT, st.cgroup_id, index, st.pid, st.pid, st.uid);
        header.verdict = out.decision.verdict;
        header.reason = out.decision.reason;
        header.policy = out.policy;
        header.rule = out.decision.rule;
        header.suppressed = events::take_suppressed(index);
        let written = events::emit(
            &ConnectEvent {
                header,
                addr,
                zone: out.zone,
                port: 0,
                family: st.family,
                proto: PROTO_ICMP,
                hook,
                _pad: [0; 2],
                repeats: 0,
                grant_id: out.decision.grant_id,
            },
            out.decision.verdict,
        );
        if !written {
            events::restore_suppressed(index, header.suppressed);
        }
    }
    if out.decision.verdict == VERDICT_DENY {
        DROP
    } else {
        PASS
    }
}

/// The destination of an IPv4 or IPv6 packet (IPv4 as `::ffff:a.b.c.d`) and the ping hook.
#[inline(always)]
fn ping_destination(ctx: &SkBuffContext) -> Option<(Addr, u8)> {
    let first = ctx.load::<u8>(0).ok()?;
    match first >> 4 {
        4 => Some((v4_mapped(ctx.load::<u32>(16).ok()?), HOOK_PING4)),
        6 => Some((ctx.load::<Addr>(24).ok()?, HOOK_PING6)),
        _ => None,
    }
}

/// Decides the connection again, as the connect hook would now (without marking chaining
/// state: the connection was counted when it was made).
#[inline(always)]
fn redecide(st: &mut SockState) -> i32 {
    let cfg = principal::config();
    let epoch_now = epoch();
    let addr = st.addr;
    let out = owner(st).and_then(|caller| {
        evaluate(
            &cfg,
            &caller,
            0,
            st.port,
            st.proto,
            |policy| lookup_zone(policy, &addr),
            Some((&addr, false)),
            false,
        )
    });
    // The principal has ended (its session is over): so has its connection.
    let out = out.unwrap_or(Outcome {
        decision: Decision {
            verdict: VERDICT_DENY,
            reason: REASON_NO_POLICY,
            rule: NONE,
            grant_id: 0,
            valid_until: VALID_FOREVER,
        },
        zone: st.zone,
        policy: NONE,
        by_name: false,
        names: false,
    });
    let verdict = out.decision.verdict;
    if verdict == VERDICT_ALLOW || verdict == VERDICT_AUDIT_DENY {
        if verdict == VERDICT_AUDIT_DENY && st.flags & SOCK_F_AUDITED == 0 {
            st.flags |= SOCK_F_AUDITED;
            report_cut(st, &out);
        }
        st.zone = out.zone;
        st.grant_id = out.decision.grant_id;
        st.valid_until = out.decision.valid_until;
        st.epoch = epoch_now;
        st.seen = seen(st.principal);
        return PASS;
    }
    st.flags |= SOCK_F_CUT;
    report_cut(st, &out);
    DROP
}

/// One event for an ended (or, in audit mode, would-be-ended) connection.
#[inline(always)]
fn report_cut(st: &SockState, out: &Outcome) {
    let mut header = events::header_for(
        KIND_CONNECT,
        st.cgroup_id,
        st.principal,
        st.pid,
        st.pid,
        st.uid,
    );
    header.verdict = out.decision.verdict;
    header.reason = out.decision.reason;
    header.policy = out.policy;
    header.rule = out.decision.rule;
    let hook = if is_v4_mapped(&st.addr) {
        HOOK_CUT4
    } else {
        HOOK_CUT6
    };
    let _ = events::emit(
        &ConnectEvent {
            header,
            addr: st.addr,
            zone: out.zone,
            port: st.port,
            family: st.family,
            proto: st.proto,
            hook,
            _pad: [0; 2],
            repeats: 0,
            // The grant that had allowed the connection (a grant still allowing it would not
            // have ended it).
            grant_id: st.grant_id,
        },
        out.decision.verdict,
    );
}

/// Drops a source-routed packet (or, in audit mode, records it and lets it pass); recorded
/// once per socket.
#[inline(always)]
fn refuse_route(ctx: &SkBuffContext, st: &mut SockState) -> i32 {
    let (verdict, policy) = match owner(st) {
        Some(caller) => guard::containment_verdict(&principal::config(), &caller),
        None => (VERDICT_DENY, NONE),
    };
    if st.flags & SOCK_F_ROUTE_SEEN == 0 {
        st.flags |= SOCK_F_ROUTE_SEEN;
        let mut header = events::header_for(
            KIND_SOCKET,
            st.cgroup_id,
            st.principal,
            st.pid,
            st.pid,
            st.uid,
        );
        header.verdict = verdict;
        header.reason = REASON_CONTAINMENT;
        header.policy = policy;
        header.rule = NONE;
        // SAFETY: the program's context pointer.
        let (family, protocol) = unsafe {
            let skb = ctx.skb.skb;
            (
                if (*skb).protocol == u32::from(0x86ddu16.to_be()) {
                    AF_INET6
                } else {
                    AF_INET
                },
                st.proto,
            )
        };
        let _ = events::emit(
            &SocketEvent {
                header,
                family,
                protocol: u16::from(protocol),
                hook: HOOK_ROUTE_EGRESS,
                ..SocketEvent::default()
            },
            verdict,
        );
    }
    if verdict == VERDICT_DENY { DROP } else { PASS }
}

/// Whether the packet carries an IPv4 loose/strict source route or an IPv6 routing header.
/// Headers the program cannot read count as routed (fail closed).
#[inline(always)]
fn source_routed(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return true;
    };
    match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            ihl > IPV4_HEADER && ipv4_route(ctx, ihl - IPV4_HEADER)
        }
        6 => ipv6_route(ctx),
        _ => false,
    }
}

/// Walks `len` bytes of IPv4 options for LSRR/SSRR (a byte at a time: only packets that
/// carry options come here).
#[inline(always)]
fn ipv4_route(ctx: &SkBuffContext, len: usize) -> bool {
    let len = len.min(MAX_IP_OPTIONS);
    let mut i = 0usize;
    for _ in 0..MAX_IP_OPTIONS {
        if i >= len {
            return false;
        }
        let Ok(kind) = ctx.load::<u8>(IPV4_HEADER + i) else {
            return true;
        };
        match kind {
            IPOPT_END => return false,
            IPOPT_NOOP => i += 1,
            IPOPT_LSRR | IPOPT_SSRR => return true,
            _ => {
                let Ok(olen) = ctx.load::<u8>(IPV4_HEADER + i + 1) else {
                    return true;
                };
                if olen < 2 {
                    return true;
                }
                i += usize::from(olen);
            }
        }
    }
    false
}

/// Walks the IPv6 extension headers (hop-by-hop and destination options) for a routing header.
#[inline(always)]
fn ipv6_route(ctx: &SkBuffContext) -> bool {
    let Ok(mut next) = ctx.load::<u8>(6) else {
        return true;
    };
    let mut off = IPV6_HEADER;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_ROUTING => return true,
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let Ok(hdr) = ctx.load::<[u8; 2]>(off) else {
                    return true;
                };
                next = hdr[0];
                off += (usize::from(hdr[1]) + 1) * 8;
            }
            _ => return false,
        }
    }
    next == NEXTHDR_ROUTING || matches!(next, NEXTHDR_HOP | NEXTHDR_DEST)
}
