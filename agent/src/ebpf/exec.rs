//! Exec enforcement from userspace: choosing the enforcement point (BPF LSM, else the
//! `sched_process_exec` tracepoint + SIGKILL), attaching the exec programs, and the typed
//! exec-rule maps (rules become `(device, inode)` entries by statting their paths, see
//! [`super::exec_rules`]).
//!
//! Semantics and limits are documented in `agent_common::exec`. In short: exact paths and
//! prefix directories are identified by `(device, inode)` when the policy is written (symlinks
//! followed); a path that does not exist then is skipped with a warning. [`ExecMaps`] keeps
//! the rules it wrote, and the daemon re-stats them every
//! [`RESTAT_INTERVAL`](super::exec_rules::RESTAT_INTERVAL) ([`ExecMaps::watched`],
//! [`ExecMaps::refresh`]), so a file replaced or created later is matched by its new identity
//! within about a second.

use std::{collections::HashMap as StdHashMap, fmt, sync::Arc};

use agent_common::{
    ExecConfig, ExecKey, RuleValue, SCRIPT_CONFIG_VALID, ScriptConfig, TaskInfo, maps as names,
};
use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{Lsm, RawTracePoint, links::FdLink},
};
use tracing::{info, warn};

use super::exec_rules::{EntriesDiff, Sticky};
pub use super::exec_rules::{ExecEntries, identity, resolve, resolve_in};
pub use super::exec_view::{View, ViewKey};
use super::{
    btf::{FPUT_TASK_WORK, KernelBtf, kernel_symbol},
    map_access::{MapError, op, take},
    pins::PinDir,
};
use corral_policy::compiled::ExecRule;
use corral_runtime::error_chain;

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
    /// Why the tracepoint cannot find a `#!` script's own file (`None`: it can), in which
    /// case scripts are decided by their interpreter only on the tracepoint path.
    pub script_error: Option<String>,
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

/// Writes the kernel offsets, probes the LSM, and attaches the tracepoint programs.
pub fn attach(
    ebpf: &mut Ebpf,
    btf: &KernelBtf,
    maps: &mut ExecMaps,
    pins: Option<&PinDir>,
) -> Result<ExecAttach, ExecError> {
    let cfg = btf.exec_config()?;
    maps.set_config(cfg)?;
    let script = kernel_symbol(FPUT_TASK_WORK).and_then(|f| btf.script_config(f));
    let script_error = match script {
        Ok(sc) => {
            maps.set_script_config(sc)?;
            None
        }
        Err(e) => {
            maps.set_script_config(ScriptConfig::default())?;
            Some(error_chain(&e))
        }
    };
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
    match (&script_error, mode) {
        (Some(e), ExecMode::Tracepoint) => warn!(
            error = %e,
            "exec of a #! script is decided by its interpreter only: the script's own file \
             cannot be found at sched_process_exec"
        ),
        (Some(e), ExecMode::Lsm) => {
            info!(error = %e, "tracepoint script lookup unavailable (the LSM decides scripts)")
        }
        (None, _) => {}
    }
    info!(
        mode = %mode,
        scripts = if script_error.is_none() { "script and interpreter" } else { "interpreter only" },
        "exec enforcement attached"
    );
    Ok(ExecAttach {
        mode,
        lsm_error,
        script_error,
        links,
    })
}

/// What [`ExecMaps::write`] installed for one policy key: its rules (shared with the
/// re-stat task) and the identities they resolved to.
struct Installed {
    rules: Arc<[ExecRule]>,
    /// What the maps hold for it.
    entries: ExecEntries,
    /// Its denied identities, followed when they leave their paths.
    sticky: Sticky,
    /// The views its rules were last resolved in (the agent's, and its containers').
    views: Vec<View>,
}

/// The exec maps, typed.
pub struct ExecMaps {
    cfg: Array<MapData, ExecConfig>,
    script: Array<MapData, ScriptConfig>,
    files: HashMap<MapData, ExecKey, RuleValue>,
    dirs: HashMap<MapData, ExecKey, RuleValue>,
    tasks: HashMap<MapData, u32, TaskInfo>,
    loaders: HashMap<MapData, ExecKey, u32>,
    /// By generation-qualified policy key: the rules in the maps, for the re-stat.
    installed: StdHashMap<u32, Installed>,
    /// Container views by the identity of the principal they belong to (see
    /// [`Self::set_containers`]), and how many times they were set.
    containers: Vec<(String, View)>,
    containers_version: u64,
}

impl ExecMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        Ok(Self {
            cfg: take(ebpf, names::EXEC_CFG)?,
            script: take(ebpf, names::EXEC_SCRIPT)?,
            files: take(ebpf, names::EXEC_FILES)?,
            dirs: take(ebpf, names::EXEC_DIRS)?,
            tasks: take(ebpf, names::EXEC_TASKS)?,
            loaders: take(ebpf, names::LOADERS)?,
            installed: StdHashMap::new(),
            containers: Vec::new(),
            containers_version: 0,
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

    pub fn set_script_config(&mut self, cfg: ScriptConfig) -> Result<(), MapError> {
        self.script
            .set(0, cfg, 0)
            .map_err(op("write", names::EXEC_SCRIPT))
    }

    /// Whether the tracepoint decides a `#!` script on the script's own file too (else on its
    /// interpreter only); for `status`.
    pub fn script_lookup(&self) -> bool {
        self.script
            .get(&0, 0)
            .is_ok_and(|c| c.valid == SCRIPT_CONFIG_VALID)
    }

    /// Makes `LOADERS` hold exactly the identities `ids` (the node's dynamic loaders, see
    /// `loaders`); returns how many changed.
    pub fn set_loaders(
        &mut self,
        ids: &std::collections::BTreeSet<(u32, u64)>,
    ) -> Result<usize, MapError> {
        let key = |(dev, ino): (u32, u64)| ExecKey {
            policy: 0,
            dev,
            ino,
        };
        let have: std::collections::BTreeSet<(u32, u64)> = self
            .loaders
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.dev, k.ino))
            .collect();
        let mut changed = 0;
        for id in ids.difference(&have) {
            self.loaders
                .insert(key(*id), 1, 0)
                .map_err(op("insert", names::LOADERS))?;
            changed += 1;
        }
        for id in have.difference(ids) {
            let _ = self.loaders.remove(&key(*id));
            changed += 1;
        }
        Ok(changed)
    }

    /// Exec ids of process `tgid`, if it is tracked.
    pub fn task(&self, tgid: u32) -> Option<TaskInfo> {
        self.tasks.get(&tgid, 0).ok()
    }

    /// The container views known now, each with the identity of its principal: a policy's
    /// rules are resolved in the agent's view and in the views of the containers whose
    /// identity it governs ([`Self::views_for`]).
    pub fn set_containers(&mut self, views: Vec<(String, View)>) {
        self.containers = views;
        self.containers_version += 1;
    }

    /// Changes with every [`Self::set_containers`]: a re-stat resolved outside the lock is
    /// dropped if the container views were set again meanwhile (a container just enrolled
    /// installed its view; the stale resolution would remove it).
    pub fn containers_version(&self) -> u64 {
        self.containers_version
    }

    /// The views to resolve a policy's rules in: the agent's, then those of the containers
    /// whose principal's identity `governs` says the policy governs.
    pub fn views_for(&self, governs: impl Fn(&str) -> bool) -> Vec<View> {
        let agent = View::agent()
            .inspect_err(|e| warn!(error = %e, "open the agent's own view of exec rule paths"))
            .ok();
        let mut out: Vec<View> = agent.into_iter().collect();
        for (identity, view) in &self.containers {
            if governs(identity) && !out.iter().any(|v| v.key == view.key) {
                out.push(view.clone());
            }
        }
        out
    }

    /// Writes the exec rules of policy slot `policy` (generation-qualified key), resolved in
    /// `views` ([`Self::views_for`]). Paths that cannot be statted in the agent's view are
    /// skipped with a warning (see the module docs); the rules are kept for
    /// [`Self::refresh`]. The key's entries must be empty (a freshly cleared generation). A
    /// policy without exec rules writes nothing and has nothing to re-stat.
    pub fn write(
        &mut self,
        policy: u32,
        rules: &[ExecRule],
        views: Vec<View>,
    ) -> Result<(), MapError> {
        if rules.is_empty() {
            self.installed.remove(&policy);
            return Ok(());
        }
        let entries = resolve_in(rules, &views);
        for (path, why) in &entries.skipped {
            warn!(path = %path.display(), reason = %why, "exec rule path skipped");
        }
        let mut sticky = Sticky::default();
        let live: Vec<ViewKey> = views.iter().map(|v| v.key).collect();
        let entries = sticky.apply(&entries, &live);
        let diff = ExecEntries::default().diff(&entries);
        // Recorded first: a failed insert leaves nothing unaccounted for the re-stat.
        self.installed.insert(
            policy,
            Installed {
                rules: rules.into(),
                entries,
                sticky,
                views,
            },
        );
        self.apply_diff(policy, &diff)
    }

    /// The exec rules in the maps, by policy key, for a re-stat outside the enforcer lock:
    /// resolve each with [`resolve_in`], then hand the result to [`Self::refresh`].
    pub fn watched(&self) -> Vec<(u32, Arc<[ExecRule]>)> {
        self.installed
            .iter()
            .map(|(k, i)| (*k, i.rules.clone()))
            .collect()
    }

    /// Installs `fresh` (the rules `rules` of policy key `policy`, resolved again in `views`)
    /// where an identity changed: a path replaced by a new inode, created, removed or
    /// retargeted, a container's view added or gone. A denied identity that left its path
    /// stays denied while it has a link, or while its container's view is among `views`
    /// ([`Sticky`]). Nothing happens if the policy was rewritten since [`Self::watched`]
    /// (other rules installed there). New and changed keys are written before stale ones are
    /// deleted ([`ExecEntries::diff`]), so a rule never lapses during the update. Returns the
    /// number of map entries written or deleted.
    pub fn refresh(
        &mut self,
        policy: u32,
        rules: &Arc<[ExecRule]>,
        views: Vec<View>,
        fresh: ExecEntries,
    ) -> Result<usize, MapError> {
        let Some(inst) = self.installed.get_mut(&policy) else {
            return Ok(0);
        };
        if !Arc::ptr_eq(&inst.rules, rules) {
            return Ok(0);
        }
        let live: Vec<ViewKey> = views.iter().map(|v| v.key).collect();
        let fresh = inst.sticky.apply(&fresh, &live);
        inst.views = views;
        let diff = inst.entries.diff(&fresh);
        if diff.is_empty() {
            return Ok(0);
        }
        let n = diff.files_set.len()
            + diff.dirs_set.len()
            + diff.files_gone.len()
            + diff.dirs_gone.len();
        self.apply_diff(policy, &diff)?;
        if let Some(i) = self.installed.get_mut(&policy) {
            i.entries = fresh;
        }
        Ok(n)
    }

    /// Resolves policy key `policy`'s rules again in `views` and installs the change, under
    /// the caller's lock (a container just enrolled: its view must be in the maps before it
    /// starts). Returns the entries changed.
    pub fn refresh_in(&mut self, policy: u32, views: Vec<View>) -> Result<usize, MapError> {
        let Some(rules) = self.installed.get(&policy).map(|i| i.rules.clone()) else {
            return Ok(0);
        };
        let fresh = resolve_in(&rules, &views);
        self.refresh(policy, &rules, views, fresh)
    }

    /// Denied identities followed off their paths, over all policies.
    pub fn held(&self) -> usize {
        self.installed.values().map(|i| i.sticky.len()).sum()
    }

    /// [`Self::watched`], [`resolve_in`] and [`Self::refresh`] in one call, in the views each
    /// policy was last resolved in, under whatever lock the caller holds; returns the entries
    /// changed.
    pub fn refresh_all(&mut self) -> Result<usize, MapError> {
        let mut n = 0;
        let keys: Vec<(u32, Vec<View>)> = self
            .installed
            .iter()
            .map(|(k, i)| (*k, i.views.clone()))
            .collect();
        for (policy, views) in keys {
            n += self.refresh_in(policy, views)?;
        }
        Ok(n)
    }

    fn apply_diff(&mut self, policy: u32, d: &EntriesDiff) -> Result<(), MapError> {
        let key = |(dev, ino): (u32, u64)| ExecKey { policy, dev, ino };
        for (k, v) in &d.files_set {
            self.files
                .insert(key(*k), *v, 0)
                .map_err(op("insert", names::EXEC_FILES))?;
        }
        for (k, v) in &d.dirs_set {
            self.dirs
                .insert(key(*k), *v, 0)
                .map_err(op("insert", names::EXEC_DIRS))?;
        }
        for k in &d.files_gone {
            let _ = self.files.remove(&key(*k));
        }
        for k in &d.dirs_gone {
            let _ = self.dirs.remove(&key(*k));
        }
        Ok(())
    }

    /// Stops re-statting the rules of generation `generation` (no longer in force); its
    /// kernel entries stay until the generation is cleared.
    pub fn forget_generation(&mut self, generation: u32) {
        self.installed
            .retain(|k, _| agent_common::policy_key_generation(*k) != generation);
    }

    /// Deletes every exec entry of generation `generation`.
    pub fn clear_generation(&mut self, generation: u32) {
        self.installed
            .retain(|k, _| agent_common::policy_key_generation(*k) != generation);
        for map in [&mut self.files, &mut self.dirs] {
            let keys: Vec<ExecKey> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| agent_common::policy_key_generation(k.policy) == generation)
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

    #[test]
    fn select_prefers_lsm_and_falls_back() {
        assert_eq!(ExecMode::select::<String>(&Ok(())), ExecMode::Lsm);
        assert_eq!(
            ExecMode::select(&Err("EPERM".to_owned())),
            ExecMode::Tracepoint
        );
    }
}
