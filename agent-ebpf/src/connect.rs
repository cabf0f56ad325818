//! cgroup sock_addr programs: connect4/6 and sendmsg4/6 (unconnected UDP, TCP fast open).
//!
//! Minimum kernel: 4.17 (connect hooks), 4.18 (sendmsg hooks); attached at the cgroup v2 root.
//! Returning 0 fails the call with EPERM; 1 lets it proceed. The decision itself
//! ([`evaluate`]) is shared with the unix-socket hooks (`unix.rs`).

use core::intrinsics::{AtomicOrdering, atomic_or};

use agent_common::{
    ACTION_ALLOW, ANY_PORT, ANY_PROTO, Addr, ChainKey, Config, ConnectEvent, EventHeader, GrantKey,
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, KIND_CONNECT, LearnedKey,
    MODE_AUDIT, NONE, POLICY_F_DNS, PolicyMeta, REASON_CHAINING, REASON_CONTAINMENT,
    REASON_DEFAULT, REASON_GRANT, REASON_NO_POLICY, REASON_RULE, RuleKey, SKIP_CHAIN,
    VALID_FOREVER, VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_DENY, ZoneKey, is_v4_mapped,
    maps::limits, policy_key, rule_shape, v4_mapped, zone_prefix_len,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_ktime_get_boot_ns},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};

use crate::{
    egress, events,
    maps::{CHAIN, GRANTS, LEARNED, LOCAL_ADDRS, POLICIES, RULES, SEEN, ZONES},
    principal::{self, Caller},
    repeat,
};

pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, HOOK_CONNECT4) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, HOOK_CONNECT6) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, HOOK_SENDMSG4) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_decide(&ctx, HOOK_SENDMSG6) {
        Ok(r) | Err(r) => r,
    }
}

/// The outcome of a decision before it is turned into a return code and an event.
pub(crate) struct Decision {
    pub verdict: u8,
    pub reason: u8,
    pub rule: u32,
    pub grant_id: u64,
    /// When the allowing grant expires (CLOCK_BOOTTIME ns), or `VALID_FOREVER`.
    pub valid_until: u64,
}

/// The destination of the call as the kernel hands it to us.
pub(crate) struct Dest {
    /// As the caller gave it (the unspecified address already made loopback).
    pub addr: Addr,
    /// What it is decided as: loopback for the node's own addresses, else `addr`.
    pub zone_addr: Addr,
    pub port: u16,
    pub family: u16,
    pub proto: u8,
}

/// The destination as the caller gave it (the unspecified address made loopback);
/// `zone_addr` is left equal to it.
#[inline(always)]
fn raw_dest(ctx: &SockAddrContext, hook: u8) -> Dest {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the program's context pointer; these fields are readable for
    // cgroup sock_addr programs of the matching family (checked by the verifier).
    unsafe {
        let family = (*sa).user_family as u16;
        let port = u16::from_be((*sa).user_port as u16);
        let proto = (*sa).protocol as u8;
        let addr = if hook == HOOK_CONNECT4 || hook == HOOK_SENDMSG4 {
            v4_mapped((*sa).user_ip4)
        } else {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        };
        let addr = effective(addr);
        Dest {
            addr,
            // Looked up by `dest` (the repeat check needs only the address as given).
            zone_addr: addr,
            port,
            family,
            proto,
        }
    }
}

/// The destination, with its address as decided (`zone_addr`).
#[inline(always)]
fn dest(ctx: &SockAddrContext, hook: u8) -> Dest {
    let mut d = raw_dest(ctx, hook);
    d.zone_addr = zone_addr(&d.addr);
    d
}

/// The destination the kernel really connects to. `connect()`/`sendto()` to the unspecified
/// address (`0.0.0.0`, `::`, `::ffff:0.0.0.0`) reaches this host's loopback, so it is decided
/// (and recorded) as `127.0.0.1` or `::1`, never as whatever zone covers `0.0.0.0/0`.
#[inline(always)]
fn effective(addr: Addr) -> Addr {
    if addr == [0; 4] {
        LOOPBACK6
    } else if addr == v4_mapped(0) {
        LOOPBACK4
    } else {
        addr
    }
}

const LOOPBACK6: Addr = [0, 0, 0, 1u32.to_be()];
const LOOPBACK4: Addr = v4_mapped(0x7f00_0001u32.to_be());

/// The address zones are looked up for: one of the node's own addresses (`LOCAL_ADDRS`, kept
/// by the agent) reaches this host as loopback does, so it is decided as loopback of its
/// family (the event keeps the address the caller used).
#[inline(always)]
pub(crate) fn zone_addr(addr: &Addr) -> Addr {
    // SAFETY: map value read, valid for this run.
    if unsafe { LOCAL_ADDRS.get(addr) }.is_none() {
        *addr
    } else if is_v4_mapped(addr) {
        LOOPBACK4
    } else {
        LOOPBACK6
    }
}

#[inline(always)]
fn try_decide(ctx: &SockAddrContext, hook: u8) -> Result<i32, i32> {
    let cfg = principal::config();
    if cfg.level_mask == 0 {
        // No principal anywhere (the common fast path).
        return Ok(ALLOW);
    }
    let sk = repeat::sock(ctx);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The socket's last call again, by the same process (a principal's: it has a sticky
    // mark), with nothing it was decided under moved: counted, not decided again.
    let sticky = principal::may_be_sticky(tgid);
    if sticky
        && let Some(st) = repeat::state_of(sk)
        && let Some(ret) = repeat::again(st, &cfg, &raw_dest(ctx, hook), hook, tgid)
    {
        return Ok(ret);
    }
    let Some(caller) = principal::resolve_marked(&cfg, tgid, sticky) else {
        return Ok(ALLOW);
    };
    let d = dest(ctx, hook);
    let redirected = crate::dns::redirect(ctx, &cfg, &caller, &d, hook);
    if let crate::dns::Redirect::Done = redirected {
        return Ok(ALLOW);
    }
    let plain = matches!(redirected, crate::dns::Redirect::No);
    // Every policy polices IP destinations: `evaluate` always decides.
    let Some(mut out) = evaluate(
        &cfg,
        &caller,
        0,
        d.port,
        d.proto,
        |policy| lookup_zone(policy, &d.zone_addr),
        Some((&d.zone_addr, true)),
        true,
    ) else {
        return Ok(ALLOW);
    };
    /// A refusal no policy can lift (reason containment).
    #[inline(always)]
    fn containment() -> Decision {
        Decision {
            verdict: VERDICT_DENY,
            reason: REASON_CONTAINMENT,
            rule: NONE,
            grant_id: 0,
            valid_until: VALID_FOREVER,
        }
    }
    if let crate::dns::Redirect::Refuse = redirected {
        out.zone = NONE;
        out.decision = containment();
        // Audit mode records it and lets it through, as every containment refusal.
        out.decision.verdict = crate::guard::containment_verdict(&cfg, &caller).0;
    }
    // What lets the call through is recorded on the socket, so the egress program can end the
    // connection when the decision no longer holds; no room for that: fail closed.
    // A socket of a cgroup where the packet programs do not run is refused the same way
    // (see scope.rs); under an audit-mode policy, recorded and let through.
    if out.ret() == ALLOW && !egress::record(ctx, &caller, &d, &out, hook) {
        out.decision = containment();
        out.decision.verdict = crate::guard::containment_verdict(&cfg, &caller).0;
    }
    repeat::remember(sk, &caller, &d, hook, &out, plain, tgid);
    if let Some(header) = event_header(&cfg, &caller, &out, KIND_CONNECT) {
        emit_connect(header, &d, &out, hook, 0);
    }
    Ok(out.ret())
}

/// Emits the event of a call to `d` through `hook` decided as `out`, standing for
/// `1 + repeats` calls; if it cannot be written (a counted drop), the suppressed count the
/// header took is given back to the principal. True if written.
#[inline(always)]
pub(crate) fn emit_connect(
    header: EventHeader,
    d: &Dest,
    out: &Outcome,
    hook: u8,
    repeats: u32,
) -> bool {
    let written = events::emit(
        &ConnectEvent {
            header,
            addr: d.addr,
            zone: out.zone,
            port: d.port,
            family: d.family,
            proto: d.proto,
            hook,
            _pad: [0; 2],
            repeats,
            grant_id: out.decision.grant_id,
        },
        header.verdict,
    );
    if !written {
        events::restore_suppressed(header.principal, header.suppressed);
    }
    written
}

/// A decision with the zone and policy key it was made under.
pub(crate) struct Outcome {
    pub decision: Decision,
    /// Zone index, or `NONE`.
    pub zone: u32,
    /// Generation-qualified policy key, or `NONE`.
    pub policy: u32,
    /// The zone came from an address a DNS answer opened (it expires on its own).
    pub by_name: bool,
    /// The policy has zones by host name: a DNS answer may open an address it denies now.
    pub names: bool,
}

impl Outcome {
    /// The program's return code: 0 fails the call with EPERM.
    #[inline(always)]
    pub fn ret(&self) -> i32 {
        if self.decision.verdict == VERDICT_DENY {
            DENY
        } else {
            ALLOW
        }
    }
}

/// Decides a call of an enrolled `caller` to a destination with `port` and `proto`
/// (`ANY_PORT`/`ANY_PROTO` where the destination has none), whose zone under a policy key
/// `zone_of` finds; with `mark`, updates the chaining state of an allowed call (a re-decision
/// of an established connection does not: it was marked when made). Shared by the IP and unix
/// hooks and the egress re-decision. `None`: the caller's policy lacks a `POLICY_F_*` bit of `requires`, so it does not
/// police this kind of call (allowed, no event). No policy at all: denied (fail closed).
///
/// `by_name`: an IP destination, looked up in `LEARNED` under a policy with zones by host
/// name (with `true`, only an entry not yet expired counts: a new call; an established
/// connection keeps the entry it was made under). An address a DNS answer opened for the
/// caller is decided in the name's zone, except that a rule or chaining denying the zone its
/// address is in still denies it (an allowed name cannot open an address a rule denies).
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "one decision, called from four hooks"
)]
pub(crate) fn evaluate(
    cfg: &Config,
    caller: &Caller,
    requires: u8,
    port: u16,
    proto: u8,
    zone_of: impl FnOnce(u32) -> u32,
    by_name: Option<(&Addr, bool)>,
    mark: bool,
) -> Option<Outcome> {
    let pol_slot = caller.policy_slot(cfg);

    let mut zone = NONE;
    let mut policy = NONE;
    let mut named = false;
    let mut names = false;
    let decision = if pol_slot == NONE {
        Decision {
            verdict: VERDICT_DENY,
            reason: REASON_NO_POLICY,
            rule: NONE,
            grant_id: 0,
            valid_until: VALID_FOREVER,
        }
    } else {
        policy = policy_key(cfg.generation & 1, pol_slot);
        match POLICIES.get_ptr(policy) {
            // Slot announced but not (yet) filled: fail closed.
            None => Decision {
                verdict: VERDICT_DENY,
                reason: REASON_NO_POLICY,
                rule: NONE,
                grant_id: 0,
                valid_until: VALID_FOREVER,
            },
            Some(meta) => {
                // SAFETY: map value pointer, valid for this run.
                let meta = unsafe { *meta };
                if meta.flags & requires != requires {
                    return None;
                }
                zone = zone_of(policy);
                names = meta.flags & POLICY_F_DNS != 0;
                let index = caller.principal.index;
                let learned = match by_name {
                    Some((addr, fresh)) if meta.flags & POLICY_F_DNS != 0 => {
                        learned_zone(policy, index, addr, fresh)
                    }
                    _ => NONE,
                };
                let by_addr = decide(policy, &meta, index, zone, port, proto);
                let by_addr_denies = by_addr.verdict == VERDICT_DENY
                    && (by_addr.reason == REASON_RULE || by_addr.reason == REASON_CHAINING);
                let mut dec = if learned == NONE || by_addr_denies {
                    by_addr
                } else {
                    zone = learned;
                    named = true;
                    decide(policy, &meta, index, learned, port, proto)
                };
                if dec.verdict == VERDICT_DENY && meta.mode == MODE_AUDIT {
                    dec.verdict = VERDICT_AUDIT_DENY;
                }
                dec
            }
        }
    };

    if mark && decision.verdict != VERDICT_DENY && zone < limits::CHAIN_ZONES {
        mark_seen(caller.principal.index, zone);
    }
    Some(Outcome {
        decision,
        zone,
        policy,
        by_name: named,
        names,
    })
}

/// The header of the event to emit, or `None` when the allow event is rate-limited (deny and
/// audit-deny events always go out). The header carries the suppressed count taken from the
/// principal: give it back with `events::restore_suppressed` if the event cannot be written.
#[inline(always)]
pub(crate) fn event_header(
    cfg: &Config,
    caller: &Caller,
    out: &Outcome,
    kind: u8,
) -> Option<EventHeader> {
    let index = caller.principal.index;
    if out.decision.verdict == VERDICT_ALLOW && !events::allow_event_permitted(cfg, index) {
        return None;
    }
    let mut header = events::header(kind, caller.cgroup_id, index);
    header.verdict = out.decision.verdict;
    header.reason = out.decision.reason;
    header.policy = out.policy;
    header.rule = out.decision.rule;
    header.suppressed = events::take_suppressed(index);
    Some(header)
}

/// The zone a DNS answer put `addr` in for `principal` under `policy`, or `NONE`; with
/// `fresh`, only while the entry has not expired.
#[inline(always)]
pub(crate) fn learned_zone(policy: u32, principal: u32, addr: &Addr, fresh: bool) -> u32 {
    let key = LearnedKey {
        principal,
        addr: *addr,
    };
    match LEARNED.get_ptr(key) {
        Some(v) => {
            // SAFETY: map value pointer, valid for this run.
            let v = unsafe { *v };
            // SAFETY: helper without arguments.
            let live = !fresh || unsafe { bpf_ktime_get_boot_ns() } < v.expires;
            if v.policy == policy && live {
                v.zone
            } else {
                NONE
            }
        }
        None => NONE,
    }
}

#[inline(always)]
pub(crate) fn lookup_zone(policy: u32, addr: &Addr) -> u32 {
    let key = Key::new(
        zone_prefix_len(128),
        ZoneKey {
            policy,
            addr: *addr,
        },
    );
    match ZONES.get(&key) {
        Some(v) => v.zone,
        None => NONE,
    }
}

/// Rules (deny beats allow), then chaining (beats everything), then grants (override a deny),
/// then the policy default.
#[inline(always)]
fn decide(
    policy: u32,
    meta: &PolicyMeta,
    principal: u32,
    zone: u32,
    port: u16,
    proto: u8,
) -> Decision {
    let default_action = meta.default_action;
    let mut allow_rule = NONE;
    let mut deny_rule = NONE;
    if zone != NONE {
        for (port, proto) in [
            (port, proto),
            (port, ANY_PROTO),
            (ANY_PORT, proto),
            (ANY_PORT, ANY_PROTO),
        ] {
            // A key shape no rule of the policy has: nothing to find.
            if meta.skip & rule_shape(port, proto) != 0 {
                continue;
            }
            let key = RuleKey {
                policy,
                zone,
                port,
                proto,
                _pad: 0,
            };
            if let Some(v) = RULES.get_ptr(key) {
                // SAFETY: map value pointer, valid for this run.
                let v = unsafe { *v };
                if v.deny_rule < deny_rule {
                    deny_rule = v.deny_rule;
                }
                if v.allow_rule < allow_rule {
                    allow_rule = v.allow_rule;
                }
            }
        }
        if meta.skip & SKIP_CHAIN == 0 && chained(policy, principal, zone) {
            return Decision {
                verdict: VERDICT_DENY,
                reason: REASON_CHAINING,
                rule: NONE,
                grant_id: 0,
                valid_until: VALID_FOREVER,
            };
        }
    }

    let base = if deny_rule != NONE {
        Decision {
            verdict: VERDICT_DENY,
            reason: REASON_RULE,
            rule: deny_rule,
            grant_id: 0,
            valid_until: VALID_FOREVER,
        }
    } else if allow_rule != NONE {
        Decision {
            verdict: VERDICT_ALLOW,
            reason: REASON_RULE,
            rule: allow_rule,
            grant_id: 0,
            valid_until: VALID_FOREVER,
        }
    } else {
        Decision {
            verdict: if default_action == ACTION_ALLOW {
                VERDICT_ALLOW
            } else {
                VERDICT_DENY
            },
            reason: REASON_DEFAULT,
            rule: NONE,
            grant_id: 0,
            valid_until: VALID_FOREVER,
        }
    };
    if base.verdict == VERDICT_DENY
        && zone != NONE
        && let Some((grant_id, valid_until)) = active_grant(principal, zone, port, proto)
    {
        return Decision {
            verdict: VERDICT_ALLOW,
            reason: REASON_GRANT,
            rule: NONE,
            grant_id,
            valid_until,
        };
    }
    base
}

#[inline(always)]
fn chained(policy: u32, principal: u32, zone: u32) -> bool {
    let Some(forbidden_after) = CHAIN.get_ptr(ChainKey { policy, zone }) else {
        return false;
    };
    let Some(seen) = SEEN.get_ptr(principal) else {
        return false;
    };
    // SAFETY: map value pointers, valid for this run.
    unsafe { *forbidden_after & *seen != 0 }
}

#[inline(always)]
fn mark_seen(principal: u32, zone: u32) {
    if let Some(p) = SEEN.get_ptr_mut(principal) {
        let bit = 1u64 << zone;
        // SAFETY: 8-byte aligned map value; concurrent updaters use the same atomic op. A bit
        // already set needs no atomic (and no cache line taken from the other CPUs); a reset
        // racing with this read wins either way, as it would against the atomic.
        unsafe {
            if core::ptr::read_volatile(p) & bit == 0 {
                atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, bit);
            }
        }
    }
}

/// A grant counts only while `now < expires_ns`: expiry needs no userspace action.
/// Returns the grant's id and expiry.
#[inline(always)]
fn active_grant(principal: u32, zone: u32, port: u16, proto: u8) -> Option<(u64, u64)> {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    for (port, proto) in [
        (port, proto),
        (port, ANY_PROTO),
        (ANY_PORT, proto),
        (ANY_PORT, ANY_PROTO),
    ] {
        let key = GrantKey {
            principal,
            zone,
            port,
            proto,
            _pad: 0,
        };
        if let Some(g) = GRANTS.get_ptr(key) {
            // SAFETY: map value pointer, valid for this run.
            let g = unsafe { *g };
            if now < g.expires_ns {
                return Some((g.grant_id, g.expires_ns));
            }
        }
    }
    None
}
