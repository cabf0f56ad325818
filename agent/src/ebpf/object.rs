//! The kernel object built by `build.rs` from `agent-ebpf`, embedded in the binary.

/// The ELF object with all of Corral's kernel programs and maps.
pub fn bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"))
}

#[cfg(test)]
mod tests {
    use agent_common::maps::{ALL, MAX_NAME_BYTES};

    /// The kernel side names its maps with literals (`#[map(name = "...")]`); this checks they
    /// are exactly the shared list, each within the kernel's limit. No privileges needed: it
    /// parses the embedded object.
    #[test]
    fn the_objects_maps_are_the_shared_list() {
        let obj = aya_obj::Object::parse(super::bytes()).expect("the embedded object parses");
        let mut got: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            // Sections aya turns into maps (`.rodata`, `.bss`), not ours.
            .filter(|n| !n.starts_with('.'))
            .collect();
        got.sort_unstable();
        let mut want = ALL.to_vec();
        want.sort_unstable();
        assert_eq!(
            got, want,
            "map names in agent-ebpf vs agent_common::maps::ALL"
        );
        for name in ALL {
            assert!(name.len() <= MAX_NAME_BYTES, "{name} is over 15 bytes");
        }
        let mut unique = want.clone();
        unique.dedup();
        assert_eq!(unique.len(), want.len(), "a map name is listed twice");
    }
}
