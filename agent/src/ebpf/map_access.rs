//! Taking maps out of the loaded object as their typed wrappers, and naming a failed map
//! operation: shared by the policy map layer ([`super::maps`]) and the exec map layer
//! ([`super::exec`]), so neither depends on the other for them.

use aya::Ebpf;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {name} is missing from the kernel object")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type or size")]
    Type {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{op} in map {name}")]
    Op {
        op: &'static str,
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attach the packet programs to a principal's cgroup")]
    Coverage(#[from] super::coverage::CoverageError),
    #[error("policy key {policy}: unix socket {path} does not fit sun_path")]
    UnixPath { policy: u32, path: String },
    #[error("policy {policy}: zone index {zone} out of range (at most {max} zones per policy)")]
    TooManyZones {
        policy: String,
        zone: usize,
        max: u32,
    },
}

/// Takes map `name` out of the loaded object as its typed wrapper.
pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapError::Missing { name })?;
    T::try_from(map).map_err(|source| MapError::Type { name, source })
}

/// Names the failed map operation in the error.
pub(super) fn op(
    op: &'static str,
    name: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |source| MapError::Op { op, name, source }
}
