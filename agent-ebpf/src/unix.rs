//! cgroup unix-socket hooks: `connect_unix` (connect() on an AF_UNIX socket) and `sendmsg_unix`
//! (sendmsg()/sendto() with a destination on an AF_UNIX datagram socket).
//!
//! Minimum kernel: 6.7 (`BPF_CGROUP_UNIX_CONNECT`/`BPF_CGROUP_UNIX_SENDMSG`); older kernels
//! have no such hooks and unix sockets are not policed (the agent's `status` says which hooks
//! are attached). aya 0.14 knows neither attach type, so these functions are declared as
//! `connect4` programs only to get them into the object; the agent never loads them as such:
//! `agent/src/ebpf/unix_hooks.rs` loads them with the unix attach types and attaches them.
//!
//! The destination is the `sockaddr_un` the caller passed; it is read through the kernel's
//! `struct bpf_sock_addr_kern` (the context behind the `bpf_sock_addr` view, which has no unix
//! fields), so these programs touch no context field. The decision is the IP hooks' own
//! ([`crate::connect::evaluate`]) with port `ANY_PORT` and protocol `ANY_PROTO`, for the
//! principals whose policy has `POLICY_F_UNIX` (the agent sets it for every policy). Enrolled
//! without a policy: denied (fail closed), as for IP.

use agent_common::{
    ANY_PORT, ANY_PROTO, HOOK_CONNECT_UNIX, HOOK_SENDMSG_UNIX, KIND_UNIX, NONE, POLICY_F_UNIX,
    UNIX_PATH_BYTES, UnixEvent, UnixKey,
};
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated as raw},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    connect::{ALLOW, evaluate, event_header},
    events,
    maps::{EVENTS, UNIX_ZONES},
    principal,
};

/// The kernel's `struct bpf_sock_addr_kern` (include/linux/filter.h), unchanged since 6.7:
/// `sk`, `uaddr`, `tmp_reg`, `t_ctx`, `uaddrlen`. The agent checks these offsets against the
/// running kernel's BTF before it attaches the unix hooks.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockAddrKern {
    sk: u64,
    uaddr: u64,
    tmp_reg: u64,
    t_ctx: u64,
    uaddrlen: u32,
    _pad: u32,
}

/// Offset of `sun_path` in `struct sockaddr_un`.
const SUN_PATH: u64 = 2;

#[cgroup_sock_addr(connect4)]
pub fn connect_unix(ctx: SockAddrContext) -> i32 {
    match try_unix(&ctx, HOOK_CONNECT_UNIX) {
        Ok(r) | Err(r) => r,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sendmsg_unix(ctx: SockAddrContext) -> i32 {
    match try_unix(&ctx, HOOK_SENDMSG_UNIX) {
        Ok(r) | Err(r) => r,
    }
}

/// Reads the destination into `key.path` (zeroed by the caller; see `UnixKey::path` for the
/// encoding: the name, zero-filled after it) and returns the name's length in bytes.
///
/// Only the `uaddrlen` bytes the caller passed are read (the kernel's copy of the address is
/// larger, the rest is not the caller's), and a filesystem path ends at its first NUL, as the
/// kernel itself reads it: anything else would let junk after the name dodge an exact match.
/// Branch-free per byte, so the verifier walks the 108 bytes once.
#[inline(always)]
fn read_path(ctx: &SockAddrContext, key: &mut UnixKey) -> u16 {
    // SAFETY: bpf_probe_read_kernel tolerates any address (a fault returns an error); the
    // context pointer of a sock_addr program points to the kernel's `bpf_sock_addr_kern`.
    let Ok(kern) = (unsafe { bpf_probe_read_kernel(ctx.sock_addr.cast::<SockAddrKern>()) }) else {
        return 0;
    };
    // `uaddrlen` counts `sun_family` too.
    let len = kern.uaddrlen.saturating_sub(SUN_PATH as u32);
    let n = if len >= UNIX_PATH_BYTES as u32 {
        UNIX_PATH_BYTES as u32
    } else {
        len
    };
    if kern.uaddr == 0 || n == 0 {
        return 0;
    }
    // SAFETY: writes at most `n` <= size_of_val(&key.path) bytes into `key.path`; the source
    // may be any address (a fault returns an error).
    let r = unsafe {
        raw::bpf_probe_read_kernel(
            key.path.as_mut_ptr().cast::<c_void>(),
            n,
            (kern.uaddr + SUN_PATH) as *const c_void,
        )
    };
    if r != 0 {
        key.path = [0; UNIX_PATH_BYTES];
        return 0;
    }
    // 1 for an abstract name (leading NUL): every byte up to `n` counts.
    let abstract_name = u32::from(key.path[0] == 0);
    let mut keep = 1u32;
    let mut count = 0u32;
    for b in key.path.iter_mut() {
        // 1 if the byte is not NUL, without a branch.
        let nonzero = (u32::from(*b) + 255) >> 8;
        keep &= nonzero | abstract_name;
        *b = (u32::from(*b) * keep) as u8;
        count += keep;
    }
    if abstract_name == 1 {
        n as u16
    } else {
        count as u16
    }
}

#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is used again for the event: look it up in place, no second 112-byte \
              copy on the BPF stack"
)]
fn try_unix(ctx: &SockAddrContext, hook: u8) -> Result<i32, i32> {
    let cfg = principal::config();
    let Some(caller) = principal::resolve(&cfg) else {
        return Ok(ALLOW);
    };
    // On the stack (112 bytes), not in a per-CPU scratch map: a program run can be preempted
    // by another task's run on the same CPU, which would overwrite shared scratch space.
    let mut key = UnixKey::default();
    let path_len = read_path(ctx, &mut key);
    key.len = path_len;
    // Policies with `POLICY_F_UNIX` (all, as the agent writes them) police unix sockets.
    let Some(out) = evaluate(
        &cfg,
        &caller,
        POLICY_F_UNIX,
        ANY_PORT,
        ANY_PROTO,
        |policy| {
            key.policy = policy;
            match UNIX_ZONES.get_ptr(&key) {
                // SAFETY: map value pointer, valid for this run.
                Some(v) => unsafe { (*v).zone },
                None => NONE,
            }
        },
        None,
        true,
    ) else {
        return Ok(ALLOW);
    };
    let Some(header) = event_header(&cfg, &caller, &out, KIND_UNIX) else {
        return Ok(out.ret());
    };
    let flags = events::submit_flags(header.verdict);
    match EVENTS.reserve::<UnixEvent>(0) {
        Some(mut entry) => {
            let e = entry.as_mut_ptr();
            // SAFETY: `e` points to a reserved ring buffer record of size_of::<UnixEvent>(),
            // every field written before submit.
            unsafe {
                (*e).header = header;
                (*e).zone = out.zone;
                (*e).hook = hook;
                (*e)._pad = 0;
                (*e).path_len = path_len;
                (*e).grant_id = out.decision.grant_id;
                (*e).path = key.path;
                (*e)._pad2 = [0; 4];
            }
            entry.submit(flags);
        }
        None => {
            events::count_drop();
            events::restore_suppressed(caller.principal.index, header.suppressed);
        }
    }
    Ok(out.ret())
}
