//! Corral's kernel programs. Built for `bpfel-unknown-none` by `agent/build.rs` (aya-build).
//!
//! Every program has the same shape: `fn x(ctx) -> i32 { match try_x(&ctx) { Ok(r) | Err(r) => r } }`.
//! Decisions never wait on userspace: they are made from maps the agent keeps filled.
#![no_std]
#![no_main]
// BPF has atomic add/or (kernel 5.12+ for the fetching forms) but no CAS, so core's Atomic*
// methods are unavailable; the intrinsics lower to the BPF atomic instructions.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics, see above")]

mod connect;
mod dns;
mod egress;
mod events;
mod exec;
mod guard;
mod maps;
mod principal;
mod repeat;
mod scope;
mod unix;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_probe_read_kernel` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
