//! Rebuild the kernel programs when bpf-linker changes (it is the linker for this target).
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
