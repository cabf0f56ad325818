//! DNS of principals whose policy has zones by host name (`POLICY_F_DNS`): every call to port
//! 53 (UDP or TCP, to any resolver) is sent to the agent's DNS proxy at the principal's own
//! address (`agent_common::dns`), which answers only for names in the principal's zones and
//! writes the answer's addresses into `LEARNED` before releasing it. An IPv6 socket's
//! `connect()` to an IPv6 resolver is sent to the proxy's address IPv4-mapped (the kernel
//! then connects over IPv4; glibc connects its UDP sockets). `recvmsg4/6` make a reply's
//! source the resolver the query was sent to, and `getpeername4/6` make a redirected
//! socket's peer that resolver too (TCP clients check).
//!
//! Refused (EPERM, reason containment; audit-deny and let through under an audit-mode policy):
//! a principal's call straight to a proxy address (only the redirect goes there: another
//! principal's address would be its view of DNS), and an unconnected `sendmsg()` to an IPv6
//! resolver (the kernel cannot send it to an IPv4-mapped address from that hook: `ENOTSUPP`),
//! or from an `IPV6_V6ONLY` socket (it fails to reach the mapped address: closed either way).

use core::ptr;

use agent_common::{
    Config, DnsOrig, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, NONE, POLICY_F_DNS, PROTO_TCP,
    PROTO_UDP,
    dns::{PROXY_MASK, PROXY_NET, proxy_addr},
    is_v4_mapped, policy_key,
};
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get,
    macros::cgroup_sock_addr, programs::SockAddrContext,
};

use crate::{
    connect::{ALLOW, Dest},
    maps::{DNS_CFG, DNS_ORIG, POLICIES},
    principal::Caller,
};

/// What the redirect made of a call.
pub(crate) enum Redirect {
    /// Not DNS of a principal under a policy with host zones: decide it as usual.
    No,
    /// Sent to the proxy: let it through.
    Done,
    /// Refused (see the module docs).
    Refuse,
}

#[inline(always)]
fn orig_map() -> *mut core::ffi::c_void {
    ptr::from_ref(&DNS_ORIG).cast_mut().cast()
}

#[inline(always)]
fn uses_names(cfg: &Config, caller: &Caller) -> bool {
    let slot = caller.policy_slot(cfg);
    if slot == NONE {
        return false;
    }
    match POLICIES.get_ptr(policy_key(cfg.generation & 1, slot)) {
        // SAFETY: map value pointer, valid for this run.
        Some(m) => (unsafe { (*m).flags } & POLICY_F_DNS) != 0,
        None => false,
    }
}

#[inline(always)]
pub(crate) fn redirect(
    ctx: &SockAddrContext,
    cfg: &Config,
    caller: &Caller,
    d: &Dest,
    hook: u8,
) -> Redirect {
    let port = match DNS_CFG.get(0) {
        Some(c) if c.port != 0 => c.port,
        _ => return Redirect::No,
    };
    let is_dns = d.port == 53 && (d.proto == PROTO_UDP || d.proto == PROTO_TCP);
    let mapped = is_v4_mapped(&d.addr);
    let to_proxy = d.port == port && mapped && u32::from_be(d.addr[3]) & PROXY_MASK == PROXY_NET;
    if !(is_dns || to_proxy) || !uses_names(cfg, caller) {
        return Redirect::No;
    }
    if to_proxy && redirected_to(ctx, d.addr[3], port.to_be()) {
        // A socket this redirect connected to the proxy (IPv4-mapped, from an IPv6 socket):
        // the kernel sends each datagram through the IPv4 path, which names the proxy.
        return Redirect::Done;
    }
    if to_proxy || (!mapped && hook != HOOK_CONNECT6) {
        return Redirect::Refuse;
    }
    let proxy = proxy_addr(caller.principal.index).to_be();
    let sa = ctx.sock_addr;
    // SAFETY: the program's context pointer; the destination fields are writable in
    // connect/sendmsg programs of the matching family.
    unsafe {
        if hook == HOOK_CONNECT4 || hook == HOOK_SENDMSG4 {
            (*sa).user_ip4 = proxy;
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0xffffu32.to_be();
            (*sa).user_ip6[3] = proxy;
        }
        (*sa).user_port = u32::from(port.to_be());
    }
    // SAFETY: the context's socket pointer (readable in sock_addr programs).
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if !sk.is_null() {
        // SAFETY: helper call with the map and the program's socket; created if absent.
        let o = unsafe {
            bpf_sk_storage_get(
                orig_map(),
                sk.cast(),
                ptr::null_mut(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
        }
        .cast::<DnsOrig>();
        // SAFETY: a socket storage pointer, valid for this run (or null).
        if let Some(o) = unsafe { o.as_mut() } {
            o.addr = d.addr;
            o.port = 53u16.to_be();
            o.proxy = proxy;
            o.proxy_port = port.to_be();
        }
    }
    Redirect::Done
}

/// Where the redirect sent the context's socket, if it did.
#[inline(always)]
fn orig(ctx: &SockAddrContext) -> Option<&DnsOrig> {
    // SAFETY: the context's socket pointer (readable in sock_addr programs).
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: helper call with the map and the program's socket; no creation.
    let o = unsafe { bpf_sk_storage_get(orig_map(), sk.cast(), ptr::null_mut(), 0) };
    // SAFETY: a socket storage pointer, valid for this run (or null).
    unsafe { o.cast::<DnsOrig>().as_ref() }
}

/// Whether the context's socket was sent by the redirect to `proxy`:`proxy_port` (network
/// order).
#[inline(always)]
fn redirected_to(ctx: &SockAddrContext, proxy: u32, proxy_port: u16) -> bool {
    orig(ctx).is_some_and(|o| o.proxy == proxy && o.proxy_port == proxy_port)
}

/// A reply's source as the caller reads it: the resolver it asked, not the proxy.
#[inline(always)]
fn restore(ctx: &SockAddrContext, v4: bool) -> i32 {
    let sa = ctx.sock_addr;
    let Some(o) = orig(ctx) else {
        return ALLOW;
    };
    // SAFETY: the program's context pointer; the source fields are readable and writable in
    // recvmsg programs of the matching family.
    unsafe {
        let from_proxy = (*sa).user_port == u32::from(o.proxy_port)
            && if v4 {
                (*sa).user_ip4 == o.proxy
            } else {
                (*sa).user_ip6[3] == o.proxy && (*sa).user_ip6[2] == 0xffffu32.to_be()
            };
        if from_proxy {
            if v4 {
                (*sa).user_ip4 = o.addr[3];
            } else {
                (*sa).user_ip6[0] = o.addr[0];
                (*sa).user_ip6[1] = o.addr[1];
                (*sa).user_ip6[2] = o.addr[2];
                (*sa).user_ip6[3] = o.addr[3];
            }
            (*sa).user_port = u32::from(o.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false)
}
