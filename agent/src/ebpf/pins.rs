//! Pins under bpffs (`/sys/fs/bpf/corral` by default): maps in `maps/`, program links in
//! `links/`. Pinned links keep enforcement in force when the agent is killed or upgrading;
//! pinned maps carry principals, policy and chaining state across agent restarts.
//!
//! Adoption without a window: a new agent loads its programs against the pinned maps (same
//! state), attaches new links next to the old ones (cgroup links coexist), pins each new link
//! at `<name>-new` (bpffs refuses names with a dot), then removes the old pin (detaching the old link) and renames the new pin
//! into place. At every instant at least one set of programs reading the same maps is attached.
//!
//! Pins of another Corral version: a pinned map whose layout (type, key and value size,
//! entries, flags) differs from this agent's definition cannot be adopted (the programs would
//! not load against it). A map that holds only per-socket or per-CPU state, which the old
//! programs keep using until their links are replaced, is unpinned and made afresh (what it
//! held for sockets opened before is lost, and said so in the log). Any other map holds
//! principals, policy or session state that must not be dropped silently: the agent refuses
//! to start and names the map and the way out ([`check_layouts`]).
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use tracing::{debug, info};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("create pin directory {path} (is bpffs mounted at its parent?)")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("pin link at {path}")]
    PinFd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replace pinned link {path}")]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("remove pin {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read the kernel object's map names")]
    Object(#[source] aya_obj::ParseError),
    #[error(
        "pinned map {name} was made by another Corral version ({detail}); stop its enforcement \
         with that version's `corral-agent --uninstall` (or remove {dir}), then start again"
    )]
    Incompatible {
        name: String,
        detail: String,
        dir: PathBuf,
    },
    #[error("read pinned map {path}")]
    Info {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Maps that hold only per-socket or per-CPU state: made afresh when their pinned layout
/// differs (see the module docs).
pub const REBUILDABLE: &[&str] = &[
    agent_common::maps::SOCKS,
    agent_common::maps::DNS_ORIG,
    agent_common::maps::WAKE,
    agent_common::maps::UNENROLLED,
    agent_common::maps::SOCK_CG_CFG,
];

/// Checks every pinned map against the object's definition before the object is loaded:
/// a rebuildable map of another layout is unpinned (returned, to be logged); any other is an
/// error naming it.
pub fn check_layouts(pins: &PinDir, object: &[u8]) -> Result<Vec<String>, PinError> {
    let obj = aya_obj::Object::parse(object).map_err(PinError::Object)?;
    let mut rebuilt = Vec::new();
    for (name, def) in obj.maps.iter().filter(|(n, _)| n.starts_with("CORRAL_")) {
        let path = pins.map_path(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| PinError::Info {
            path: path.clone(),
            source,
        })?;
        let want = (def.key_size(), def.value_size(), def.max_entries());
        let have = (info.key_size(), info.value_size(), info.max_entries());
        if want == have {
            continue;
        }
        let detail = format!(
            "key/value size, entries: pinned {}/{}/{}, this agent {}/{}/{}",
            have.0, have.1, have.2, want.0, want.1, want.2
        );
        if !REBUILDABLE.contains(&name.as_str()) {
            return Err(PinError::Incompatible {
                name: name.clone(),
                detail,
                dir: pins.root().to_path_buf(),
            });
        }
        remove_pin(&path)?;
        info!(map = %name, %detail, "pinned map of another layout made afresh: state it held for sockets opened before is lost");
        rebuilt.push(name.clone());
    }
    Ok(rebuilt)
}

/// The pin directory layout.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link_path(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Whether an earlier agent left pinned state here (this start adopts it).
    pub fn has_state(&self) -> bool {
        std::fs::read_dir(self.maps_dir()).is_ok_and(|mut d| d.next().is_some())
    }

    pub fn create(&self) -> Result<(), PinError> {
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| PinError::Dir { path: dir, source })?;
        }
        Ok(())
    }

    /// Pins `link` as the link of `program`, replacing (and thereby detaching) an older pinned
    /// link only once the new one is pinned.
    pub fn install_link(&self, program: &str, link: FdLink) -> Result<(), PinError> {
        self.install(program, |staged| {
            // The pin holds the link; the returned handle is only an fd.
            link.pin(staged).map(drop).map_err(|source| PinError::Pin {
                path: staged.into(),
                source,
            })
        })
    }

    /// [`Self::install_link`] for a link aya does not wrap (the unix hooks): `link` is a
    /// bpf_link fd.
    pub fn install_link_fd(
        &self,
        program: &str,
        link: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), PinError> {
        self.install(program, |staged| {
            super::raw::pin_fd(link, staged).map_err(|source| PinError::PinFd {
                path: staged.into(),
                source,
            })
        })
    }

    fn install(
        &self,
        program: &str,
        pin: impl FnOnce(&Path) -> Result<(), PinError>,
    ) -> Result<(), PinError> {
        let path = self.link_path(program);
        let staged = self.link_path(&format!("{program}-new"));
        // A stale staging pin from an interrupted start: detach it (the old link at `path`,
        // if any, still enforces).
        remove_pin(&staged)?;
        pin(&staged)?;
        if path.exists() {
            match PinnedLink::from_pin(&path) {
                Ok(old) => {
                    let _old_fd = old.unpin().map_err(|source| PinError::Replace {
                        path: path.clone(),
                        source,
                    })?;
                    debug!(program, "detached the previous agent's link");
                }
                Err(_) => remove_pin(&path)?,
            }
        }
        std::fs::rename(&staged, &path).map_err(|source| PinError::Replace {
            path: path.clone(),
            source,
        })
    }

    /// Names of the pinned links.
    pub fn link_names(&self) -> Vec<String> {
        std::fs::read_dir(self.links_dir())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes the pinned link of `program` (detaching it, if nothing else holds it).
    pub fn remove_link(&self, program: &str) -> Result<(), PinError> {
        remove_pin(&self.link_path(program))
    }

    /// Removes every pin: links first (detaching the programs), then maps.
    pub fn uninstall(&self) -> Result<(), PinError> {
        for dir in [self.links_dir(), self.maps_dir()] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    remove_pin(&e.path())?;
                }
            }
            remove_dir(&dir)?;
        }
        remove_dir(&self.root)?;
        info!(pins = %self.root.display(), "uninstalled: programs detached, maps unpinned");
        Ok(())
    }
}

fn remove_pin(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PinError::Remove {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PinError::Remove {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Names of Corral's own maps in the kernel object (not aya's internal ones).
pub fn map_names(object: &[u8]) -> Result<Vec<String>, PinError> {
    let obj = aya_obj::Object::parse(object).map_err(PinError::Object)?;
    let mut names: Vec<String> = obj
        .maps
        .keys()
        .filter(|n| n.starts_with("CORRAL_"))
        .cloned()
        .collect();
    names.sort();
    Ok(names)
}
