//! Principals: identity + session, each with its own cgroup under the principals' cgroup
//! directory (`<cgroup2 root>/corral/<session>-<index>` by default) and a stable index that the
//! kernel programs report in events.
//!
//! The registry is persisted to `<state dir>/principals.json` after every change, so a
//! restarted agent knows the principals that kept running (their kernel entries live in the
//! pinned maps). A principal is removed, with its cgroup and its session-bound kernel state
//! (chaining, grants), when its cgroup is empty (`populated 0` in `cgroup.events`) after a
//! process ran in it (seen populated, or CPU time in `cpu.stat`: a short-lived principal can
//! come and go between two sweeps), or when nobody joined it within [`JOIN_GRACE`]. A principal
//! that another `corral run` of its session has just enrolled into is kept while that process
//! lives and has not joined yet, even if every earlier process has exited.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use corral_policy::identity::{self, IdentityError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::peer;
use crate::{
    cgroup::{self, CgroupError},
    ebpf::{MapError, PolicyMaps},
};

/// How long an enrolled principal may stay empty before its first process joins.
pub const JOIN_GRACE: Duration = Duration::from_secs(60);

/// Longest session id accepted.
pub const MAX_SESSION_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid identity")]
    Identity(#[from] IdentityError),
    #[error(
        "invalid session id `{0}`: use 1 to {MAX_SESSION_LEN} letters, digits, `-`, `_` or `.`"
    )]
    Session(String),
    #[error("invalid containment opt-out `{0}`: a uid, or a capability name like net_bind_service")]
    OptOut(String),
    #[error("no free principal index")]
    Full,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cgroup {path} is outside the cgroup v2 root")]
    OutsideRoot { path: PathBuf },
    #[error("enrol principal in the kernel maps")]
    Maps(#[from] MapError),
    #[error("write principal state {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read principal state {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse principal state {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One principal, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalRecord {
    pub index: u32,
    pub identity: String,
    pub session: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The cgroup is someone else's (a Kubernetes pod's, made by the kubelet): the agent
    /// neither creates nor removes it, and keeps the principal while the cgroup is empty (a
    /// pod between container restarts). It goes when the cgroup does, or when the pod is
    /// deleted ([`Registry::remove_cgroup`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub external: bool,
    /// `corral run`'s containment opt-outs, from every enrolment of this principal, as shown
    /// in status ([`opt_outs`]). Older state files have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opt_outs: Vec<String>,
}

impl PrincipalRecord {
    /// As the API shows it (events, status, enrolment, node sync).
    pub fn to_pb(&self) -> corral_proto::v1::Principal {
        corral_proto::v1::Principal {
            identity: self.identity.clone(),
            session: self.session.clone(),
            cgroup_id: self.cgroup_id,
            opt_outs: self.opt_outs.clone(),
        }
    }
}

/// Longest `--user` or `--cap` value recorded.
const MAX_OPT_OUT_LEN: usize = 32;

/// The containment opt-outs of an enrolment in their stable form: `user=UID`, `cap=NAME`
/// (lower case, no `cap_` prefix), `no-seccomp`.
pub fn opt_outs(
    user: &str,
    caps: &[String],
    no_seccomp: bool,
) -> Result<Vec<String>, RegistryError> {
    let mut out = Vec::new();
    if !user.is_empty() {
        if user.len() > MAX_OPT_OUT_LEN || !user.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RegistryError::OptOut(user.into()));
        }
        out.push(format!("user={user}"));
    }
    for c in caps {
        let lower = c.to_ascii_lowercase();
        let name = lower.strip_prefix("cap_").unwrap_or(&lower);
        if name.is_empty()
            || name.len() > MAX_OPT_OUT_LEN
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(RegistryError::OptOut(c.clone()));
        }
        let o = format!("cap={name}");
        if !out.contains(&o) {
            out.push(o);
        }
    }
    if no_seccomp {
        out.push("no-seccomp".into());
    }
    Ok(out)
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug)]
struct Entry {
    rec: Arc<PrincipalRecord>,
    seen_populated: bool,
    created: Instant,
    /// Another process enrolled into this existing principal (`corral run` again in the
    /// session): when, and a pidfd of it if known. While that process lives (at most
    /// [`JOIN_GRACE`]) an empty cgroup has not "exited": it is about to join, even if the
    /// earlier processes have all gone.
    rejoining: Option<(Instant, Option<Arc<OwnedFd>>)>,
}

impl Entry {
    fn new(rec: Arc<PrincipalRecord>, seen_populated: bool) -> Self {
        Self {
            rec,
            seen_populated,
            created: Instant::now(),
            rejoining: None,
        }
    }

    /// A process is about to join: an empty cgroup is not "exited" until it did (or the
    /// grace ran out).
    fn awaits_join(&self) -> bool {
        self.rejoining.as_ref().is_some_and(|(t, joiner)| {
            t.elapsed() <= JOIN_GRACE && joiner.as_deref().is_none_or(peer::pidfd_alive)
        })
    }
}

/// The enrolled principals.
#[derive(Debug)]
pub struct Registry {
    root: PathBuf,
    dir: PathBuf,
    state: PathBuf,
    inner: Mutex<BTreeMap<u32, Entry>>,
    /// Recently removed principals: their events can still be in the ring buffer when they
    /// go, and must keep their identity. Indices are allocated round-robin, so an index is
    /// not reused while its events can still be pending.
    retired: Mutex<Retired>,
    /// Bumped on every enrolment and removal ([`Self::subscribe`]).
    changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Retired {
    by_index: std::collections::HashMap<u32, Arc<PrincipalRecord>>,
    order: std::collections::VecDeque<u32>,
    /// Where the round-robin index search starts.
    next: u32,
}

/// Removed principals remembered for late events.
const RETIRED_MAX: usize = 4096;

pub(crate) fn valid_session(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SESSION_LEN
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
}

/// A fresh random session id (16 hex digits from the kernel's random pool).
pub fn random_session() -> String {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid")
        .map(|u| String::from_utf8_lossy(&u).replace('-', ""))
        .unwrap_or_default();
    let hex: String = bytes.trim().chars().take(16).collect();
    if hex.len() == 16 {
        hex
    } else {
        // No procfs uuid: time and pid are unique enough on one node.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("{:016x}", (t as u64) ^ u64::from(std::process::id()))
    }
}

/// `populated` from `cgroup.events`; `None` if the cgroup is gone.
fn populated(cgroup: &Path) -> Option<bool> {
    match std::fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(s) => Some(
            s.lines()
                .find_map(|l| l.strip_prefix("populated "))
                .is_some_and(|v| v.trim() == "1"),
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(_) => Some(true),
    }
}

/// Whether any process has ever run in the cgroup: its CPU time (`usage_usec` in `cpu.stat`,
/// which every cgroup v2 has) is not zero. A short-lived principal can come and go between two
/// sweeps; this still tells it was joined.
fn ever_ran(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cpu.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .is_some_and(|u| u > 0)
}

/// Processes in `cgroup` and its descendants.
pub fn process_count(cgroup: &Path) -> u32 {
    let own = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    let own = u32::try_from(own).unwrap_or(u32::MAX);
    let children: u32 = std::fs::read_dir(cgroup)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| process_count(&e.path()))
        .fold(0u32, u32::saturating_add);
    own.saturating_add(children)
}

impl Registry {
    /// Loads the persisted principals whose cgroups still exist (same cgroup id).
    pub fn load(root: &Path, dir: &Path, state: &Path) -> Result<Self, RegistryError> {
        let records: Vec<PrincipalRecord> = match std::fs::read(state) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| RegistryError::Parse {
                path: state.into(),
                source,
            })?,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(RegistryError::Load {
                    path: state.into(),
                    source,
                });
            }
        };
        let mut inner = BTreeMap::new();
        for rec in records {
            match cgroup::id(&rec.cgroup) {
                Ok(id) if id == rec.cgroup_id => {
                    let seen_populated = populated(&rec.cgroup).unwrap_or(false);
                    info!(identity = %rec.identity, session = %rec.session, index = rec.index,
                          "principal carried over from the previous agent");
                    inner.insert(rec.index, Entry::new(Arc::new(rec), seen_populated));
                }
                _ => info!(identity = %rec.identity, session = %rec.session,
                           "principal's cgroup is gone: forgetting it"),
            }
        }
        Ok(Self {
            root: root.into(),
            dir: dir.into(),
            state: state.into(),
            retired: Mutex::new(Retired {
                next: inner.keys().max().map_or(1, |m| m.saturating_add(1)),
                ..Retired::default()
            }),
            inner: Mutex::new(inner),
            changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A receiver that sees a change each time a principal is enrolled or removed (the value
    /// is a counter; read the set with [`Self::list`]). Works without a runtime.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Bumped on every enrolment, removal or change of a principal's record.
    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Entry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The principals' parent cgroup.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn retired(&self) -> std::sync::MutexGuard<'_, Retired> {
        self.retired.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The principal with kernel index `index`, live or recently removed.
    pub fn get(&self, index: u32) -> Option<Arc<PrincipalRecord>> {
        if let Some(e) = self.lock().get(&index) {
            return Some(e.rec.clone());
        }
        self.retired().by_index.get(&index).cloned()
    }

    /// The enrolled principal with kernel index `index` (not a removed one).
    pub fn live(&self, index: u32) -> Option<Arc<PrincipalRecord>> {
        self.lock().get(&index).map(|e| e.rec.clone())
    }

    pub fn list(&self) -> Vec<Arc<PrincipalRecord>> {
        self.lock().values().map(|e| e.rec.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether `cgroup` (an absolute cgroupfs path) is a principal's cgroup or inside one, or
    /// anywhere under the principals' directory.
    pub fn is_inside_principal(&self, cgroup: &Path) -> bool {
        cgroup.starts_with(&self.dir)
            || self
                .lock()
                .values()
                .any(|e| cgroup.starts_with(&e.rec.cgroup))
    }

    /// The principal whose cgroup is `cgroup` or its nearest ancestor.
    pub fn principal_containing(&self, cgroup: &Path) -> Option<Arc<PrincipalRecord>> {
        self.lock()
            .values()
            .filter(|e| cgroup.starts_with(&e.rec.cgroup))
            .max_by_key(|e| e.rec.cgroup.components().count())
            .map(|e| e.rec.clone())
    }

    /// Enrols (identity, session) governed by policy slot `slot`, or returns the existing
    /// principal of that pair. Its cgroup is created; the caller joins it. `joiner` is the
    /// process that will (the caller's pidfd, when known): an existing principal's cgroup is
    /// kept for it while it lives.
    pub fn enroll(
        &self,
        identity: &str,
        session: &str,
        opt_outs: &[String],
        joiner: Option<Arc<OwnedFd>>,
        slot: Option<u32>,
        maps: &mut PolicyMaps,
    ) -> Result<Arc<PrincipalRecord>, RegistryError> {
        identity::validate_id(identity)?;
        if !valid_session(session) {
            return Err(RegistryError::Session(session.into()));
        }
        let mut inner = self.lock();
        if let Some(e) = inner
            .values_mut()
            .find(|e| e.rec.identity == identity && e.rec.session == session)
        {
            // Another `corral run` in the session: it joins the existing cgroup, which the
            // sweep must not remove under it; its opt-outs are the principal's too.
            e.rejoining = Some((Instant::now(), joiner));
            let new: Vec<&String> = opt_outs
                .iter()
                .filter(|o| !e.rec.opt_outs.contains(o))
                .collect();
            if new.is_empty() {
                return Ok(e.rec.clone());
            }
            let mut rec = (*e.rec).clone();
            rec.opt_outs.extend(new.into_iter().cloned());
            e.rec = Arc::new(rec);
            let rec = e.rec.clone();
            let persisted = self.persist(&inner);
            drop(inner);
            self.notify();
            persisted?;
            return Ok(rec);
        }
        let index = self.allocate(&inner)?;
        let path = self.dir.join(format!("{session}-{index}"));
        cgroup::create(&path)?;
        let level = cgroup::level(&self.root, &path)
            .ok_or_else(|| RegistryError::OutsideRoot { path: path.clone() })?;
        let enrolled = cgroup::id(&path)
            .map_err(RegistryError::from)
            .and_then(|id| {
                maps.add_principal(id, level, index, slot)?;
                Ok(id)
            });
        let cgroup_id = match enrolled {
            Ok(id) => id,
            Err(e) => {
                let _ = cgroup::remove(&path);
                return Err(e);
            }
        };
        let rec = Arc::new(PrincipalRecord {
            index,
            identity: identity.into(),
            session: session.into(),
            cgroup: path,
            cgroup_id,
            external: false,
            opt_outs: opt_outs.to_vec(),
        });
        inner.insert(index, Entry::new(rec.clone(), false));
        let persisted = self.persist(&inner);
        drop(inner);
        // Enrolled in the kernel either way: tell the followers even if persisting failed.
        self.notify();
        persisted?;
        info!(identity, session, index, cgroup = %rec.cgroup.display(), "enrolled");
        Ok(rec)
    }

    /// A free kernel index: round-robin from the last one given out; 0 and NONE are never
    /// used, so a zeroed or unset field is never a principal.
    fn allocate(&self, inner: &BTreeMap<u32, Entry>) -> Result<u32, RegistryError> {
        let mut retired = self.retired();
        let start = retired.next.clamp(1, agent_common::NONE - 1);
        let index = (start..agent_common::NONE)
            .chain(1..start)
            .find(|i| !inner.contains_key(i))
            .ok_or(RegistryError::Full)?;
        retired.next = index.saturating_add(1);
        retired.by_index.remove(&index);
        Ok(index)
    }

    /// Enrols an existing cgroup that the agent does not own (a pod's) as the principal
    /// (identity, session), or returns the principal already enrolled for that cgroup.
    pub fn enroll_cgroup(
        &self,
        identity: &str,
        session: &str,
        cgroup: &Path,
        slot: Option<u32>,
        maps: &mut PolicyMaps,
    ) -> Result<Arc<PrincipalRecord>, RegistryError> {
        identity::validate_id(identity)?;
        if !valid_session(session) {
            return Err(RegistryError::Session(session.into()));
        }
        let mut inner = self.lock();
        if let Some(e) = inner.values().find(|e| e.rec.cgroup == cgroup) {
            return Ok(e.rec.clone());
        }
        let level =
            cgroup::level(&self.root, cgroup).ok_or_else(|| RegistryError::OutsideRoot {
                path: cgroup.into(),
            })?;
        let cgroup_id = cgroup::id(cgroup)?;
        let index = self.allocate(&inner)?;
        maps.add_principal(cgroup_id, level, index, slot)?;
        let rec = Arc::new(PrincipalRecord {
            index,
            identity: identity.into(),
            session: session.into(),
            cgroup: cgroup.into(),
            cgroup_id,
            external: true,
            opt_outs: Vec::new(),
        });
        inner.insert(
            index,
            Entry::new(rec.clone(), populated(cgroup).unwrap_or(false)),
        );
        let persisted = self.persist(&inner);
        drop(inner);
        self.notify();
        persisted?;
        info!(identity, session, index, cgroup = %cgroup.display(), "enrolled existing cgroup");
        Ok(rec)
    }

    /// Removes the principal of an external cgroup (its pod was deleted): kernel entry,
    /// chaining state and grants. The cgroup itself is left to its owner.
    pub fn remove_cgroup(
        &self,
        cgroup: &Path,
        maps: &mut PolicyMaps,
    ) -> Option<Arc<PrincipalRecord>> {
        let mut inner = self.lock();
        let index = inner.values().find(|e| e.rec.cgroup == cgroup)?.rec.index;
        let rec = inner.remove(&index)?.rec;
        if let Err(err) = maps.remove_principal(rec.cgroup_id) {
            warn!(identity = %rec.identity, error = %err, "remove principal from the kernel maps");
        }
        self.retire(rec.clone());
        if let Err(e) = self.persist(&inner) {
            warn!(error = %e, "persist principals");
        }
        drop(inner);
        self.notify();
        info!(identity = %rec.identity, session = %rec.session, index, "principal removed");
        Some(rec)
    }

    /// Remembers a removed principal for its late events.
    fn retire(&self, rec: Arc<PrincipalRecord>) {
        let index = rec.index;
        let mut retired = self.retired();
        if retired.by_index.insert(index, rec).is_none() {
            retired.order.push_back(index);
        }
        while retired.order.len() > RETIRED_MAX {
            if let Some(old) = retired.order.pop_front() {
                retired.by_index.remove(&old);
            }
        }
    }

    /// Removes principals whose processes have all exited (and those never joined within
    /// [`JOIN_GRACE`]): kernel entry, chaining state and grants, cgroup. Returns the removed.
    /// A principal whose process left its cgroup but still lives (attribution is sticky: see
    /// `PolicyMaps::sticky`) is not removed: it is still policed as that principal.
    pub fn sweep(&self, maps: &mut PolicyMaps) -> Vec<Arc<PrincipalRecord>> {
        let mut inner = self.lock();
        let mut gone = Vec::new();
        let sticky = maps.sticky();
        let has_live_member = |cgroup_id: u64| {
            sticky
                .iter()
                .any(|(pid, cg)| *cg == cgroup_id && Path::new(&format!("/proc/{pid}")).exists())
        };
        for e in inner.values_mut() {
            if !e.rec.external && has_live_member(e.rec.cgroup_id) {
                e.seen_populated = true;
                continue;
            }
            match populated(&e.rec.cgroup) {
                None => gone.push(e.rec.index),
                // An external (pod) cgroup stays enrolled while it exists, empty or not.
                Some(_) if e.rec.external => {}
                Some(true) => e.seen_populated = true,
                Some(false) if e.awaits_join() => {}
                Some(false)
                    if e.seen_populated
                        || ever_ran(&e.rec.cgroup)
                        || e.created.elapsed() > JOIN_GRACE =>
                {
                    gone.push(e.rec.index)
                }
                Some(false) => {}
            }
        }
        let mut removed = Vec::new();
        for index in gone {
            let Some(e) = inner.get(&index) else { continue };
            let rec = e.rec.clone();
            // The cgroup first: rmdir fails while anything runs in it, and once it is gone
            // nothing can be attributed to the kernel entry any more. (An external cgroup is
            // already gone: it is only swept then.)
            if !rec.external
                && let Err(err) = cgroup::remove(&rec.cgroup)
            {
                warn!(identity = %rec.identity, error = %err, "remove principal cgroup; retrying later");
                continue;
            }
            if let Err(err) = maps.remove_principal(rec.cgroup_id) {
                warn!(identity = %rec.identity, error = %err, "remove principal from the kernel maps");
            }
            info!(identity = %rec.identity, session = %rec.session, index, "principal's last process exited: removed");
            inner.remove(&index);
            self.retire(rec.clone());
            removed.push(rec);
        }
        if !removed.is_empty() {
            if let Err(e) = self.persist(&inner) {
                warn!(error = %e, "persist principals");
            }
            drop(inner);
            self.notify();
        }
        removed
    }

    fn persist(&self, inner: &BTreeMap<u32, Entry>) -> Result<(), RegistryError> {
        let recs: Vec<&PrincipalRecord> = inner.values().map(|e| e.rec.as_ref()).collect();
        let err = |source| RegistryError::Persist {
            path: self.state.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&recs).map_err(|e| err(std::io::Error::other(e)))?;
        write_atomic(&self.state, &bytes).map_err(err)
    }
}

/// Writes `path` through a temporary file and a rename, creating the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_path_safe() {
        assert!(valid_session("abc-1_2.x"));
        assert!(!valid_session(""));
        assert!(!valid_session(".."));
        assert!(!valid_session("a/b"));
        assert!(!valid_session(&"x".repeat(MAX_SESSION_LEN + 1)));
    }

    #[test]
    fn random_sessions_are_valid_and_differ() {
        let a = random_session();
        let b = random_session();
        assert!(valid_session(&a), "{a}");
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }

    #[test]
    fn external_flag_is_optional_in_persisted_state() {
        // State written before pod principals existed has no `external` field.
        let old =
            r#"[{"index":3,"identity":"spiffe://t/a","session":"s","cgroup":"/x","cgroup_id":42}]"#;
        let recs: Vec<PrincipalRecord> = serde_json::from_str(old).expect("parse");
        assert!(!recs[0].external);
        let own = serde_json::to_string(&recs[0]).expect("json");
        assert!(!own.contains("external"), "{own}");
        let pod = PrincipalRecord {
            external: true,
            ..recs[0].clone()
        };
        let back: PrincipalRecord =
            serde_json::from_str(&serde_json::to_string(&pod).expect("json")).expect("parse");
        assert!(back.external);
        assert!(recs[0].opt_outs.is_empty());
        assert!(!own.contains("opt_outs"), "{own}");
    }

    #[test]
    fn opt_outs_have_a_stable_form() {
        let caps = vec![
            "CAP_NET_BIND_SERVICE".to_owned(),
            "net_bind_service".to_owned(),
            "sys_time".to_owned(),
        ];
        assert_eq!(
            opt_outs("1000", &caps, true).expect("valid"),
            [
                "user=1000",
                "cap=net_bind_service",
                "cap=sys_time",
                "no-seccomp"
            ]
        );
        assert!(opt_outs("", &[], false).expect("valid").is_empty());
        assert!(opt_outs("root", &[], false).is_err());
        assert!(opt_outs("", &["net bind".to_owned()], false).is_err());
        assert!(opt_outs("", &["cap_".to_owned()], false).is_err());
    }

    #[test]
    fn load_forgets_principals_whose_cgroup_is_gone() -> Result<(), RegistryError> {
        let dir = std::env::temp_dir().join(format!("corral-registry-{}", std::process::id()));
        let state = dir.join("principals.json");
        let rec = PrincipalRecord {
            index: 3,
            identity: "spiffe://t/a".into(),
            session: "s".into(),
            cgroup: dir.join("no-such-cgroup"),
            cgroup_id: 42,
            external: false,
            opt_outs: Vec::new(),
        };
        write_atomic(&state, &serde_json::to_vec(&vec![rec]).expect("json")).map_err(|source| {
            RegistryError::Persist {
                path: state.clone(),
                source,
            }
        })?;
        let r = Registry::load(Path::new("/"), &dir, &state)?;
        assert!(r.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
