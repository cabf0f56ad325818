//! Exec decisions, argv capture and fork/exit lineage.
//!
//! Two enforcement points share one decision (`decide`, built on
//! `agent_common::exec_verdict`):
//! - `exec_lsm`: BPF LSM `bprm_check_security` (kernel 5.7+, `CONFIG_BPF_LSM`, `bpf` in the
//!   active LSMs, BPF trampolines allowed). Denies with -EPERM before the image is loaded; it
//!   sees every level of a `#!` script (the script, then its interpreter).
//! - `exec_tp`: raw tracepoint `sched_process_exec` (kernel 5.3+: `bpf_send_signal`, bounded
//!   loops), always attached. It runs after the point of no return, so a deny sends SIGKILL to
//!   the new image, which dies before executing a user instruction. For a `#!` script it
//!   decides on the script (found among the task's pending deferred `fput`s, see
//!   `agent_common::exec`) and on its interpreter (the final image): both must be allowed.
//!   It also assigns exec ids and emits the event for every exec that
//!   happened (on LSM nodes it is a second line of defence: same decision; an exec that
//!   proceeds although not allowed, i.e. audit-deny, is then recorded by both programs, the
//!   LSM's event with exec id 0).
//!
//! File identity is `(s_dev, i_ino)` of `linux_binprm->file->f_inode`, read with
//! `bpf_probe_read_kernel` at offsets userspace took from the kernel's BTF (`ExecConfig`).
//! argv is read at `sched_process_exec` from the new image's argument area
//! (`mm->arg_start..arg_end`, at most `ARGV_BYTES`), so no syscall-entry hook slows every
//! syscall on the node; fork/exit keep the per-process exec ids.

use core::{ffi::c_void, ptr::addr_of_mut};

use agent_common::{
    ARGV_BYTES, EXEC_CONFIG_VALID, EXEC_F_ARGV_TRUNCATED, EXEC_F_BY_INTERPRETER, EXEC_F_NO_ARGV,
    EXEC_F_NO_IDENTITY, EXEC_F_NO_SCRIPT_IDENTITY, EXEC_F_PATH_TRUNCATED, EXEC_F_SCRIPT,
    EXEC_HOOK_LSM, EXEC_HOOK_TRACEPOINT, EXEC_PATH_BYTES, EventHeader, ExecConfig, ExecEvent,
    ExecKey, ExecVerdict, KIND_EXEC, MAX_DIR_DEPTH, MAX_TASK_WORKS, NONE, OPEN_FLAG_EXEC,
    PolicyMeta, RuleValue, SCRIPT_CONFIG_VALID, ScriptConfig, TaskInfo, VERDICT_ALLOW,
    VERDICT_DENY, exec_verdict, loader_verdict, merge_rules, policy_key,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_probe_read_kernel_str, bpf_probe_read_user, bpf_send_signal},
    },
    macros::{lsm, raw_tracepoint},
    programs::{LsmContext, RawTracePointContext},
};

use crate::{
    events,
    maps::{EVENTS, EXEC_CFG, EXEC_DIRS, EXEC_FILES, EXEC_SCRIPT, EXEC_TASKS, LOADERS, POLICIES},
    principal::{self, Caller},
};

const SIGKILL: u32 = 9;
const EPERM: i32 = 1;

const NO_MATCH: RuleValue = RuleValue {
    allow_rule: NONE,
    deny_rule: NONE,
};

/// BPF LSM: deny before the image is loaded.
#[lsm(hook = "bprm_check_security")]
pub fn exec_lsm(ctx: LsmContext) -> i32 {
    match try_exec_lsm(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

/// Fallback (and lineage/event point on every node): after the point of no return.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn exec_tp(ctx: RawTracePointContext) -> i32 {
    match try_exec_tp(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

/// A forked child process shares its parent's exec ids until it execs.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn exec_fork(ctx: RawTracePointContext) -> i32 {
    match try_exec_fork(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

/// Forget an exiting process's exec ids.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn exec_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == tgid {
        let _ = EXEC_TASKS.remove(tgid);
    }
    0
}

#[inline(always)]
fn exec_config() -> ExecConfig {
    EXEC_CFG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn script_config() -> ScriptConfig {
    EXEC_SCRIPT.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn read_u64(base: u64, off: u32) -> Option<u64> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address (a fault returns an error).
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64) }.ok()
}

#[inline(always)]
fn read_u32(base: u64, off: u32) -> Option<u32> {
    if base == 0 {
        return None;
    }
    // SAFETY: as in `read_u64`.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u32) }.ok()
}

/// The executed file: identity and dentry (for the prefix walk).
struct FileId {
    dev: u32,
    ino: u64,
    dentry: u64,
}

#[inline(always)]
fn file_identity(ec: &ExecConfig, bprm: u64) -> Option<FileId> {
    if ec.valid != EXEC_CONFIG_VALID {
        return None;
    }
    file_id(ec, read_u64(bprm, ec.bprm_file)?)
}

/// Identity of the `struct file` at `file`.
#[inline(always)]
fn file_id(ec: &ExecConfig, file: u64) -> Option<FileId> {
    let inode = read_u64(file, ec.file_inode)?;
    let ino = read_u64(inode, ec.inode_ino)?;
    let sb = read_u64(inode, ec.inode_sb)?;
    let dev = read_u32(sb, ec.sb_dev)?;
    let dentry = read_u64(file, ec.file_dentry).unwrap_or(0);
    Some(FileId { dev, ino, dentry })
}

/// The exact-file rules naming this file.
#[inline(always)]
fn exact_rules(policy: u32, id: &FileId) -> RuleValue {
    let mut acc = NO_MATCH;
    if let Some(v) = EXEC_FILES.get_ptr(ExecKey {
        policy,
        dev: id.dev,
        ino: id.ino,
    }) {
        // SAFETY: map value pointer, valid for this run.
        merge_rules(&mut acc, unsafe { &*v });
    }
    acc
}

/// Whether the file is one of the node's dynamic loaders (`LOADERS`, kept by the agent).
#[inline(always)]
fn is_loader(id: &FileId) -> bool {
    LOADERS
        .get_ptr(ExecKey {
            policy: 0,
            dev: id.dev,
            ino: id.ino,
        })
        .is_some()
}

/// Exact file rules, then prefix rules by the identity of each ancestor directory (bounded
/// walk up `d_parent` to the filesystem root). All matches are merged: deny beats allow.
#[inline(always)]
fn match_rules(policy: u32, ec: &ExecConfig, id: &FileId) -> RuleValue {
    let mut acc = exact_rules(policy, id);
    let mut d = id.dentry;
    for _ in 0..MAX_DIR_DEPTH {
        let Some(parent) = read_u64(d, ec.dentry_parent) else {
            break;
        };
        // The root of a filesystem is its own parent.
        if parent == 0 || parent == d {
            break;
        }
        let Some(ino) = read_u64(parent, ec.dentry_inode).and_then(|i| read_u64(i, ec.inode_ino))
        else {
            break;
        };
        if let Some(v) = EXEC_DIRS.get_ptr(ExecKey {
            policy,
            dev: id.dev,
            ino,
        }) {
            // SAFETY: map value pointer, valid for this run.
            merge_rules(&mut acc, unsafe { &*v });
        }
        d = parent;
    }
    acc
}

/// The file the process exec'd, when an interpreter runs it instead.
enum Script {
    /// No interpreter: the final image is the file that was exec'd.
    Direct,
    Found(FileId),
    /// An interpreter runs, but the exec'd file could not be found.
    Unknown,
}

/// Finds the exec'd file of a `#!` script (or binfmt_misc) exec at `sched_process_exec`
/// (`task` is current). See `agent_common::exec` for why the oldest pending `____fput` of a
/// file opened for exec is the script.
#[inline(always)]
fn script_file(ec: &ExecConfig, sc: &ScriptConfig, bprm: u64, task: u64) -> Script {
    if ec.valid != EXEC_CONFIG_VALID || sc.valid != SCRIPT_CONFIG_VALID {
        return Script::Direct;
    }
    // `interp` starts as `filename` and is replaced only when a handler switches to an
    // interpreter (`bprm_change_interp`).
    let (Some(interp), Some(filename)) = (
        read_u64(bprm, sc.bprm_interp),
        read_u64(bprm, ec.bprm_filename),
    ) else {
        return Script::Unknown;
    };
    if interp == filename {
        return Script::Direct;
    }
    // binfmt_misc with the `O` flag keeps the original file.
    if let Some(exe) = read_u64(bprm, sc.bprm_executable)
        && exe != 0
    {
        return match file_id(ec, exe) {
            Some(id) => Script::Found(id),
            None => Script::Unknown,
        };
    }
    let mut cb = read_u64(task, sc.task_works).unwrap_or(0);
    let mut oldest = 0u64;
    for _ in 0..MAX_TASK_WORKS {
        if cb == 0 {
            break;
        }
        if read_u64(cb, sc.cb_func) == Some(sc.fput_fn) {
            let file = cb.wrapping_sub(u64::from(sc.file_task_work));
            if read_u32(file, sc.file_flags).is_some_and(|f| f & OPEN_FLAG_EXEC != 0) {
                oldest = file;
            }
        }
        cb = read_u64(cb, sc.cb_next).unwrap_or(0);
    }
    // A longer list: the oldest entry was not seen.
    if cb != 0 || oldest == 0 {
        return Script::Unknown;
    }
    match file_id(ec, oldest) {
        Some(id) => Script::Found(id),
        None => Script::Unknown,
    }
}

struct Decision {
    caller: Caller,
    policy: u32,
    verdict: ExecVerdict,
    dev: u32,
    ino: u64,
    flags: u8,
}

/// The verdict on one file (`None`: its identity is unknown, only the default applies).
#[inline(always)]
fn file_verdict(
    policy: u32,
    meta: Option<&PolicyMeta>,
    ec: &ExecConfig,
    id: Option<&FileId>,
) -> ExecVerdict {
    let matched = match (meta, id) {
        // A loader run directly runs whatever program it is given: only a rule naming the
        // loader itself lets it.
        (Some(_), Some(id)) if is_loader(id) => {
            return loader_verdict(meta, &exact_rules(policy, id));
        }
        (Some(_), Some(id)) => match_rules(policy, ec, id),
        _ => NO_MATCH,
    };
    exec_verdict(meta, &matched)
}

/// `None`: the caller is not enrolled (not policed, no event). `script`: on the tracepoint,
/// the task (current) whose pending `fput`s may hold the exec'd script; `None` on the LSM,
/// which sees every level of a script exec by itself.
#[inline(always)]
fn decide(bprm: u64, ec: &ExecConfig, script: Option<u64>) -> Option<Decision> {
    let cfg = principal::config();
    let caller = principal::resolve(&cfg)?;
    let slot = caller.policy_slot(&cfg);
    let mut policy = NONE;
    let mut meta: Option<PolicyMeta> = None;
    if slot != NONE {
        policy = policy_key(cfg.generation & 1, slot);
        // SAFETY: map value pointer, valid for this run.
        meta = POLICIES.get_ptr(policy).map(|p| unsafe { *p });
    }
    let id = file_identity(ec, bprm);
    let (mut dev, mut ino, mut flags) = match &id {
        Some(id) => (id.dev, id.ino, 0),
        None => (0, 0, EXEC_F_NO_IDENTITY),
    };
    let mut verdict = file_verdict(policy, meta.as_ref(), ec, id.as_ref());
    let found = match script {
        Some(task) => script_file(ec, &script_config(), bprm, task),
        None => Script::Direct,
    };
    let script_id = match found {
        Script::Direct => None,
        Script::Found(sid) => {
            flags = EXEC_F_SCRIPT;
            Some(sid)
        }
        Script::Unknown => {
            flags |= EXEC_F_SCRIPT | EXEC_F_NO_SCRIPT_IDENTITY;
            None
        }
    };
    if flags & EXEC_F_SCRIPT != 0 {
        // Both must be allowed. The script decides when it is not allowed, or when both are
        // (the event then names the script); otherwise the interpreter's verdict stands.
        let sv = file_verdict(policy, meta.as_ref(), ec, script_id.as_ref());
        if sv.verdict != VERDICT_ALLOW || verdict.verdict == VERDICT_ALLOW {
            verdict = sv;
            match &script_id {
                Some(sid) => {
                    dev = sid.dev;
                    ino = sid.ino;
                }
                None => {
                    dev = 0;
                    ino = 0;
                    flags |= EXEC_F_NO_IDENTITY;
                }
            }
        } else {
            flags |= EXEC_F_BY_INTERPRETER;
        }
    }
    Some(Decision {
        caller,
        policy,
        verdict,
        dev,
        ino,
        flags,
    })
}

#[inline(always)]
fn current_exec_id(tgid: u32) -> u64 {
    match EXEC_TASKS.get_ptr(tgid) {
        // SAFETY: map value pointer, valid for this run.
        Some(t) => unsafe { (*t).exec_id },
        None => 0,
    }
}

fn try_exec_lsm(ctx: &LsmContext) -> Result<i32, i32> {
    // bprm_check_security(struct linux_binprm *bprm); the previous LSM's return value follows.
    let prev: i64 = ctx.arg(1);
    if prev != 0 {
        return Ok(prev as i32);
    }
    let bprm: u64 = ctx.arg(0);
    let ec = exec_config();
    let Some(d) = decide(bprm, &ec, None) else {
        return Ok(0);
    };
    if d.verdict.verdict == VERDICT_ALLOW {
        // The tracepoint records the exec once it has happened.
        return Ok(0);
    }
    let parent = current_exec_id((bpf_get_current_pid_tgid() >> 32) as u32);
    let deny = d.verdict.verdict == VERDICT_DENY;
    // No argv: the new image's memory is not the current one yet.
    emit(header(&d), &d, EXEC_HOOK_LSM, 0, parent, bprm, &ec, 0);
    Ok(if deny { -EPERM } else { 0 })
}

fn try_exec_tp(ctx: &RawTracePointContext) -> Result<i32, i32> {
    // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm);
    // `p` is current, already running the new image's mm.
    let task: u64 = ctx.arg(0);
    let bprm: u64 = ctx.arg(2);
    let ec = exec_config();
    let Some(d) = decide(bprm, &ec, Some(task)) else {
        return Ok(0);
    };
    if d.verdict.verdict == VERDICT_DENY {
        // Past the point of no return: the signal is delivered before the new image runs
        // a single user instruction.
        // SAFETY: helper with a plain integer argument; targets the current process.
        unsafe { bpf_send_signal(SIGKILL) };
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let parent = current_exec_id(tgid);
    let header = header(&d);
    // The exec id is the per-node sequence number of the exec's event: unique, increasing,
    // and it names the event that recorded the exec.
    let exec_id = header.seq;
    let _ = EXEC_TASKS.insert(
        tgid,
        TaskInfo {
            exec_id,
            parent_exec_id: parent,
        },
        0,
    );
    emit(
        header,
        &d,
        EXEC_HOOK_TRACEPOINT,
        exec_id,
        parent,
        bprm,
        &ec,
        task,
    );
    Ok(0)
}

/// The event header of decision `d` (takes the next sequence number).
#[inline(always)]
fn header(d: &Decision) -> EventHeader {
    let mut header = events::header(KIND_EXEC, d.caller.cgroup_id, d.caller.principal.index);
    header.verdict = d.verdict.verdict;
    header.reason = d.verdict.reason;
    header.policy = d.policy;
    header.rule = d.verdict.rule;
    header
}

/// Writes the exec event in place in the ring buffer (it is larger than the BPF stack), or
/// counts it as dropped. argv is read from `task`'s (new) argument area; `task` 0: none.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per hook, all plain values"
)]
#[inline(always)]
fn emit(
    header: EventHeader,
    d: &Decision,
    hook: u8,
    exec_id: u64,
    parent_exec_id: u64,
    bprm: u64,
    ec: &ExecConfig,
    task: u64,
) {
    let valid = ec.valid == EXEC_CONFIG_VALID;
    let filename = if valid {
        read_u64(bprm, ec.bprm_filename).unwrap_or(0)
    } else {
        0
    };
    let (arg_start, arg_end) = match read_u64(task, ec.task_mm) {
        Some(mm) if valid => (
            read_u64(mm, ec.mm_arg_start).unwrap_or(0),
            read_u64(mm, ec.mm_arg_end).unwrap_or(0),
        ),
        _ => (0, 0),
    };
    let arg_len = if arg_start == 0 {
        0
    } else {
        arg_end.saturating_sub(arg_start)
    };
    let wake_flags = events::submit_flags(header.verdict);
    match EVENTS.reserve::<ExecEvent>(0) {
        Some(mut entry) => {
            let e = entry.as_mut_ptr();
            let mut flags = d.flags;
            // SAFETY: `e` points to a reserved ring buffer record of size_of::<ExecEvent>();
            // every field is written through raw pointers before submit; the helpers write at
            // most the stated sizes, which are the sizes of the destination arrays.
            unsafe {
                (*e).header = header;
                (*e).exec_id = exec_id;
                (*e).parent_exec_id = parent_exec_id;
                (*e).ino = d.ino;
                (*e).dev = d.dev;
                (*e).hook = hook;
                (*e)._pad = [0; 4];
                let n = if filename == 0 {
                    -1
                } else {
                    bpf_probe_read_kernel_str(
                        addr_of_mut!((*e).path).cast::<c_void>(),
                        EXEC_PATH_BYTES as u32,
                        filename as *const c_void,
                    )
                };
                if n > 0 {
                    (*e).path_len = (n - 1) as u16;
                    if n as usize >= EXEC_PATH_BYTES {
                        flags |= EXEC_F_PATH_TRUNCATED;
                    }
                } else {
                    (*e).path_len = 0;
                }
                let n: u32 = if arg_len > ARGV_BYTES as u64 {
                    flags |= EXEC_F_ARGV_TRUNCATED;
                    ARGV_BYTES as u32
                } else {
                    arg_len as u32
                };
                (*e).argv_len = 0;
                (*e)._pad2 = 0;
                if n > 0 && n <= ARGV_BYTES as u32 {
                    if bpf_probe_read_user(
                        addr_of_mut!((*e).argv).cast::<c_void>(),
                        n,
                        arg_start as *const c_void,
                    ) == 0
                    {
                        (*e).argv_len = n as u16;
                    } else {
                        flags |= EXEC_F_NO_ARGV;
                    }
                } else {
                    flags |= EXEC_F_NO_ARGV;
                }
                (*e).flags = flags;
            }
            entry.submit(wake_flags);
        }
        None => events::count_drop(),
    }
}

fn try_exec_fork(ctx: &RawTracePointContext) -> Result<i32, i32> {
    // sched_process_fork(struct task_struct *parent, struct task_struct *child), in the
    // parent's context. Only processes already tracked (enrolled lineage) are followed.
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(info) = EXEC_TASKS.get_ptr(parent_tgid) else {
        return Ok(0);
    };
    // SAFETY: map value pointer, valid for this run.
    let info = unsafe { *info };
    let ec = exec_config();
    if ec.valid != EXEC_CONFIG_VALID {
        return Ok(0);
    }
    let child: u64 = ctx.arg(1);
    let (Some(pid), Some(tgid)) = (read_u32(child, ec.task_pid), read_u32(child, ec.task_tgid))
    else {
        return Ok(0);
    };
    // A new thread is not a new process.
    if pid == tgid {
        let _ = EXEC_TASKS.insert(pid, info, 0);
    }
    Ok(0)
}
