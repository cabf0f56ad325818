//! Containment for `corral run`: what CMD may do beyond the kernel programs' policy. Just before
//! exec (after joining the principal's cgroup), in this order:
//!
//! 1. `--user`: `PR_SET_KEEPCAPS`, then setgroups/setgid/setuid;
//! 2. capabilities: every capability up to `/proc/sys/kernel/cap_last_cap` leaves the bounding
//!    set, the ambient set is cleared and permitted/effective/inheritable emptied, except the
//!    `--cap` ones, which stay in all of them and are raised as ambient so they survive exec
//!    (also as a non-root `--user`);
//! 3. `no_new_privs`, always;
//! 4. the seccomp filter ([`filters`]), unless `--no-seccomp`.
//!
//! Any failure is an error and CMD is not run (fail closed). (A caller without CAP_SETPCAP, not
//! root, keeps its bounding set: it cannot change it, and has no capabilities to lose.)
//!
//! Every step acts on the calling thread only (rustix's raw syscalls; seccomp without TSYNC).
//! That is enough: execve ends every other thread of the process and runs CMD on this one, with
//! this thread's credentials, capabilities, `no_new_privs` and seccomp filters. The other
//! threads (if the runtime has any) are ours and idle until then.

use std::{collections::BTreeMap, path::Path};

use rustix::{
    process::{Gid, Uid},
    thread::{self, CapabilitySet, CapabilitySets},
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use crate::error::CliError;

/// Capability names by number (`capability.h`), without the `CAP_` prefix.
const CAP_NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// One capability kept with `--cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(u32);

impl Cap {
    /// `net_bind_service`, `CAP_NET_BIND_SERVICE` or `cap_net_bind_service`.
    pub fn parse(s: &str) -> Result<Self, CliError> {
        let lower = s.trim().to_ascii_lowercase();
        let name = lower.strip_prefix("cap_").unwrap_or(&lower);
        CAP_NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| u32::try_from(i).ok())
            .map(Self)
            .ok_or_else(|| CliError::BadCap { name: s.into() })
    }

    /// The name as shown in status: `net_bind_service`.
    pub fn name(self) -> &'static str {
        CAP_NAMES[self.0 as usize]
    }

    fn set(self) -> CapabilitySet {
        CapabilitySet::from_bits_retain(1 << self.0)
    }
}

/// The user CMD runs as (`--user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the primary group and the `/etc/group` groups that list the user.
    pub groups: Vec<u32>,
}

impl User {
    /// A name from `/etc/passwd`, or a numeric uid (its `/etc/passwd` entry if any; else its
    /// primary group is the same number).
    pub fn resolve(s: &str) -> Result<Self, CliError> {
        Self::resolve_in(s, Path::new("/etc/passwd"), Path::new("/etc/group"))
    }

    fn resolve_in(s: &str, passwd: &Path, group: &Path) -> Result<Self, CliError> {
        let bad = |reason: String| CliError::BadUser {
            user: s.into(),
            reason,
        };
        let numeric = s.parse::<u32>().ok();
        if numeric == Some(u32::MAX) {
            return Err(bad("-1 is not a uid".into()));
        }
        let text = std::fs::read_to_string(passwd).unwrap_or_default();
        let entry = text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (name, uid, gid) = (f.first()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            let hit = match numeric {
                Some(n) => uid == n,
                None => *name == s,
            };
            hit.then(|| ((*name).to_owned(), uid, gid))
        });
        let (name, uid, gid): (Option<String>, u32, u32) = match (entry, numeric) {
            (Some((name, uid, gid)), _) => (Some(name), uid, gid),
            (None, Some(n)) => (None, n, n),
            (None, None) => {
                return Err(bad(format!("no such user in {}", passwd.display())));
            }
        };
        if gid == u32::MAX {
            return Err(bad("its group is -1".into()));
        }
        let mut groups = vec![gid];
        if let Some(name) = name {
            let text = std::fs::read_to_string(group).unwrap_or_default();
            for l in text.lines() {
                let f: Vec<&str> = l.split(':').collect();
                if let (Some(g), Some(members)) = (f.get(2).and_then(|g| g.parse().ok()), f.get(3))
                    && g != u32::MAX
                    && members.split(',').any(|m| m.trim() == name)
                    && !groups.contains(&g)
                {
                    groups.push(g);
                }
            }
        }
        Ok(Self { uid, gid, groups })
    }
}

/// What `corral run` does to itself before exec.
#[derive(Debug, Clone)]
pub struct Containment {
    pub user: Option<User>,
    pub caps: Vec<Cap>,
    pub seccomp: bool,
}

fn step(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> CliError {
    move |e| CliError::Contain {
        step,
        source: e.into(),
    }
}

impl Containment {
    /// Applies it to the calling thread (see the module comment), in the order above.
    pub fn apply(&self) -> Result<(), CliError> {
        let kept = self
            .caps
            .iter()
            .fold(CapabilitySet::empty(), |s, c| s | c.set());
        // Built before anything is dropped: a filter that does not build fails early.
        let filters = if self.seccomp { filters()? } else { Vec::new() };
        if let Some(u) = &self.user {
            // Keep the permitted set across setuid: dropping from the bounding set below needs
            // CAP_SETPCAP, and the `--cap` ones must stay. Exec clears the flag.
            thread::set_keep_capabilities(true).map_err(step("set keepcaps"))?;
            let groups: Vec<Gid> = u.groups.iter().map(|g| Gid::from_raw(*g)).collect();
            thread::set_thread_groups(&groups).map_err(step("setgroups"))?;
            thread::set_thread_gid(Gid::from_raw(u.gid)).map_err(step("setgid"))?;
            thread::set_thread_uid(Uid::from_raw(u.uid)).map_err(step("setuid"))?;
        }
        drop_capabilities(kept)?;
        thread::set_no_new_privs(true).map_err(step("set no_new_privs"))?;
        for f in &filters {
            // The calling thread only: see the module comment.
            seccompiler::apply_filter(f).map_err(|source| CliError::Seccomp { source })?;
        }
        Ok(())
    }
}

/// The bounding set loses every capability not in `kept`, the ambient set is cleared, and
/// permitted/effective/inheritable become `kept`; `kept` is then raised as ambient.
fn drop_capabilities(kept: CapabilitySet) -> Result<(), CliError> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .map_err(|source| CliError::Contain {
            step: "read /proc/sys/kernel/cap_last_cap",
            source,
        })?
        .trim()
        .parse()
        .map_err(|_| CliError::Contain {
            step: "read /proc/sys/kernel/cap_last_cap",
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        })?;
    if last > 63 {
        // The capability sets are 64 bits wide: a kernel with more cannot be contained here.
        return Err(CliError::Contain {
            step: "drop capabilities beyond 63",
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        });
    }
    // After setuid (with keepcaps) the effective set is empty: take back what is permitted,
    // so CAP_SETPCAP allows dropping from the bounding set.
    let now = thread::capabilities(None).map_err(step("read capabilities"))?;
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective: now.permitted,
            ..now
        },
    )
    .map_err(step("raise the permitted capabilities"))?;
    // Without CAP_SETPCAP (a non-root caller from the agent's enrol group) the bounding set
    // cannot shrink. Nothing is lost: under `no_new_privs` exec grants nothing beyond the
    // permitted set, which is emptied below; the bounding set is a second wall for root.
    let can_drop = now.permitted.contains(CapabilitySet::SETPCAP);
    for n in 0..=last {
        let cap = CapabilitySet::from_bits_retain(1 << n);
        if can_drop && !kept.contains(cap) {
            thread::remove_capability_from_bounding_set(cap)
                .map_err(step("drop from the bounding set"))?;
        }
    }
    thread::clear_ambient_capability_set().map_err(step("clear the ambient set"))?;
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective: kept,
            permitted: kept,
            inheritable: kept,
        },
    )
    .map_err(step(
        "set the capabilities; a --cap corral run lacks cannot be kept",
    ))?;
    for n in 0..64 {
        let cap = CapabilitySet::from_bits_retain(1 << n);
        if kept.contains(cap) {
            thread::configure_capability_in_ambient_set(cap, true)
                .map_err(step("raise an ambient capability"))?;
        }
    }
    Ok(())
}

/// The seccomp filters, both "allow unless": calls that let a process reach beyond itself
/// (ptrace and its kin, bpf, perf, kernel modules, kexec, namespaces, mounts, io_uring) fail
/// with EPERM;
/// clone3 fails with ENOSYS (its flags are in memory, out of the filter's reach), so libc falls
/// back to clone, whose flags are checked.
///
/// seccompiler's filters kill a process whose call comes in through another architecture's
/// ABI (e.g. 32-bit x86 on x86_64); on x86_64 a third filter refuses x32 calls ([`x32_guard`]).
pub fn filters() -> Result<Vec<BpfProgram>, CliError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| CliError::Seccomp { source: e.into() })?;
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_setns,
        libc::SYS_mount,
        // The new mount API: the same as mount.
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        // io_uring creates sockets (IORING_OP_SOCKET) without the socket() syscall, so past
        // the `sys_enter_socket` guard of the families no cgroup hook sees (AF_VSOCK needs no
        // capability). Docker's default profile refuses it too.
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    // unshare(flags) and clone(flags, ...): flags is the first argument on x86_64, aarch64 and
    // riscv64 (seccompiler's architectures).
    let new_ns = |flag: libc::c_int| -> Result<SeccompRule, seccompiler::BackendError> {
        let flag = u64::from(flag.unsigned_abs());
        SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?])
    };
    let seccomp = |e: seccompiler::BackendError| CliError::Seccomp { source: e.into() };
    for nr in [libc::SYS_unshare, libc::SYS_clone] {
        deny.insert(
            nr,
            vec![
                new_ns(libc::CLONE_NEWUSER).map_err(seccomp)?,
                new_ns(libc::CLONE_NEWNS).map_err(seccomp)?,
            ],
        );
    }
    let eperm = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        arch,
    )
    .map_err(seccomp)?;
    let enosys = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
        arch,
    )
    .map_err(seccomp)?;
    let mut progs = [eperm, enosys]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(seccomp))
        .collect::<Result<Vec<_>, _>>()?;
    if arch == TargetArch::x86_64 {
        progs.push(x32_guard());
    }
    Ok(progs)
}

/// x32 calls come in as the x86_64 architecture with the syscall number ORed with
/// `__X32_SYSCALL_BIT`, which seccompiler's filters (keyed on the x86_64 numbers) would let
/// through on kernels with `CONFIG_X86_X32_ABI`: they fail with ENOSYS, as where x32 is off.
fn x32_guard() -> BpfProgram {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    // `struct seccomp_data`: `nr` is at offset 0.
    let op = |code: u32| u16::try_from(code).unwrap_or(u16::MAX);
    vec![
        sock_filter {
            code: op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS),
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: op(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K),
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: op(libc::BPF_RET | libc::BPF_K),
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs(),
        },
        sock_filter {
            code: op(libc::BPF_RET | libc::BPF_K),
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_in_every_spelling() {
        assert_eq!(Cap::parse("net_bind_service").ok(), Some(Cap(10)));
        assert_eq!(Cap::parse("CAP_NET_BIND_SERVICE").ok(), Some(Cap(10)));
        assert_eq!(Cap::parse("cap_sys_admin").ok(), Some(Cap(21)));
        assert_eq!(Cap::parse("checkpoint_restore").ok(), Some(Cap(40)));
        assert_eq!(Cap(10).name(), "net_bind_service");
        assert!(Cap::parse("net_bind").is_err());
        assert!(Cap::parse("").is_err());
    }

    #[test]
    fn users_by_name_or_number() -> Result<(), CliError> {
        let dir = std::env::temp_dir().join(format!("corral-contain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (passwd, group) = (dir.join("passwd"), dir.join("group"));
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\nann:x:1000:1000::/home/ann:/bin/sh\n",
        )
        .expect("write passwd");
        std::fs::write(
            &group,
            "ann:x:1000:\nwheel:x:10:root,ann\ndocker:x:999:bob\n",
        )
        .expect("write group");
        let ann = User::resolve_in("ann", &passwd, &group)?;
        assert_eq!(
            ann,
            User {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10]
            }
        );
        assert_eq!(User::resolve_in("1000", &passwd, &group)?, ann);
        assert_eq!(User::resolve_in("65534", &passwd, &group)?.gid, 65534);
        let stranger = User::resolve_in("4242", &passwd, &group)?;
        assert_eq!((stranger.uid, stranger.gid), (4242, 4242));
        assert!(User::resolve_in("bob", &passwd, &group).is_err());
        assert!(User::resolve_in("4294967295", &passwd, &group).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn the_filters_build_for_this_architecture() {
        let f = filters().expect("filters");
        assert_eq!(f.len(), if cfg!(target_arch = "x86_64") { 3 } else { 2 });
        assert!(f.iter().all(|p| !p.is_empty()));
    }
}
