//! Seeding the `STICKY_MARK` bitmap from `STICKY` when the bitmap is new but sticky entries
//! exist: the pinned state of an agent whose programs kept `STICKY` without marks. The programs
//! skip the `STICKY` lookup for a pid whose mark is clear, so an unmarked entry would leave a
//! process that left its principal's cgroup un-policed.
//!
//! Run before the new programs are attached: the map is new, so nothing else writes it yet,
//! and a read-modify-write of a word loses nothing. (The previous agent's programs may still
//! insert entries until their links are replaced, for a moment; those are not marked.)

use agent_common::maps as names;
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};

use super::map_access::{MapError, op};

/// Sets the mark of every pid in `STICKY`; returns how many were set.
pub fn seed(ebpf: &mut Ebpf) -> Result<usize, MapError> {
    let pids: Vec<u32> = {
        let map = ebpf.map(names::STICKY).ok_or(MapError::Missing {
            name: names::STICKY,
        })?;
        let sticky: HashMap<&MapData, u32, u64> =
            HashMap::try_from(map).map_err(|source| MapError::Type {
                name: names::STICKY,
                source,
            })?;
        sticky.keys().filter_map(Result::ok).collect()
    };
    if pids.is_empty() {
        return Ok(0);
    }
    let map = ebpf.map_mut(names::STICKY_MARK).ok_or(MapError::Missing {
        name: names::STICKY_MARK,
    })?;
    let mut marks: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|source| MapError::Type {
            name: names::STICKY_MARK,
            source,
        })?;
    for pid in &pids {
        let word = pid >> 6;
        let w = marks
            .get(&word, 0)
            .map_err(op("read", names::STICKY_MARK))?;
        marks
            .set(word, w | 1u64 << (pid & 63), 0)
            .map_err(op("update", names::STICKY_MARK))?;
    }
    Ok(pids.len())
}
