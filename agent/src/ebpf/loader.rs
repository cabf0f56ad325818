//! Loading the object and attaching its programs.
//!
//! The cgroup sock_addr programs (connect4/6, sendmsg4/6) are attached as bpf_links (kernel
//! 5.7 or later). Cgroup links always coexist with other programs on the same hook (the kernel treats
//! them as `BPF_F_ALLOW_MULTI`, and rejects explicit flags), so an upgrading agent can attach
//! its programs before the old ones go away, and other cgroup programs on the node keep
//! working.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use tracing::info;

use super::maps::{MapError, PolicyMaps};

/// The sock_addr programs, by the names of their functions in `agent-ebpf`.
pub const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("load the kernel object")]
    Object(#[source] aya::EbpfError),
    #[error("program {name} is missing from the kernel object")]
    MissingProgram { name: &'static str },
    #[error("load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attach {name} to {path}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("take the link of {name} as a bpf_link (kernel >= 5.7 needed)")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error(transparent)]
    Maps(#[from] MapError),
}

/// Loaded programs, their links, and the typed maps. Dropping it detaches the programs
/// (pinning keeps them in force beyond the process; see the pinning work).
pub struct Enforcer {
    // Field order matters: links drop before the object.
    links: Vec<FdLink>,
    maps: PolicyMaps,
    _ebpf: Ebpf,
}

impl Enforcer {
    /// Loads the embedded object and attaches the sock_addr programs to `cgroup`
    /// (normally the cgroup v2 root).
    pub fn load_and_attach(cgroup: &Path) -> Result<Self, LoadError> {
        let mut ebpf = EbpfLoader::new()
            .load(super::object::bytes())
            .map_err(LoadError::Object)?;
        let cg = File::open(cgroup).map_err(|source| LoadError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let mut links = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram { name })?
                .try_into()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.load()
                .map_err(|source| LoadError::Program { name, source })?;
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(|source| LoadError::Attach {
                    name,
                    path: cgroup.into(),
                    source,
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| LoadError::Program { name, source })?;
            let link = FdLink::try_from(link).map_err(|source| LoadError::Link { name, source })?;
            links.push(link);
            info!(program = name, cgroup = %cgroup.display(), "attached");
        }
        let maps = PolicyMaps::take(&mut ebpf)?;
        Ok(Self {
            links,
            maps,
            _ebpf: ebpf,
        })
    }

    pub fn maps(&mut self) -> &mut PolicyMaps {
        &mut self.maps
    }

    /// Number of attached program links.
    pub fn attached(&self) -> usize {
        self.links.len()
    }
}
