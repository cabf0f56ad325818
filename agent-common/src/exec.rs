//! Exec enforcement: rule keys, the kernel-offset configuration, per-process state, and the exec
//! decision shared by the BPF LSM program and the `sched_process_exec` fallback.
//!
//! Exec rules name files by identity, not by path: userspace stats each rule path (following
//! symlinks) and stores `(device, inode)`; the kernel reads the identity of the file actually
//! executed. A symlink, hard link, bind mount or relative path to a denied binary is therefore
//! still denied, and a copy (new inode) falls to the policy default.
//!
//! Directory prefixes (`/opt/agent/**`) are matched by identity too: the kernel walks the
//! executed file's dentry ancestors (`d_parent`, at most [`MAX_DIR_DEPTH`] levels, within the
//! file's filesystem) and looks each ancestor directory up. A prefix therefore covers files at
//! most `MAX_DIR_DEPTH` directory levels below it (or below a filesystem root inside it). The
//! walk stops at a filesystem's root, so userspace also stores the identity of every mount
//! point below the prefix (from its own mount namespace, when the policy is written): a
//! filesystem mounted inside the prefix later is not covered until the policy is written
//! again. A single file bind-mounted into the prefix from elsewhere is judged by its own
//! identity and ancestors, not by where it is mounted.
//!
//! `#!` scripts (and binfmt_misc): the LSM hook runs once per level (the script, then its
//! interpreter), so each is decided. At `sched_process_exec` (the tracepoint fallback)
//! `linux_binprm.file` is the final interpreter, and `linux_binprm.executable` is set only for
//! binfmt_misc entries with the `O` flag; for a `#!` script the kernel has already dropped its
//! last reference to the script's `struct file` in `exec_binprm`. That `fput` is deferred to
//! the task's `task_works` list until the return to user space, so the file is still intact
//! at the tracepoint: the program walks `current->task_works` (bounded, [`MAX_TASK_WORKS`]),
//! takes the entries whose callback is `____fput` and whose file was opened for exec
//! (`__FMODE_EXEC` in `f_flags`); the oldest of them is the script the process exec'd
//! (nothing else is released before it in the exec path; the previous image's files are
//! released later, in `begin_new_exec`). The exec then runs only if both the script and the
//! interpreter are allowed, as on the LSM path, and the event names the script. Limits: an
//! intermediate interpreter of a nested script (a script whose interpreter is itself a
//! script) is not decided on the fallback; where the lookup is unavailable (a BTF member or
//! `____fput` missing, logged at start) scripts are decided by their interpreter only; where
//! it is available but finds nothing (a list longer than the bound), the script's own verdict
//! is the policy default and the event carries [`EXEC_F_NO_SCRIPT_IDENTITY`]. See
//! [`ScriptConfig`].

use crate::{
    ACTION_ALLOW, MODE_AUDIT, NONE, PolicyMeta, REASON_CONTAINMENT, REASON_DEFAULT,
    REASON_NO_POLICY, REASON_RULE, RuleValue, VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_DENY,
};

/// Ancestor directories the kernel looks at for prefix rules.
pub const MAX_DIR_DEPTH: u32 = 32;
/// Bytes of the executed path (as passed to execve, NUL-terminated) carried in an event.
pub const EXEC_PATH_BYTES: usize = 256;
/// Bytes of argv carried in an event: the start of the new image's argument area
/// (`mm->arg_start..arg_end`: each argument NUL-terminated), cut at this size.
pub const ARGV_BYTES: usize = 512;

/// `ExecEvent::hook`: which program decided.
pub const EXEC_HOOK_LSM: u8 = 1;
pub const EXEC_HOOK_TRACEPOINT: u8 = 2;

/// `ExecEvent::flags`.
/// argv was cut at `ARGV_BYTES` (the last argument may be partial).
pub const EXEC_F_ARGV_TRUNCATED: u8 = 1;
/// No argv was captured (LSM events: the new image's memory is not current yet).
pub const EXEC_F_NO_ARGV: u8 = 2;
/// The executed file's identity could not be read; only the default action applied.
pub const EXEC_F_NO_IDENTITY: u8 = 4;
/// The path was cut at `EXEC_PATH_BYTES - 1` bytes.
pub const EXEC_F_PATH_TRUNCATED: u8 = 8;

/// The exec ran a script (or binfmt_misc file) through an interpreter (tracepoint events):
/// `path` and, unless [`EXEC_F_BY_INTERPRETER`], the identity are the script's.
pub const EXEC_F_SCRIPT: u8 = 16;
/// The interpreter (the final image) decided: the script was allowed, the interpreter not;
/// the identity is the interpreter's.
pub const EXEC_F_BY_INTERPRETER: u8 = 32;
/// An interpreter ran, but the script's file could not be found: the script's own verdict
/// was the policy default.
pub const EXEC_F_NO_SCRIPT_IDENTITY: u8 = 64;

/// Entries of `current->task_works` the tracepoint looks at for a script's pending `fput`.
pub const MAX_TASK_WORKS: u32 = 32;
/// `__FMODE_EXEC` in `file.f_flags` (`include/linux/fs.h`, 0x20 on every architecture since
/// 2.6.39): the file was opened for exec (`do_open_execat`). (`f_mode` does not carry
/// `FMODE_EXEC` for these opens on current kernels; `f_flags` keeps the open flag.)
pub const OPEN_FLAG_EXEC: u32 = 0x20;
/// `ScriptConfig::valid` when the script lookup is available.
pub const SCRIPT_CONFIG_VALID: u32 = 1;

/// What the tracepoint fallback needs to find the script of a `#!` exec (see the module
/// docs): offsets from BTF and the address of `____fput` from `/proc/kallsyms`. Its own map
/// (`EXEC_SCRIPT`), so agents that pinned an older `ExecConfig` stay adoptable.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScriptConfig {
    /// [`SCRIPT_CONFIG_VALID`] when filled; otherwise scripts are decided by their
    /// interpreter only.
    pub valid: u32,
    /// `linux_binprm.interp` (equal to `filename` until a binfmt handler switches to an
    /// interpreter)
    pub bprm_interp: u32,
    /// `linux_binprm.executable` (binfmt_misc `O` entries)
    pub bprm_executable: u32,
    /// `task_struct.task_works`
    pub task_works: u32,
    /// `file.f_task_work`
    pub file_task_work: u32,
    /// `file.f_flags`
    pub file_flags: u32,
    /// `callback_head.next` / `callback_head.func`
    pub cb_next: u32,
    pub cb_func: u32,
    /// Kernel address of `____fput`, the deferred-fput task work.
    pub fput_fn: u64,
}
const _: () = assert!(core::mem::size_of::<ScriptConfig>() == 40);

/// `ExecConfig::valid` once userspace has filled the offsets from the kernel's BTF.
pub const EXEC_CONFIG_VALID: u32 = 1;

/// Kernel structure offsets (bytes) read from `/sys/kernel/btf/vmlinux` at load time, and the
/// syscall numbers of this architecture. aya's Rust programs have no CO-RE relocations, so
/// the kernel programs read fields with `bpf_probe_read_kernel` at these offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecConfig {
    /// [`EXEC_CONFIG_VALID`] when filled; otherwise no file identity is read (default action).
    pub valid: u32,
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `linux_binprm.filename`
    pub bprm_filename: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `file.f_path.dentry`
    pub file_dentry: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `dentry.d_parent`
    pub dentry_parent: u32,
    /// `dentry.d_inode`
    pub dentry_inode: u32,
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.mm`
    pub task_mm: u32,
    /// `mm_struct.arg_start` / `mm_struct.arg_end`
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ExecConfig>() == 64);

/// Key of `EXEC_FILES` (exact files) and `EXEC_DIRS` (prefix directories).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecKey {
    /// Generation-qualified policy key.
    pub policy: u32,
    /// Kernel device number (`MKDEV(major, minor)` = `major << 20 | minor`), as in `s_dev`.
    pub dev: u32,
    pub ino: u64,
}
const _: () = assert!(core::mem::size_of::<ExecKey>() == 16);

/// Kernel `dev_t` from major/minor (the kernel's internal encoding, not glibc's).
#[inline(always)]
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Per-process lineage, keyed by tgid in `EXEC_TASKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TaskInfo {
    /// Id of the image this process runs: the sequence number of its exec event (node-unique,
    /// increasing; a forked child shares its parent's until it execs).
    pub exec_id: u64,
    /// Exec id of the image that was running in this process (or its forking parent) when it
    /// exec'd; 0 if unknown.
    pub parent_exec_id: u64,
}
const _: () = assert!(core::mem::size_of::<TaskInfo>() == 16);

/// An exec decision: verdict, reason and the deciding rule (or `NONE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecVerdict {
    pub verdict: u8,
    pub reason: u8,
    pub rule: u32,
}

/// Folds a rule match into `acc`: the lowest rule index per action wins (as for connect).
#[inline(always)]
pub fn merge_rules(acc: &mut RuleValue, found: &RuleValue) {
    if found.allow_rule < acc.allow_rule {
        acc.allow_rule = found.allow_rule;
    }
    if found.deny_rule < acc.deny_rule {
        acc.deny_rule = found.deny_rule;
    }
}

/// The exec decision, shared by the LSM and tracepoint programs (and unit-tested here):
/// no policy (`meta` absent) denies; deny beats allow; no matching rule takes the default
/// action; audit mode turns a deny into audit-deny (the exec proceeds).
#[inline(always)]
pub fn exec_verdict(meta: Option<&PolicyMeta>, matched: &RuleValue) -> ExecVerdict {
    let Some(meta) = meta else {
        return ExecVerdict {
            verdict: VERDICT_DENY,
            reason: REASON_NO_POLICY,
            rule: NONE,
        };
    };
    let mut v = if matched.deny_rule != NONE {
        ExecVerdict {
            verdict: VERDICT_DENY,
            reason: REASON_RULE,
            rule: matched.deny_rule,
        }
    } else if matched.allow_rule != NONE {
        ExecVerdict {
            verdict: VERDICT_ALLOW,
            reason: REASON_RULE,
            rule: matched.allow_rule,
        }
    } else {
        ExecVerdict {
            verdict: if meta.default_action == ACTION_ALLOW {
                VERDICT_ALLOW
            } else {
                VERDICT_DENY
            },
            reason: REASON_DEFAULT,
            rule: NONE,
        }
    };
    if v.verdict == VERDICT_DENY && meta.mode == MODE_AUDIT {
        v.verdict = VERDICT_AUDIT_DENY;
    }
    v
}

/// The decision on executing a dynamic loader directly (`ld-linux-x86-64.so.2 PROGRAM` runs
/// PROGRAM, which the kernel never sees as exec'd): only a rule naming the loader's own file
/// (`exact`, the exact-file matches) allows it; prefix rules and the default action do not
/// (reason containment). Deny beats allow; audit mode makes a deny an audit-deny.
#[inline(always)]
pub fn loader_verdict(meta: Option<&PolicyMeta>, exact: &RuleValue) -> ExecVerdict {
    let Some(meta) = meta else {
        return exec_verdict(None, exact);
    };
    let mut v = if exact.deny_rule == NONE && exact.allow_rule != NONE {
        ExecVerdict {
            verdict: VERDICT_ALLOW,
            reason: REASON_RULE,
            rule: exact.allow_rule,
        }
    } else if exact.deny_rule != NONE {
        ExecVerdict {
            verdict: VERDICT_DENY,
            reason: REASON_RULE,
            rule: exact.deny_rule,
        }
    } else {
        ExecVerdict {
            verdict: VERDICT_DENY,
            reason: REASON_CONTAINMENT,
            rule: NONE,
        }
    };
    if v.verdict == VERDICT_DENY && meta.mode == MODE_AUDIT {
        v.verdict = VERDICT_AUDIT_DENY;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ACTION_DENY, MODE_ENFORCE};

    fn meta(default_action: u8, mode: u8) -> PolicyMeta {
        PolicyMeta {
            revision: 1,
            default_action,
            mode,
            flags: 0,
            skip: 0,
            _pad: [0; 4],
        }
    }

    const NOTHING: RuleValue = RuleValue {
        allow_rule: NONE,
        deny_rule: NONE,
    };

    #[test]
    fn no_policy_denies_even_with_matches() {
        let m = RuleValue {
            allow_rule: 0,
            deny_rule: NONE,
        };
        assert_eq!(
            exec_verdict(None, &m),
            ExecVerdict {
                verdict: VERDICT_DENY,
                reason: REASON_NO_POLICY,
                rule: NONE
            }
        );
    }

    #[test]
    fn deny_beats_allow_and_reports_the_deny_rule() {
        let mut acc = NOTHING;
        merge_rules(
            &mut acc,
            &RuleValue {
                allow_rule: 0,
                deny_rule: NONE,
            },
        );
        merge_rules(
            &mut acc,
            &RuleValue {
                allow_rule: 4,
                deny_rule: 3,
            },
        );
        let v = exec_verdict(Some(&meta(ACTION_ALLOW, MODE_ENFORCE)), &acc);
        assert_eq!(
            (v.verdict, v.reason, v.rule),
            (VERDICT_DENY, REASON_RULE, 3)
        );
    }

    #[test]
    fn allow_rule_then_default() {
        let allow = RuleValue {
            allow_rule: 2,
            deny_rule: NONE,
        };
        let v = exec_verdict(Some(&meta(ACTION_DENY, MODE_ENFORCE)), &allow);
        assert_eq!(
            (v.verdict, v.reason, v.rule),
            (VERDICT_ALLOW, REASON_RULE, 2)
        );
        let v = exec_verdict(Some(&meta(ACTION_DENY, MODE_ENFORCE)), &NOTHING);
        assert_eq!(
            (v.verdict, v.reason, v.rule),
            (VERDICT_DENY, REASON_DEFAULT, NONE)
        );
        let v = exec_verdict(Some(&meta(ACTION_ALLOW, MODE_ENFORCE)), &NOTHING);
        assert_eq!(
            (v.verdict, v.reason, v.rule),
            (VERDICT_ALLOW, REASON_DEFAULT, NONE)
        );
    }

    #[test]
    fn audit_mode_turns_deny_into_audit_deny_only() {
        let deny = RuleValue {
            allow_rule: NONE,
            deny_rule: 1,
        };
        let v = exec_verdict(Some(&meta(ACTION_ALLOW, MODE_AUDIT)), &deny);
        assert_eq!(
            (v.verdict, v.reason, v.rule),
            (VERDICT_AUDIT_DENY, REASON_RULE, 1)
        );
        let v = exec_verdict(Some(&meta(ACTION_DENY, MODE_AUDIT)), &NOTHING);
        assert_eq!(v.verdict, VERDICT_AUDIT_DENY);
        let allow = RuleValue {
            allow_rule: 0,
            deny_rule: NONE,
        };
        assert_eq!(
            exec_verdict(Some(&meta(ACTION_DENY, MODE_AUDIT)), &allow).verdict,
            VERDICT_ALLOW
        );
        // No policy is never softened by audit mode: there is no mode without a policy.
        assert_eq!(exec_verdict(None, &NOTHING).verdict, VERDICT_DENY);
    }

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(253, 1), (253 << 20) | 1);
        assert_eq!(kernel_dev(0, 0x1_2345), 0x1_2345);
    }

    #[test]
    fn a_loader_runs_only_under_a_rule_naming_it() {
        let allow_default = meta(ACTION_ALLOW, MODE_ENFORCE);
        let v = loader_verdict(Some(&allow_default), &NOTHING);
        assert_eq!(
            (v.verdict, v.reason, v.rule),
            (VERDICT_DENY, REASON_CONTAINMENT, NONE),
            "the default action does not allow a loader"
        );
        let named = RuleValue {
            allow_rule: 4,
            deny_rule: NONE,
        };
        let v = loader_verdict(Some(&allow_default), &named);
        assert_eq!((v.verdict, v.rule), (VERDICT_ALLOW, 4));
        let both = RuleValue {
            allow_rule: 4,
            deny_rule: 2,
        };
        assert_eq!(
            loader_verdict(Some(&allow_default), &both).verdict,
            VERDICT_DENY
        );
        let audit = meta(ACTION_ALLOW, MODE_AUDIT);
        assert_eq!(
            loader_verdict(Some(&audit), &NOTHING).verdict,
            VERDICT_AUDIT_DENY
        );
        assert_eq!(loader_verdict(None, &named).reason, REASON_NO_POLICY);
    }
}
