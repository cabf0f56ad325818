//! The kernel object built by `build.rs` from `agent-ebpf`, embedded in the binary.

/// The ELF object with all of Corral's kernel programs and maps.
pub fn bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"))
}
