//! Exec rules resolved to file identities: each exact path and prefix directory is statted
//! (symlinks followed) and becomes a `(kernel dev, inode)` map key. Paths are looked up in
//! views ([`View`]): the agent's own, and the mount namespace and root of each container the
//! OCI hook enrolled under the policy, so `/usr/bin/curl` in a pod's policy is the pod's curl
//! on its overlay; a policy's map entries are the union over its views. The same resolution
//! runs when a policy is written and, every [`RESTAT_INTERVAL`], again for the rules in force
//! ([`ExecEntries::diff`] gives the map updates), so a rule path replaced on disk (a new
//! inode: package upgrade, `cp` + rename) or created after the policy was written is matched
//! by its new identity within about one interval.
//!
//! Why a periodic re-stat and not inotify on the rules' parent directories: it is a `stat`
//! per rule path per second (microseconds each; 10k paths cost a few ms of one core per
//! second), and it follows everything a path depends on without a second model of path
//! resolution: a replaced parent directory, a symlink anywhere in the path retargeted, a
//! filesystem mounted over a directory, a path created later, inotify queue overflow. The cost
//! is a window of at most one interval in which the old identity is still the one matched.
//!
//! Following the path must not let a denied file escape by moving: renaming a denied binary
//! away, or hard-linking it elsewhere and removing the rule's path, would otherwise drop its
//! identity from the maps. [`Sticky`] therefore holds every denied identity open (`O_PATH`)
//! and keeps it denied while the file still has a link anywhere; an identity whose last link
//! is gone (the old file of an upgrade) is dropped and its descriptor closed, so its inode
//! number cannot be reused by an unrelated file while still denied. Costs: one descriptor per
//! denied file or prefix directory (where one cannot be opened, e.g. `EMFILE`, that identity
//! simply follows its path), and a filesystem holding a denied path cannot be unmounted
//! (`EBUSY`; a lazy unmount works) while the policy is in force. Identities found in a
//! container's view are not held open (the agent must never keep a container's overlay
//! mounted): they stay denied for as long as the container's view lives.

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{NONE, RuleValue, kernel_dev, merge_rules};

use corral_policy::compiled::{Action, ExecRule};

use super::exec_view::{Opened, View, ViewKey, parse_mount_devs};

/// How often the daemon re-stats the exec rule paths in force.
pub const RESTAT_INTERVAL: Duration = Duration::from_secs(1);

/// Map entries of one policy's exec rules, resolved to file identities.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecEntries {
    /// (kernel dev, inode) of exact files.
    pub files: StdHashMap<(u32, u64), RuleValue>,
    /// (kernel dev, inode) of prefix directories.
    pub dirs: StdHashMap<(u32, u64), RuleValue>,
    /// Paths that could not be used, with the reason (missing, not a directory, ...).
    pub skipped: Vec<(PathBuf, String)>,
    /// A path each identity was found at, by (is a prefix directory, key): what
    /// [`Sticky`] opens to follow a denied identity.
    pub origins: StdHashMap<(bool, FileKey), Origin>,
}

/// `(kernel dev, inode, is a directory)` of `path`, following symlinks, as the exec programs
/// read a file: the device is the superblock's (`i_sb->s_dev`).
pub fn identity(path: &Path) -> std::io::Result<(u32, u64, bool)> {
    statx_identity(rustix::fs::CWD, path, rustix::fs::AtFlags::empty())
}

/// [`identity`] of an open file.
fn identity_of_file(file: &std::fs::File) -> std::io::Result<(u32, u64, bool)> {
    statx_identity(file, Path::new(""), rustix::fs::AtFlags::EMPTY_PATH)
}

/// `stat()`'s device is not always the superblock's: btrfs reports each subvolume's anonymous
/// device, so a rule keyed by it would never match. The mount the file is on (`statx`'s mount
/// id) gives the superblock device instead (`/proc/self/mountinfo` prints `s_dev`); `stat()`'s
/// device is the fallback where the kernel has no mount id (before 5.8).
fn statx_identity(
    dirfd: impl std::os::fd::AsFd,
    path: &Path,
    flags: rustix::fs::AtFlags,
) -> std::io::Result<(u32, u64, bool)> {
    use rustix::fs::{FileType, StatxFlags};
    let st = rustix::fs::statx(
        dirfd,
        path,
        flags,
        StatxFlags::TYPE | StatxFlags::INO | StatxFlags::MNT_ID,
    )?;
    let by_stat = kernel_dev(st.stx_dev_major, st.stx_dev_minor);
    let dev = if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        mount_dev(st.stx_mnt_id).unwrap_or(by_stat)
    } else {
        by_stat
    };
    let dir = FileType::from_raw_mode(u32::from(st.stx_mode)) == FileType::Directory;
    Ok((dev, st.stx_ino, dir))
}

std::thread_local! {
    /// Mount id → superblock device, from `/proc/self/mountinfo` (read again on a miss).
    static MOUNT_DEVS: std::cell::RefCell<StdHashMap<u64, u32>> =
        std::cell::RefCell::new(StdHashMap::new());
}

/// The superblock device of mount `mnt_id` (for [`identity`]; a resolution pass reads its
/// view's mountinfo once instead, see [`View`]).
fn mount_dev(mnt_id: u64) -> Option<u32> {
    MOUNT_DEVS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(dev) = cache.get(&mnt_id) {
            return Some(*dev);
        }
        *cache = parse_mount_devs(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
        cache.get(&mnt_id).copied()
    })
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

/// Resolves exec rules to file identities in the agent's own view (see [`resolve_in`]).
pub fn resolve(rules: &[ExecRule]) -> ExecEntries {
    match View::agent() {
        Ok(v) => resolve_in(rules, &[v]),
        Err(e) => ExecEntries {
            skipped: vec![(PathBuf::from("/proc/self"), e.to_string())],
            ..ExecEntries::default()
        },
    }
}

/// Resolves exec rules to file identities in each of `views` (the agent's, and the
/// containers' of the principals under these rules): the union of what each path is in each
/// view. Exact paths must not be directories; prefixes (with or without a trailing `/`) must
/// be directories. Paths missing from the agent's view are reported in `skipped`; a path a
/// container lacks is normal (one policy, several images) and is not. A view that cannot be
/// opened (its processes gone) adds nothing.
pub fn resolve_in(rules: &[ExecRule], views: &[View]) -> ExecEntries {
    let mut out = ExecEntries::default();
    for view in views {
        match view.open() {
            Ok(opened) => resolve_view(&mut out, rules, &opened),
            Err(e) => tracing::debug!(view = ?view.key, error = %e, "exec rule view gone"),
        }
    }
    out
}

fn resolve_view(out: &mut ExecEntries, rules: &[ExecRule], view: &Opened) {
    let agent = view.view.is_agent();
    let origin = |path: &Path| {
        if agent {
            Origin::Path(path.to_path_buf())
        } else {
            Origin::View(view.view.key)
        }
    };
    let skip = |out: &mut ExecEntries, path: PathBuf, why: String| {
        if agent {
            out.skipped.push((path, why));
        }
    };
    let mut memo = StdHashMap::new();
    for rule in rules {
        for p in &rule.exact {
            let path = PathBuf::from(p);
            match view.identity(&path) {
                Ok((_, _, true)) => skip(out, path, "is a directory (use a prefix rule)".into()),
                Ok((dev, ino, false)) => {
                    add(&mut out.files, (dev, ino), rule);
                    out.origins
                        .entry((false, (dev, ino)))
                        .or_insert_with(|| origin(&path));
                }
                Err(e) => skip(out, path, e.to_string()),
            }
        }
        for p in &rule.prefixes {
            let path = PathBuf::from(p);
            match view.identity(&path) {
                Ok((dev, ino, true)) => {
                    add(&mut out.dirs, (dev, ino), rule);
                    out.origins
                        .entry((true, (dev, ino)))
                        .or_insert_with(|| origin(&path));
                    // The kernel's ancestor walk stops at a filesystem's root: a filesystem
                    // mounted below the prefix is covered through its mount point's identity.
                    for m in view.mounts_below((dev, ino), &mut memo) {
                        if let Ok((dev, ino, true)) = view.identity(&m) {
                            add(&mut out.dirs, (dev, ino), rule);
                            out.origins
                                .entry((true, (dev, ino)))
                                .or_insert_with(|| origin(&m));
                        }
                    }
                }
                Ok((_, _, false)) => skip(out, path, "is not a directory".into()),
                Err(e) => skip(out, path, e.to_string()),
            }
        }
    }
}

/// Where an identity was found: a path in the agent's view (which [`Sticky`] can open and
/// hold), or a container's view (not held open, see [`Sticky`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Path(PathBuf),
    View(ViewKey),
}

/// A map key: `(kernel dev, inode)`.
pub type FileKey = (u32, u64);

/// Map updates that turn one resolution into another, per map (exact files, prefix dirs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EntriesDiff {
    /// Keys to insert or overwrite, with their new values.
    pub files_set: Vec<(FileKey, RuleValue)>,
    pub dirs_set: Vec<(FileKey, RuleValue)>,
    /// Keys to delete.
    pub files_gone: Vec<FileKey>,
    pub dirs_gone: Vec<FileKey>,
}

impl EntriesDiff {
    pub fn is_empty(&self) -> bool {
        self.files_set.is_empty()
            && self.dirs_set.is_empty()
            && self.files_gone.is_empty()
            && self.dirs_gone.is_empty()
    }
}

fn diff_map(
    old: &StdHashMap<FileKey, RuleValue>,
    new: &StdHashMap<FileKey, RuleValue>,
) -> (Vec<(FileKey, RuleValue)>, Vec<FileKey>) {
    let mut set: Vec<_> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let mut gone: Vec<_> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .copied()
        .collect();
    set.sort_unstable_by_key(|(k, _)| *k);
    gone.sort_unstable();
    (set, gone)
}

impl ExecEntries {
    /// The updates from `self` (installed) to `new` (just resolved). Applied sets first, then
    /// deletes, a reader sees at every instant each identity with its old or its new value,
    /// and the old and new identities of a replaced path both present for a moment, never
    /// neither: a deny rule never lapses during the update.
    pub fn diff(&self, new: &ExecEntries) -> EntriesDiff {
        let (files_set, files_gone) = diff_map(&self.files, &new.files);
        let (dirs_set, dirs_gone) = diff_map(&self.dirs, &new.dirs);
        EntriesDiff {
            files_set,
            dirs_set,
            files_gone,
            dirs_gone,
        }
    }
}

/// A denied identity followed after it leaves its path: held open (the agent's view), or
/// remembered for as long as its container's view lives.
#[derive(Debug)]
struct Held {
    deny_rule: u32,
    how: Hold,
}

#[derive(Debug)]
enum Hold {
    /// Open (`O_PATH`): denied while the file has a link.
    File(std::fs::File),
    /// Found in a container's view: denied while that view is among the live ones. Not held
    /// open, so a container's overlay is never kept mounted by the agent; the cost is that an
    /// identity whose file is deleted stays denied until the container goes (fail closed: at
    /// worst an unrelated new file reusing the inode number there is denied too).
    View(ViewKey),
}

/// The denied identities of one installed policy, followed off their paths (see the module
/// docs).
#[derive(Debug, Default)]
pub struct Sticky(StdHashMap<(bool, FileKey), Held>);

fn open_path(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .ok()
}

impl Sticky {
    /// Identities followed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What the maps should hold for `fresh` (the rules just resolved in the views `live`):
    /// `fresh`, plus the deny of every followed identity that left its path but still has a
    /// link (or whose container view is still live). Newly denied identities in `fresh` are
    /// followed; those with no link left, or whose view is gone, are let go.
    pub fn apply(&mut self, fresh: &ExecEntries, live: &[ViewKey]) -> ExecEntries {
        let mut out = fresh.clone();
        for ((dir, key), origin) in &fresh.origins {
            let map = if *dir { &fresh.dirs } else { &fresh.files };
            let Some(v) = map.get(key) else { continue };
            if v.deny_rule == NONE || self.0.contains_key(&(*dir, *key)) {
                continue;
            }
            let how = match origin {
                // Opened, then checked: the path may have moved on since it was statted.
                Origin::Path(path) => match open_path(path) {
                    Some(file)
                        if identity_of_file(&file)
                            .is_ok_and(|(dev, ino, _)| (dev, ino) == *key) =>
                    {
                        Hold::File(file)
                    }
                    _ => continue,
                },
                Origin::View(view) => Hold::View(*view),
            };
            let deny_rule = v.deny_rule;
            self.0.insert((*dir, *key), Held { deny_rule, how });
        }
        self.0.retain(|(dir, key), held| {
            let map = if *dir { &mut out.dirs } else { &mut out.files };
            if map.get(key).is_some_and(|v| v.deny_rule != NONE) {
                return true;
            }
            let keep = match &held.how {
                Hold::File(file) => file
                    .metadata()
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) > 0),
                Hold::View(view) => live.contains(view),
            };
            if keep {
                let e = map.entry(*key).or_insert(RuleValue {
                    allow_rule: NONE,
                    deny_rule: NONE,
                });
                merge_rules(
                    e,
                    &RuleValue {
                        allow_rule: NONE,
                        deny_rule: held.deny_rule,
                    },
                );
            }
            keep
        });
        out
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

    #[test]
    fn diff_follows_a_replaced_file_and_a_path_that_appears() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("corral-exec-diff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let bin = dir.join("bin");
        std::fs::write(&bin, b"old")?;
        let later = dir.join("later");
        let rules = [rule(0, Action::Deny, &[&bin, &later], &[])];
        let before = resolve(&rules);
        assert_eq!(before.files.len(), 1);
        assert!(before.diff(&resolve(&rules)).is_empty(), "nothing changed");

        // Replace by rename (a new inode), and create the missing path. A hard link keeps the
        // old inode allocated, so the new files cannot reuse its number.
        let (old_dev, old_ino, _) = identity(&bin)?;
        std::fs::hard_link(&bin, dir.join("keep"))?;
        let tmp = dir.join("bin.new");
        std::fs::write(&tmp, b"new")?;
        std::fs::rename(&tmp, &bin)?;
        std::fs::write(&later, b"x")?;
        let after = resolve(&rules);
        let d = before.diff(&after);
        let (dev, ino, _) = identity(&bin)?;
        let (ldev, lino, _) = identity(&later)?;
        assert_ne!(ino, old_ino);
        let deny = RuleValue {
            allow_rule: NONE,
            deny_rule: 0,
        };
        let mut want = vec![((dev, ino), deny), ((ldev, lino), deny)];
        want.sort_unstable_by_key(|(k, _)| *k);
        assert_eq!(d.files_set, want);
        assert_eq!(d.files_gone, vec![(old_dev, old_ino)]);
        assert!(d.dirs_set.is_empty() && d.dirs_gone.is_empty());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn sticky_keeps_a_moved_denied_file_denied_and_lets_a_replaced_one_go() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("corral-exec-sticky-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let bin = dir.join("bin");
        let other = dir.join("other");
        std::fs::write(&bin, b"1")?;
        std::fs::write(&other, b"2")?;
        let rules = [rule(0, Action::Deny, &[&bin, &other], &[])];
        let mut sticky = Sticky::default();
        let first = sticky.apply(&resolve(&rules), &[]);
        assert_eq!(sticky.len(), 2, "both denied identities held");
        let (bdev, bino, _) = identity(&bin)?;
        let (odev, oino, _) = identity(&other)?;

        // `bin` moves away (same inode, new name); `other` is replaced by rename.
        std::fs::rename(&bin, dir.join("moved"))?;
        std::fs::write(dir.join("other.new"), b"3")?;
        std::fs::rename(dir.join("other.new"), &other)?;
        let (ndev, nino, _) = identity(&other)?;
        let fresh = resolve(&rules);
        assert!(
            !fresh.files.contains_key(&(bdev, bino)),
            "no path leads to it"
        );
        let next = sticky.apply(&fresh, &[]);
        let deny = RuleValue {
            allow_rule: NONE,
            deny_rule: 0,
        };
        assert_eq!(
            next.files.get(&(bdev, bino)),
            Some(&deny),
            "moved: still denied"
        );
        assert_eq!(
            next.files.get(&(ndev, nino)),
            Some(&deny),
            "new file denied"
        );
        assert!(
            !next.files.contains_key(&(odev, oino)),
            "the replaced file has no link left: let go"
        );
        assert_eq!(sticky.len(), 2, "the moved and the new identity");
        let d = first.diff(&next);
        assert_eq!(d.files_set, vec![((ndev, nino), deny)]);
        assert_eq!(d.files_gone, vec![(odev, oino)]);

        // Removing the moved file's last link lets it go as well.
        std::fs::remove_file(dir.join("moved"))?;
        let last = sticky.apply(&resolve(&rules), &[]);
        assert!(!last.files.contains_key(&(bdev, bino)));
        assert_eq!(sticky.len(), 1);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
