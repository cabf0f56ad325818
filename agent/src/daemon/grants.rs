//! The node's grant book: the grants the server says are in force (from the latest snapshot),
//! and the kernel `GRANTS` entries they mean for the principals enrolled now.
//!
//! Each grant names an identity, optionally a session, and a grant template by name. It
//! applies to every enrolled principal with exactly that identity (and that session, if the
//! grant has one); for each such principal the template is looked up by name in the policy that
//! governs it, and [`grant_keys`] gives its kernel keys. The value is the grant's id and its
//! expiry converted from Unix time to CLOCK_BOOTTIME (`boot_now + (expires − unix_now)`, one
//! sample of both clocks per reconcile); the kernel stops honouring the entry at that instant on
//! its own, with no userspace sweep. Already-expired grants are not installed. A grant whose
//! template the principal's policy no longer has is skipped with a warning. Two grants that
//! yield the same key: the one expiring later wins (the map holds one value per key).
//!
//! **Diffing against the kernel map.** [`GrantBook::reconcile`] reads the installed entries
//! from the kernel map itself (not from an in-memory record) and adds, rewrites and removes
//! only the difference. This is robust where a record would not be: grants inherited from a
//! previous agent's pins, entries `remove_principal` deleted, writes that failed half-way, and a
//! principal index that a new principal reuses (the diff is by content, and the desired set
//! is computed from the principals enrolled now, so a new principal never keeps an old
//! principal's entry unless the same grant covers it too). Its cost is one map walk per
//! reconcile: a few microseconds per installed entry.
//!
//! **Policy flips.** Grant keys carry zone indices local to the principal's policy, so a new
//! policy can give an existing key another meaning. [`GrantBook::prepare_flip`] removes, before
//! the generation flip, every entry that is not wanted under the new policy or wanted with
//! another value; after the flip, [`GrantBook::reconcile`] against the new policy adds the rest.
//! An entry kept across the flip is valid under both policies, so at no instant does a grant
//! allow more than the live policy's templates name; during the flip a grant can briefly not
//! apply (fail closed).
//!
//! **Persistence.** In managed mode the book is stored in the state directory, so a restarted
//! agent keeps honouring the grants it had while it reconnects (revocations arrive with the
//! next snapshot). Standalone mode (`--policy FILE`) has no grant source: its book is always
//! empty, and any grant entries left in the pinned maps are removed at the first apply.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use agent_common::{GrantKey, GrantValue};
use corral_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use corral_policy::{
    CompiledSet,
    compiled::{GrantTemplate, grant_keys},
};

use super::registry::{PrincipalRecord, write_atomic};
use crate::ebpf::{MapError, PolicyMaps};

/// Installed expiries within this of the wanted one are left alone: the Unix → boottime
/// conversion moves by clock-sampling jitter (and NTP slew) between two reconciles, and
/// rewriting every entry on each reconcile would be wasted syscalls.
pub const EXPIRY_SLACK_NS: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("grant id `{id}` is not a decimal unsigned 64-bit number")]
    Id {
        id: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("grant id 0 is reserved (the kernel reads it as no grant)")]
    ZeroId,
}

/// One grant in force, as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredGrant {
    pub id: u64,
    pub identity: String,
    /// Empty: every session of the identity.
    pub session: String,
    /// Template name in the governing policy.
    pub template: String,
    pub expires_unix_ns: u64,
}

impl DesiredGrant {
    pub fn from_pb(g: &pb::ActiveGrant) -> Result<Self, GrantError> {
        let id =
            g.id.trim()
                .parse::<u64>()
                .map_err(|source| GrantError::Id {
                    id: g.id.clone(),
                    source,
                })?;
        if id == 0 {
            return Err(GrantError::ZeroId);
        }
        Ok(Self {
            id,
            identity: g.identity.clone(),
            session: g.session.clone(),
            template: g.grant.clone(),
            expires_unix_ns: g.expires_unix_nano,
        })
    }

    /// Whether the grant covers `p`: same identity, and same session if it names one.
    pub fn applies_to(&self, p: &PrincipalRecord) -> bool {
        p.identity == self.identity && (self.session.is_empty() || p.session == self.session)
    }
}

/// One sample of both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub unix_ns: u64,
    pub boot_ns: u64,
}

impl Clock {
    pub fn now() -> Result<Self, std::io::Error> {
        let boot_ns = crate::clock::boottime_ns()?;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(std::io::Error::other)?;
        let unix_ns = u64::try_from(unix.as_nanos()).map_err(std::io::Error::other)?;
        Ok(Self { unix_ns, boot_ns })
    }

    /// The CLOCK_BOOTTIME instant of Unix time `expires_unix_ns`; `None` if it has passed.
    pub fn boottime_of(&self, expires_unix_ns: u64) -> Option<u64> {
        let left = expires_unix_ns
            .checked_sub(self.unix_ns)
            .filter(|l| *l > 0)?;
        Some(self.boot_ns.saturating_add(left))
    }
}

/// A grant some principal's policy has no template for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Missing {
    pub grant: u64,
    pub principal: u32,
    pub template: String,
}

/// The kernel entries the grants mean for the principals enrolled now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub entries: HashMap<GrantKey, GrantValue>,
    pub missing: BTreeSet<Missing>,
}

/// The grant template `name` in the policy that governs `identity` under `compiled`.
pub fn template_for<'a>(
    compiled: &'a CompiledSet,
    identity: &str,
    name: &str,
) -> Option<&'a GrantTemplate> {
    compiled
        .governing(identity)?
        .grants
        .iter()
        .find(|t| t.name == name)
}

/// Computes the wanted `GRANTS` entries (pure).
pub fn desired(
    grants: &[DesiredGrant],
    principals: &[Arc<PrincipalRecord>],
    compiled: &CompiledSet,
    clock: &Clock,
) -> Desired {
    let mut out = Desired::default();
    for g in grants {
        let Some(expires_ns) = clock.boottime_of(g.expires_unix_ns) else {
            continue;
        };
        let value = GrantValue {
            expires_ns,
            grant_id: g.id,
        };
        for p in principals.iter().filter(|p| g.applies_to(p)) {
            let Some(t) = template_for(compiled, &p.identity, &g.template) else {
                out.missing.insert(Missing {
                    grant: g.id,
                    principal: p.index,
                    template: g.template.clone(),
                });
                continue;
            };
            for k in grant_keys(p.index, t) {
                out.entries
                    .entry(k)
                    .and_modify(|v| {
                        if (value.expires_ns, value.grant_id) > (v.expires_ns, v.grant_id) {
                            *v = value;
                        }
                    })
                    .or_insert(value);
            }
        }
    }
    out
}

/// What to change in the kernel map: each list sorted by key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Installed, not wanted.
    pub stale: Vec<GrantKey>,
    /// Installed with another grant or expiry.
    pub changed: Vec<(GrantKey, GrantValue)>,
    /// Wanted, not installed.
    pub new: Vec<(GrantKey, GrantValue)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.stale.is_empty() && self.changed.is_empty() && self.new.is_empty()
    }
}

fn same(a: &GrantValue, b: &GrantValue) -> bool {
    a.grant_id == b.grant_id && a.expires_ns.abs_diff(b.expires_ns) <= EXPIRY_SLACK_NS
}

fn key_order(k: &GrantKey) -> (u32, u32, u16, u8) {
    (k.principal, k.zone, k.port, k.proto)
}

/// The difference between `installed` and `desired` (pure).
pub fn diff(
    installed: &HashMap<GrantKey, GrantValue>,
    desired: &HashMap<GrantKey, GrantValue>,
) -> Diff {
    let mut d = Diff {
        stale: installed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect(),
        ..Diff::default()
    };
    for (k, v) in desired {
        match installed.get(k) {
            None => d.new.push((*k, *v)),
            Some(old) if !same(old, v) => d.changed.push((*k, *v)),
            Some(_) => {}
        }
    }
    d.stale.sort_by_key(key_order);
    d.changed.sort_by_key(|(k, _)| key_order(k));
    d.new.sort_by_key(|(k, _)| key_order(k));
    d
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

/// Tries every removal; the first error is returned after all were tried.
fn remove_all(maps: &mut PolicyMaps, keys: &[GrantKey]) -> Result<usize, MapError> {
    let mut first = None;
    let mut n = 0;
    for k in keys {
        match maps.remove_grant(k) {
            Ok(()) => n += 1,
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(n), Err)
}

/// Tries every write; the first error is returned after all were tried.
fn write_all(maps: &mut PolicyMaps, entries: &[(GrantKey, GrantValue)]) -> Result<usize, MapError> {
    let mut first = None;
    let mut n = 0;
    for (k, v) in entries {
        match maps.add_grant(*k, *v) {
            Ok(()) => n += 1,
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(n), Err)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    version: u64,
    grants: Vec<DesiredGrant>,
}

#[derive(Debug, Default)]
struct BookState {
    grants: Vec<DesiredGrant>,
    version: u64,
    /// Missing templates already warned about.
    missing: BTreeSet<Missing>,
}

/// The grants in force on this node (see the module docs).
#[derive(Debug, Default)]
pub struct GrantBook {
    state: Mutex<BookState>,
    /// Where the book is persisted (managed mode); `None`: in memory only, always empty.
    path: Option<PathBuf>,
}

impl GrantBook {
    /// An empty book that is never persisted (standalone mode: no grant source).
    pub fn standalone() -> Self {
        Self::default()
    }

    /// The book persisted at `path`, or an empty one (managed mode).
    pub fn managed(path: PathBuf) -> Self {
        let p: Persisted = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if !p.grants.is_empty() {
            info!(
                grants = p.grants.len(),
                version = p.version,
                "grants carried over from the previous agent"
            );
        }
        Self {
            state: Mutex::new(BookState {
                grants: p.grants,
                version: p.version,
                missing: BTreeSet::new(),
            }),
            path: Some(path),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BookState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The grants version of the last snapshot (0: none yet).
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    pub fn grants(&self) -> Vec<DesiredGrant> {
        self.lock().grants.clone()
    }

    /// Replaces the grants in force; `true` if they changed. Ignored in standalone mode.
    pub fn set(&self, version: u64, grants: Vec<DesiredGrant>) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let mut st = self.lock();
        let changed = st.grants != grants;
        st.version = version;
        if changed {
            st.grants = grants;
            let p = Persisted {
                version,
                grants: st.grants.clone(),
            };
            let res = serde_json::to_vec(&p)
                .map_err(std::io::Error::other)
                .and_then(|b| write_atomic(path, &b));
            if let Err(e) = res {
                warn!(path = %path.display(), error = %e, "store the grant book");
            }
        }
        changed
    }

    /// [`Self::set`] from a snapshot; grants with a malformed id are skipped with a warning.
    pub fn set_from_snapshot(&self, snap: &pb::Snapshot) -> bool {
        let grants = snap
            .grants
            .iter()
            .filter_map(|g| {
                DesiredGrant::from_pb(g)
                    .map_err(|e| warn!(grant = %g.id, identity = %g.identity, error = %e, "grant skipped"))
                    .ok()
            })
            .collect();
        self.set(snap.grants_version, grants)
    }

    /// The wanted entries under `compiled`; warns once per new missing template.
    fn wanted(&self, principals: &[Arc<PrincipalRecord>], compiled: &CompiledSet) -> Desired {
        let mut st = self.lock();
        let d = match Clock::now() {
            Ok(clock) => desired(&st.grants, principals, compiled, &clock),
            Err(e) => {
                // Cannot convert expiries: install nothing (fail closed).
                error!(error = %e, "read the clocks; no grants are installed");
                Desired::default()
            }
        };
        for m in d.missing.difference(&st.missing) {
            warn!(grant = m.grant, principal = m.principal, template = %m.template,
                  "grant skipped: the principal's policy has no grant template of this name");
        }
        st.missing = d.missing.clone();
        d
    }

    /// Brings the kernel's grant entries in line with the book for `principals` governed by
    /// `compiled` (the live policy), changing only the difference. `compiled` `None` (no policy
    /// known, e.g. an adopted pinned policy without a valid local copy): nothing is touched.
    pub fn reconcile(
        &self,
        maps: &mut PolicyMaps,
        principals: &[Arc<PrincipalRecord>],
        compiled: Option<&CompiledSet>,
    ) -> Result<Applied, MapError> {
        let Some(compiled) = compiled else {
            return Ok(Applied::default());
        };
        let want = self.wanted(principals, compiled);
        let installed = maps.grants()?;
        let d = diff(&installed, &want.entries);
        if d.is_empty() {
            return Ok(Applied::default());
        }
        // Removals first: an entry never lingers beside its replacement.
        let removed = remove_all(maps, &d.stale);
        let updated = write_all(maps, &d.changed);
        let added = write_all(maps, &d.new);
        let applied = Applied {
            removed: removed?,
            updated: updated?,
            added: added?,
        };
        debug!(?applied, "grants reconciled");
        Ok(applied)
    }

    /// Before a generation flip to `next`: removes every entry that is not wanted under
    /// `next` with the value it has. After the flip, call [`Self::reconcile`] with `next`.
    pub fn prepare_flip(
        &self,
        maps: &mut PolicyMaps,
        principals: &[Arc<PrincipalRecord>],
        next: &CompiledSet,
    ) -> Result<usize, MapError> {
        let want = self.wanted(principals, next);
        let installed = maps.grants()?;
        let d = diff(&installed, &want.entries);
        let mut keys = d.stale;
        keys.extend(d.changed.iter().map(|(k, _)| *k));
        remove_all(maps, &keys)
    }
}

#[cfg(test)]
#[path = "grants_tests.rs"]
mod tests;
