//! Exec enforcement from userspace: choosing the enforcement point (BPF LSM, else the
//! `sched_process_exec` tracepoint + SIGKILL), attaching the exec programs, and the typed
//! exec-rule maps (rules become `(device, inode)` entries by statting their paths).
//!
//! Semantics and limits are documented in `agent_common::exec`. In short: exact paths and
//! prefix directories are identified by `(device, inode)` when the policy is written (symlinks
//! followed); a path that does not exist then is skipped with a warning, and files created or
//! replaced later are not matched until the policy is written again (re-stat on change is
//! future work).

use std::{
    collections::HashMap as StdHashMap,
    fmt,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::{
    ExecConfig, ExecKey, NONE, RuleValue, TaskInfo, kernel_dev, maps as names, merge_rules,
};
use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{Lsm, RawTracePoint, links::FdLink},
};
use tracing::{info, warn};

use super::{
    btf::KernelBtf,
    maps::{MapError, op, take},
    pins::PinDir,
};
use crate::compiled::{Action, ExecRule};

/// The LSM program and the hook it attaches to.
pub const LSM_PROGRAM: &str = "exec_lsm";
pub const LSM_HOOK: &str = "bprm_check_security";

/// Raw tracepoint programs attached on every node: (program, tracepoint).
pub const TRACEPOINT_PROGRAMS: [(&str, &str); 3] = [
    ("exec_tp", "sched_process_exec"),
    ("exec_fork", "sched_process_fork"),
    ("exec_exit", "sched_process_exit"),
];

/// Where exec decisions are enforced on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// BPF LSM `bprm_check_security`: a denied exec fails with EPERM (kernel 5.7+ with BPF
    /// LSM and trampolines). The tracepoint stays attached for lineage and events.
    Lsm,
    /// `sched_process_exec` raw tracepoint: a denied image is killed with SIGKILL before it
    /// runs a user instruction (kernel 5.3+).
    Tracepoint,
}

impl ExecMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lsm => "lsm",
            Self::Tracepoint => "tracepoint",
        }
    }

    /// The selection rule: LSM where its program loaded and attached, else the tracepoint.
    pub fn select<E>(lsm_probe: &Result<(), E>) -> Self {
        match lsm_probe {
            Ok(()) => Self::Lsm,
            Err(_) => Self::Tracepoint,
        }
    }
}

impl fmt::Display for ExecMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("read kernel structure offsets for exec enforcement")]
    Btf(#[from] super::btf::BtfError),
    #[error("exec program {name} is missing from the kernel object")]
    MissingProgram { name: &'static str },
    #[error("load exec program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attach exec program {name} to raw tracepoint {tracepoint}")]
    Attach {
        name: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pin the link of {name}")]
    Pin {
        name: &'static str,
        #[source]
        source: super::pins::PinError,
    },
    #[error(transparent)]
    Maps(#[from] MapError),
}

/// The outcome of attaching the exec programs.
pub struct ExecAttach {
    pub mode: ExecMode,
    /// Why the LSM could not be used (`None` in LSM mode).
    pub lsm_error: Option<String>,
    /// Unpinned links (empty when pinned).
    pub links: Vec<FdLink>,
}

fn keep(
    name: &'static str,
    link: FdLink,
    pins: Option<&PinDir>,
    links: &mut Vec<FdLink>,
) -> Result<(), ExecError> {
    match pins {
        Some(p) => p
            .install_link(name, link)
            .map_err(|source| ExecError::Pin { name, source }),
        None => {
            links.push(link);
            Ok(())
        }
    }
}

/// Tries the LSM program; any failure (EPERM where trampolines are forbidden, no BTF func for
/// the hook, no BPF LSM) is the probe's answer, reported as a string.
fn try_lsm(ebpf: &mut Ebpf, pins: Option<&PinDir>, links: &mut Vec<FdLink>) -> Result<(), String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
    let prog: &mut Lsm = ebpf
        .program_mut(LSM_PROGRAM)
        .ok_or_else(|| format!("{LSM_PROGRAM} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{LSM_PROGRAM}: {e}"))?;
    prog.load(LSM_HOOK, &btf)
        .map_err(|e| format!("load {LSM_PROGRAM}: {}", error_chain(&e)))?;
    let id = prog
        .attach()
        .map_err(|e| format!("attach {LSM_PROGRAM}: {}", error_chain(&e)))?;
    let link = prog
        .take_link(id)
        .map_err(|e| format!("take link of {LSM_PROGRAM}: {e}"))?;
    keep(LSM_PROGRAM, link.into(), pins, links).map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Writes the kernel offsets, probes the LSM, and attaches the tracepoint programs.
pub fn attach(
    ebpf: &mut Ebpf,
    maps: &mut ExecMaps,
    pins: Option<&PinDir>,
) -> Result<ExecAttach, ExecError> {
    let cfg = KernelBtf::from_sys_fs()?.exec_config()?;
    maps.set_config(cfg)?;
    let mut links = Vec::new();
    let probe = try_lsm(ebpf, pins, &mut links);
    let mode = ExecMode::select(&probe);
    let lsm_error = probe.err();
    if let Some(e) = &lsm_error {
        info!(error = %e, "BPF LSM unavailable; exec is enforced at sched_process_exec with SIGKILL");
    }
    for (name, tracepoint) in TRACEPOINT_PROGRAMS {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or(ExecError::MissingProgram { name })?
            .try_into()
            .map_err(|source| ExecError::Program { name, source })?;
        prog.load()
            .map_err(|source| ExecError::Program { name, source })?;
        let id = prog
            .attach(tracepoint)
            .map_err(|source| ExecError::Attach {
                name,
                tracepoint,
                source,
            })?;
        let link = prog
            .take_link(id)
            .map_err(|source| ExecError::Program { name, source })?;
        keep(name, link.into(), pins, &mut links)?;
    }
    info!(mode = %mode, "exec enforcement attached");
    Ok(ExecAttach {
        mode,
        lsm_error,
        links,
    })
}

/// Map entries of one policy's exec rules, resolved to file identities.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecEntries {
    /// (kernel dev, inode) of exact files.
    pub files: StdHashMap<(u32, u64), RuleValue>,
    /// (kernel dev, inode) of prefix directories.
    pub dirs: StdHashMap<(u32, u64), RuleValue>,
    /// Paths that could not be used, with the reason (missing, not a directory, ...).
    pub skipped: Vec<(PathBuf, String)>,
}

/// `(kernel dev, inode)` of `path`, following symlinks.
pub fn identity(path: &Path) -> std::io::Result<(u32, u64, bool)> {
    let md = std::fs::metadata(path)?;
    let dev = md.dev();
    // glibc's dev_t encoding → the kernel's MKDEV(major, minor).
    let major = (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32;
    let minor = (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32;
    Ok((kernel_dev(major, minor), md.ino(), md.is_dir()))
}

fn add(map: &mut StdHashMap<(u32, u64), RuleValue>, key: (u32, u64), rule: &ExecRule) {
    let e = map.entry(key).or_insert(RuleValue {
        allow_rule: NONE,
        deny_rule: NONE,
    });
    let found = match rule.action {
        Action::Allow => RuleValue {
            allow_rule: rule.index,
            deny_rule: NONE,
        },
        Action::Deny => RuleValue {
            allow_rule: NONE,
            deny_rule: rule.index,
        },
    };
    merge_rules(e, &found);
}

/// Resolves exec rules to file identities. Exact paths must not be directories; prefixes
/// (with or without a trailing `/`) must be directories.
pub fn resolve(rules: &[ExecRule]) -> ExecEntries {
    let mut out = ExecEntries::default();
    for rule in rules {
        for p in &rule.exact {
            let path = PathBuf::from(p);
            match identity(&path) {
                Ok((_, _, true)) => out
                    .skipped
                    .push((path, "is a directory (use a prefix rule)".into())),
                Ok((dev, ino, false)) => add(&mut out.files, (dev, ino), rule),
                Err(e) => out.skipped.push((path, e.to_string())),
            }
        }
        for p in &rule.prefixes {
            let path = PathBuf::from(p);
            match identity(&path) {
                Ok((dev, ino, true)) => {
                    add(&mut out.dirs, (dev, ino), rule);
                    // The kernel's ancestor walk stops at a filesystem's root: a filesystem
                    // mounted below the prefix is covered through its mount point's identity.
                    for m in mounts_below(&path) {
                        if let Ok((dev, ino, true)) = identity(&m) {
                            add(&mut out.dirs, (dev, ino), rule);
                        }
                    }
                }
                Ok((_, _, false)) => out.skipped.push((path, "is not a directory".into())),
                Err(e) => out.skipped.push((path, e.to_string())),
            }
        }
    }
    out
}

/// Mount points strictly below `dir` (symlinks in `dir` resolved), from
/// `/proc/self/mountinfo`: the agent's mount namespace.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(base) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(crate::paths::unescape_mountinfo(m)))
        .filter(|m| m != &base && m.starts_with(&base))
        .collect()
}

/// The exec maps, typed.
pub struct ExecMaps {
    cfg: Array<MapData, ExecConfig>,
    files: HashMap<MapData, ExecKey, RuleValue>,
    dirs: HashMap<MapData, ExecKey, RuleValue>,
    tasks: HashMap<MapData, u32, TaskInfo>,
}

impl ExecMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            cfg: take(ebpf, names::EXEC_CFG)?,
            files: take(ebpf, names::EXEC_FILES)?,
            dirs: take(ebpf, names::EXEC_DIRS)?,
            tasks: take(ebpf, names::EXEC_TASKS)?,
        })
    }

    pub fn set_config(&mut self, cfg: ExecConfig) -> Result<(), MapError> {
        self.cfg
            .set(0, cfg, 0)
            .map_err(op("write", names::EXEC_CFG))
    }

    pub fn config(&self) -> Result<ExecConfig, MapError> {
        self.cfg.get(&0, 0).map_err(op("read", names::EXEC_CFG))
    }

    /// Exec ids of process `tgid`, if it is tracked.
    pub fn task(&self, tgid: u32) -> Option<TaskInfo> {
        self.tasks.get(&tgid, 0).ok()
    }

    /// Writes the exec rules of policy slot `policy` (generation-qualified key). Paths that
    /// cannot be statted are skipped with a warning (see the module docs).
    pub fn write(&mut self, policy: u32, rules: &[ExecRule]) -> Result<(), MapError> {
        let entries = resolve(rules);
        for (path, why) in &entries.skipped {
            warn!(path = %path.display(), reason = %why, "exec rule path skipped");
        }
        for ((dev, ino), v) in entries.files {
            self.files
                .insert(ExecKey { policy, dev, ino }, v, 0)
                .map_err(op("insert", names::EXEC_FILES))?;
        }
        for ((dev, ino), v) in entries.dirs {
            self.dirs
                .insert(ExecKey { policy, dev, ino }, v, 0)
                .map_err(op("insert", names::EXEC_DIRS))?;
        }
        Ok(())
    }

    /// Deletes every exec entry of generation `generation`.
    pub fn clear_generation(&mut self, generation: u32) {
        for map in [&mut self.files, &mut self.dirs] {
            let keys: Vec<ExecKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.policy >> 31 == generation)
                .collect();
            for k in keys {
                let _ = map.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(index: u32, action: Action, exact: &[&Path], prefixes: &[&Path]) -> ExecRule {
        let s = |p: &&Path| p.to_string_lossy().into_owned();
        ExecRule {
            index,
            action,
            exact: exact.iter().map(s).collect(),
            prefixes: prefixes.iter().map(s).collect(),
        }
    }

    #[test]
    fn select_prefers_lsm_and_falls_back() {
        assert_eq!(ExecMode::select::<String>(&Ok(())), ExecMode::Lsm);
        assert_eq!(
            ExecMode::select(&Err("EPERM".to_owned())),
            ExecMode::Tracepoint
        );
    }

    #[test]
    fn resolve_follows_symlinks_and_merges_deny_over_allow() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("corral-exec-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub"))?;
        let bin = dir.join("bin");
        std::fs::write(&bin, b"x")?;
        let link = dir.join("link");
        std::os::unix::fs::symlink(&bin, &link)?;
        let missing = dir.join("missing");
        let rules = [
            rule(0, Action::Allow, &[&bin], &[&dir.join("sub")]),
            rule(1, Action::Deny, &[&link, &missing], &[&bin]),
        ];
        let e = resolve(&rules);
        let (dev, ino, _) = identity(&bin)?;
        // The symlink resolves to the same file: one entry holding both rules.
        assert_eq!(e.files.len(), 1);
        assert_eq!(
            e.files.get(&(dev, ino)),
            Some(&RuleValue {
                allow_rule: 0,
                deny_rule: 1
            })
        );
        let (sdev, sino, _) = identity(&dir.join("sub"))?;
        assert_eq!(e.dirs.len(), 1);
        assert!(e.dirs.contains_key(&(sdev, sino)));
        let skipped: Vec<&PathBuf> = e.skipped.iter().map(|(p, _)| p).collect();
        assert_eq!(skipped, vec![&missing, &bin]);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn kernel_dev_matches_proc_self_mountinfo_root() -> std::io::Result<()> {
        // /proc/self/mountinfo gives "major:minor" as the kernel encodes s_dev.
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let (dev, _, _) = identity(Path::new("/"))?;
        let mm = info
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&"/"))
            .and_then(|f| f.get(2).map(|s| (*s).to_owned()))
            .expect("mountinfo has the root mount");
        let (ma, mi) = mm.split_once(':').expect("major:minor");
        let (ma, mi) = (
            ma.parse::<u32>().expect("major"),
            mi.parse::<u32>().expect("minor"),
        );
        assert_eq!(dev, kernel_dev(ma, mi));
        Ok(())
    }
}
