//! The enforced policy in standalone mode: compile the file, apply it to the kernel maps in one
//! generation flip, keep the previous policy when the new input is rejected, and remember
//! which compiled set each map generation holds (events name their policy by
//! generation-qualified key, so an event read just after a swap still resolves correctly).
//!
//! Revisions are monotonic across restarts: the last applied source is kept as the
//! last-known-good file in the state directory with its revision; the same content keeps its
//! revision, any new content gets the next one.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use corral_policy::{self as policy, CompiledSet, PolicyError, snapshot::compile_snapshot};
use corral_runtime::error_chain;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::{
    grants::GrantBook,
    registry::{PrincipalRecord, Registry, write_atomic},
};
use crate::{
    cgroup,
    ebpf::{MapError, PolicyMaps},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("policy rejected:\n{0}")]
    Invalid(#[from] PolicyError),
    #[error("write the policy into the kernel maps")]
    Maps(#[from] MapError),
}

/// What one map generation enforces.
#[derive(Debug)]
pub struct Generation {
    pub revision: u64,
    pub compiled: Arc<CompiledSet>,
}

impl Generation {
    pub fn policy_name(&self, slot: u32) -> Option<&str> {
        self.compiled
            .policies
            .get(slot as usize)
            .map(|p| p.name.as_str())
    }

    /// The first grant template of policy `slot` that would allow a connect to `zone`,
    /// `port`, `proto` (see [`corral_policy::compiled::grant_available`]).
    pub fn grant_available(&self, slot: u32, zone: u32, port: u16, proto: u8) -> Option<&str> {
        let templates = &self.compiled.policies.get(slot as usize)?.grants;
        corral_policy::compiled::grant_available(templates, zone, port, proto)
            .map(|t| t.name.as_str())
    }

    pub fn zone_name(&self, slot: u32, zone: u32) -> Option<&str> {
        self.compiled
            .policies
            .get(slot as usize)?
            .zones
            .get(zone as usize)
            .map(|z| z.name.as_str())
    }
}

/// The policy state shown in status and used to enrich events.
#[derive(Debug, Default)]
pub struct PolicyState {
    /// By map generation (0, 1).
    pub generations: [Option<Arc<Generation>>; 2],
    /// The generation live in the kernel.
    pub live: Option<u32>,
    /// The last source text tried (applied or rejected): the watcher only reacts to changes.
    pub last_source: Option<String>,
    pub last_error: Option<String>,
    pub apply_errors: u64,
}

impl PolicyState {
    pub fn current(&self) -> Option<&Arc<Generation>> {
        self.live
            .and_then(|g| self.generations.get(g as usize))
            .and_then(Option::as_ref)
    }

    pub fn revision(&self) -> u64 {
        self.current().map_or(0, |g| g.revision)
    }

    /// The generation a kernel policy key belongs to.
    pub fn by_key(&self, key: u32) -> Option<&Arc<Generation>> {
        self.generations
            .get(agent_common::policy_key_generation(key) as usize)?
            .as_ref()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Lkg {
    revision: u64,
    source: String,
}

/// Last-known-good policy, persisted in the state directory.
#[derive(Debug, Clone)]
pub struct LastKnownGood {
    path: PathBuf,
}

impl LastKnownGood {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("last-known-good.json"),
        }
    }

    fn load(&self) -> Option<Lkg> {
        let b = std::fs::read(&self.path).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// The stored revision and source text.
    pub fn source(&self) -> Option<(u64, String)> {
        self.load().map(|l| (l.revision, l.source))
    }

    pub fn store(&self, revision: u64, source: &str) {
        let lkg = Lkg {
            revision,
            source: source.into(),
        };
        let res = serde_json::to_vec(&lkg)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomic(&self.path, &b));
        if let Err(e) = res {
            warn!(path = %self.path.display(), error = %e, "store the last-known-good policy");
        }
    }

    /// The revision `source` gets: the stored one for the same text, else the next.
    fn revision_for(&self, source: &str, current: u64) -> u64 {
        match self.load() {
            Some(l) if l.source == source => l.revision,
            Some(l) => l.revision.max(current) + 1,
            None => current + 1,
        }
    }

    /// The stored policy, compiled (for a start whose file is invalid).
    pub fn compiled(&self, file: &str) -> Option<(u64, String, CompiledSet)> {
        let l = self.load()?;
        // A server snapshot may be the empty set (enrolled principals denied everything).
        let c = if l.source.trim().is_empty() {
            compile_snapshot(file, l.revision, &[]).ok()?
        } else {
            policy::compile_str(file, &l.source, l.revision).ok()?
        };
        Some((l.revision, l.source, c))
    }
}

/// Compiles `source` and applies it; on success it becomes the live generation.
#[expect(
    clippy::too_many_arguments,
    reason = "the daemon state an apply touches"
)]
pub fn apply_source(
    file: &str,
    source: &str,
    state: &mut PolicyState,
    lkg: &LastKnownGood,
    maps: &mut PolicyMaps,
    registry: &Registry,
    grants: &GrantBook,
    cgroup_root: &Path,
) -> Result<u64, ApplyError> {
    let revision = lkg.revision_for(source, state.revision());
    let compiled = policy::compile_str(file, source, revision)?;
    apply_compiled(compiled, state, maps, registry, grants, cgroup_root)?;
    lkg.store(revision, source);
    Ok(revision)
}

/// Writes `compiled` into the maps (one generation flip), gives every registered principal its
/// slot, and enrols registered principals the maps lack (fresh pins).
///
/// Grant entries carry zone indices of the principal's policy, so they are re-keyed around the
/// flip: entries not valid under the new policy are removed before it, the new policy's
/// entries are added after it (see [`super::grants`]). If the flip fails, the grants are
/// reconciled against the policy still in force.
pub fn apply_compiled(
    compiled: CompiledSet,
    state: &mut PolicyState,
    maps: &mut PolicyMaps,
    registry: &Registry,
    grants: &GrantBook,
    cgroup_root: &Path,
) -> Result<(), MapError> {
    let principals: Vec<Arc<PrincipalRecord>> = registry.list();
    let slot_for = |cg: u64| {
        principals
            .iter()
            .find(|p| p.cgroup_id == cg)
            .and_then(|p| compiled.policy_for(&p.identity))
    };
    // Fail closed: a grant entry that could mean something else after the flip must go first.
    let mut in_kernel = HashSet::new();
    let flipped = grants
        .prepare_flip(maps, &principals, &compiled)
        .and_then(|_| {
            maps.apply(&compiled, |cg, _| {
                in_kernel.insert(cg);
                slot_for(cg)
            })
        });
    if let Err(e) = flipped {
        let current = state.current().map(|g| g.compiled.clone());
        if let Err(g) = grants.reconcile(maps, &principals, current.as_deref()) {
            warn!(error = %error_chain(&g), "restore the grants of the policy in force");
        }
        return Err(e);
    }
    for p in principals
        .iter()
        .filter(|p| !in_kernel.contains(&p.cgroup_id))
    {
        let level = cgroup::level(cgroup_root, &p.cgroup).unwrap_or(0);
        let slot = compiled.policy_for(&p.identity);
        maps.add_principal(p.cgroup_id, level, p.index, slot)?;
        info!(identity = %p.identity, session = %p.session, "re-enrolled principal missing from the kernel maps");
    }
    if let Err(e) = grants.reconcile(maps, &principals, Some(&compiled)) {
        // The policy is in force; the missing grants are retried on the next change.
        warn!(error = %error_chain(&e), "install the grants under the new policy");
    }
    let live = maps.config()?.generation & 1;
    let revision = compiled.revision;
    let names: Vec<String> = compiled.policies.iter().map(|p| p.name.clone()).collect();
    state.generations[live as usize] = Some(Arc::new(Generation {
        revision,
        compiled: Arc::new(compiled),
    }));
    state.live = Some(live);
    state.last_error = None;
    info!(revision, policies = ?names, "policy applied");
    Ok(())
}

/// Records a rejected input: the previous policy stays in force.
pub fn record_error(state: &mut PolicyState, e: &ApplyError) {
    state.apply_errors += 1;
    let msg = match e {
        ApplyError::Invalid(p) => p.to_string(),
        other => error_chain(other),
    };
    error!(
        revision = state.revision(),
        "{msg}; the previous policy stays in force"
    );
    state.last_error = Some(msg);
}

/// Reads the policy file; a read failure is an error to show like a rejection.
pub fn read_source(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        file: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_stable_for_the_same_text_and_grow_otherwise() {
        let dir = std::env::temp_dir().join(format!("corral-lkg-{}", std::process::id()));
        let lkg = LastKnownGood::new(&dir);
        assert_eq!(lkg.revision_for("a", 0), 1);
        lkg.store(1, "a");
        assert_eq!(lkg.revision_for("a", 0), 1);
        assert_eq!(lkg.revision_for("b", 1), 2);
        lkg.store(2, "b");
        assert_eq!(lkg.revision_for("a", 2), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
