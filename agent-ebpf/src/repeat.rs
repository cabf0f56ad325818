//! Repeated calls on one socket: decided once, each still counted.
//!
//! A process that calls `connect()` or `sendto()` again and again on one socket to one
//! destination gets the same answer each time, until something it depends on moves. The first
//! call is decided in full ([`crate::connect`]) and, when it is a plain allow or a deny only an
//! `EPOCH` move can lift, cached on the
//! socket ([`agent_common::Repeat`], in the `SOCKS` socket storage). An identical call after it
//! skips the policy lookups and the event: it is counted on the socket. The first identical
//! call after [`agent_common::REPEAT_WINDOW_NS`] emits its event with the count
//! (`ConnectEvent::repeats`), so one event stands for that many calls.
//!
//! Every call is still accounted for exactly: a count not yet reported when the socket is
//! closed (`sock_release`) or makes a different call is added to the principal's suppressed
//! count (`RateState::suppressed`), which its next event carries and status and metrics show.
//!
//! What makes a call identical, and so what invalidates the cache (see `Repeat`): the same
//! process (so the same principal: attribution is sticky), hook and destination as given;
//! `EPOCH` unchanged (policy swap, grant revocation, principal removal, a change of the node's
//! own addresses); the principal's `SEEN` mask unchanged (a new zone contacted: chaining may
//! now deny this one); the allowing grant not expired; the socket not cut. A deny is cached
//! when it is a deny rule's or chaining's (they hold whatever a DNS answer opens), or the
//! default of a policy without zones by host name (no DNS answer can open the address): a
//! grant added moves `EPOCH`, so "ask a person" lifts it at the next call. Audit-denies,
//! containment and no-policy denies, addresses opened by a DNS answer (they expire) and DNS
//! redirects are never cached. The
//! check runs before the caller is resolved, and only for a process with a sticky mark (one a
//! principal's call was resolved for), so it costs un-enrolled callers nothing.
//!
//! Minimum kernel: 5.9 (socket storage from sock_addr programs, `sock_release`), 5.11
//! (`bpf_ktime_get_coarse_ns`).

use core::ptr;

use agent_common::{
    Config, KIND_CONNECT, Principal, REASON_CHAINING, REASON_DEFAULT, REASON_RULE,
    REPEAT_WINDOW_NS, Repeat, SOCK_F_CUT, SockState, VALID_FOREVER, VERDICT_ALLOW, VERDICT_DENY,
};
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::generated::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::{SockAddrContext, SockContext},
};

use crate::{
    connect::{ALLOW, DENY, Decision, Dest, Outcome, emit_connect, event_header},
    egress, events,
    principal::Caller,
};

/// The socket of a sock_addr program's call.
#[inline(always)]
pub(crate) fn sock(ctx: &SockAddrContext) -> *mut bpf_sock {
    // SAFETY: the program's context pointer; `sk` is readable in sock_addr programs.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// The socket's state, if it has one (never created here).
#[inline(always)]
pub(crate) fn state_of(sk: *mut bpf_sock) -> Option<&'static mut SockState> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: helper call with the map and the program's socket, no value, no flags.
    let st = unsafe { bpf_sk_storage_get(egress::socks(), sk.cast(), ptr::null_mut(), 0) }
        .cast::<SockState>();
    // SAFETY: a socket storage pointer, valid for this run; the socket is locked by the
    // connect/sendmsg path that runs the hook (and is being released in `sock_release`).
    unsafe { st.as_mut() }
}

/// Whether this call by process `tgid` repeats the socket's cached one with nothing it was
/// decided under moved; if so, accounts for it and returns the program's return code: counted
/// on the socket within the window, and after it, this call's event goes out carrying the
/// count. Runs before the caller is resolved: the cached call was made by this same process,
/// sticky to its principal, and a removed principal moves `EPOCH`.
#[inline(always)]
pub(crate) fn again(
    st: &mut SockState,
    cfg: &Config,
    d: &Dest,
    hook: u8,
    tgid: u32,
) -> Option<i32> {
    let flags = st.flags;
    let r = &mut st.repeat;
    let same = r.verdict != 0
        && flags & SOCK_F_CUT == 0
        && r.pid == tgid
        && r.hook == hook
        && r.port == d.port
        && r.proto == d.proto
        && r.family == d.family
        && r.addr == d.addr
        && r.epoch == egress::epoch()
        && r.seen == egress::seen(r.principal)
        // SAFETY: helper without arguments.
        && (r.valid_until == VALID_FOREVER || unsafe { bpf_ktime_get_boot_ns() } < r.valid_until);
    if !same {
        return None;
    }
    let ret = if r.verdict == VERDICT_DENY {
        DENY
    } else {
        ALLOW
    };
    let now = coarse_now();
    if now.wrapping_sub(r.since) < REPEAT_WINDOW_NS && r.pending < u32::MAX {
        r.pending += 1;
        return Some(ret);
    }
    // The cached decision, as the full path would report it.
    let caller = Caller {
        principal: Principal {
            index: r.principal,
            ..Principal::default()
        },
        cgroup_id: r.cgroup_id,
    };
    let out = Outcome {
        decision: Decision {
            verdict: r.verdict,
            reason: r.reason,
            rule: r.rule,
            grant_id: r.grant_id,
            valid_until: r.valid_until,
        },
        zone: r.zone,
        policy: r.policy,
        by_name: false,
        names: false,
    };
    // (A deny's event is never rate-limited.)
    let Some(header) = event_header(cfg, &caller, &out, KIND_CONNECT) else {
        // Rate-limited: this call was counted as suppressed; the earlier ones join it.
        events::add_suppressed(r.principal, r.pending);
        r.pending = 0;
        r.since = now;
        return Some(ret);
    };
    // Not written: this call is a counted drop; the earlier ones stay pending for the next
    // event.
    if emit_connect(header, d, &out, hook, r.pending) {
        r.pending = 0;
        r.since = now;
    }
    Some(ret)
}

/// The window's clock: CLOCK_MONOTONIC at tick resolution, the cheapest the kernel has.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// After a call decided in full: a plain allow (`plain`: not redirected, not by a DNS answer)
/// or a deny only an `EPOCH` move can lift ([`final_deny`]) is cached on the socket; anything
/// else clears the cache. Either way a count of an earlier call not yet reported goes to the
/// principal's suppressed count.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the decision and what it was made under"
)]
pub(crate) fn remember(
    sk: *mut bpf_sock,
    caller: &Caller,
    d: &Dest,
    hook: u8,
    out: &Outcome,
    plain: bool,
    tgid: u32,
) {
    let verdict = out.decision.verdict;
    let cacheable =
        !sk.is_null() && ((verdict == VERDICT_ALLOW && plain && !out.by_name) || final_deny(out));
    let st = if cacheable {
        egress::principal_state(sk, caller)
    } else {
        state_of(sk)
    };
    let Some(st) = st else { return };
    flush(st);
    if !cacheable {
        st.repeat.verdict = 0;
        return;
    }
    let index = caller.principal.index;
    st.repeat = Repeat {
        addr: d.addr,
        epoch: egress::epoch(),
        seen: egress::seen(index),
        valid_until: out.decision.valid_until,
        since: coarse_now(),
        grant_id: out.decision.grant_id,
        cgroup_id: caller.cgroup_id,
        policy: out.policy,
        rule: out.decision.rule,
        zone: out.zone,
        pending: 0,
        pid: tgid,
        principal: index,
        port: d.port,
        family: d.family,
        proto: d.proto,
        hook,
        reason: out.decision.reason,
        verdict,
    };
}

/// A deny that holds until `EPOCH` moves: a deny rule's or chaining's (no DNS answer lifts
/// them, see `connect::evaluate`), or a default deny under a policy without zones by host name
/// (a DNS answer could open the address under one). Not audit-denies (they let the call
/// through), containment or no-policy denies.
#[inline(always)]
fn final_deny(out: &Outcome) -> bool {
    let d = &out.decision;
    d.verdict == VERDICT_DENY
        && (d.reason == REASON_RULE
            || d.reason == REASON_CHAINING
            || (d.reason == REASON_DEFAULT && !out.names))
}

/// Hands a count not yet reported to the principal's suppressed count.
#[inline(always)]
fn flush(st: &mut SockState) {
    let r = &mut st.repeat;
    if r.verdict != 0 && r.pending != 0 {
        events::add_suppressed(r.principal, r.pending);
        r.pending = 0;
    }
}

/// `sock_release`: a closed socket's unreported count is not lost.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    if let Some(st) = state_of(ctx.sock) {
        flush(st);
    }
    1
}
