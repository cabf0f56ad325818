//! The bpf(2) commands aya 0.14 does not offer: loading a cgroup sock_addr program with any
//! attach type (aya lacks the unix ones), linking it to a cgroup, pinning a raw fd, and making
//! a bare map. Used by the unix hooks ([`super::unix_hooks`]), by the benchmark's calibration
//! program ([`constant_sock_addr`]), and by the tests that leave pins of another layout
//! ([`create_map`]).

use std::{
    ffi::CString,
    fs::File,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya_obj::generated::bpf_insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_CGROUP_INET4_CONNECT`.
pub const ATTACH_INET4_CONNECT: u32 = 10;
/// `BPF_CGROUP_UDP4_SENDMSG`.
pub const ATTACH_UDP4_SENDMSG: u32 = 14;
/// Verifier log size when a load is retried to explain its failure.
const LOG_BYTES: usize = 1 << 20;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}
const _: () = assert!(size_of::<ProgLoadAttr>() == 72);

/// `union bpf_attr` for `BPF_LINK_CREATE` (no target-specific part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}
const _: () = assert!(size_of::<LinkCreateAttr>() == 16);

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to `map_flags`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}
const _: () = assert!(size_of::<MapCreateAttr>() == 20);

/// `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}
const _: () = assert!(size_of::<ObjPinAttr>() == 16);

/// Calls `bpf(cmd, attr)`; a non-negative result is a new fd for the commands used here.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`,
    // its size passed alongside (the kernel zero-extends a shorter attr); pointers inside it
    // point to memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: `fd` was just returned by the kernel as a new file descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the bpf object `fd` (a link, a map) at `path` on bpffs.
pub fn pin_fd(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// A new map of `map_type` (`BPF_MAP_TYPE_*`) with this layout and no flags.
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut attr).and_then(owned)
}

/// Links the cgroup program `prog` to `cgroup` at `attach_type`; dropping the link detaches it.
pub fn link_cgroup(prog: &OwnedFd, cgroup: &File, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).and_then(owned)
}

/// Loads a cgroup sock_addr program for `attach_type`. On failure the error carries the tail of
/// the verifier log.
pub fn load_sock_addr(
    name: &str,
    attach_type: u32,
    insns: &[bpf_insn],
    license: &CString,
) -> Result<OwnedFd, String> {
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: u32::try_from(insns.len()).map_err(|e| e.to_string())?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => owned(fd).map_err(|e| e.to_string()),
        Err(e) => {
            // Again with the verifier log, to say why.
            let mut log = vec![0u8; LOG_BYTES];
            attr.log_level = 1;
            attr.log_size = LOG_BYTES as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut attr).map(owned);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "load {name} ({} instructions): {e}{}",
                insns.len(),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("\nverifier log:\n{}", tail.join("\n"))
                }
            ))
        }
    }
}

/// A sock_addr program named `name` that only returns `ret` (1: allow). With BPF run-time
/// statistics on, the run time the kernel reports for it is what the statistics themselves and
/// the bare program call add to any run: the benchmark subtracts it from the real programs'.
pub fn constant_sock_addr(name: &str, attach_type: u32, ret: i32) -> Result<OwnedFd, String> {
    let insn = |code: u8, imm: i32| bpf_insn {
        code,
        _bitfield_align_1: [],
        // dst_reg r0, src_reg unused
        _bitfield_1: bpf_insn::new_bitfield_1(0, 0),
        off: 0,
        imm,
    };
    // r0 = ret (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    let (mov, exit) = (insn(0xb7, ret), insn(0x95, 0));
    let license = CString::new("GPL").map_err(|e| e.to_string())?;
    load_sock_addr(name, attach_type, &[mov, exit], &license)
}

/// `FILEID_KERNFS`: a kernfs (cgroupfs) file handle, whose 8 bytes are the node's id.
const FILEID_KERNFS: i32 = 0xfe;

/// `struct file_handle` with room for a kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

/// Opens the cgroup whose id is `id` (as `bpf_get_current_cgroup_id` gives it) through any
/// directory `mount` of the same cgroup v2 mount (`open_by_handle_at`, needs
/// CAP_DAC_READ_SEARCH).
pub fn open_cgroup_by_id(mount: &File, id: u64) -> std::io::Result<File> {
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` is a valid `struct file_handle` with `handle_bytes` bytes of handle
    // after its header; a non-negative result is a new fd this call owns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            std::ptr::from_mut(&mut handle),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just returned by the kernel, owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}
