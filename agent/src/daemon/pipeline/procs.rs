//! What the pipeline knows about processes: `/proc` lookups cached per pid (bounded, short
//! TTL), and the image each pid last exec'd, from exec events (bounded, oldest out first).
//! Entries are `Arc`s: a cache hit is a reference count, not a copy of binary and argv.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

/// What `/proc` says about a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub ppid: u32,
    pub binary: String,
    pub argv: Vec<String>,
}

pub fn read_proc(pid: u32) -> ProcInfo {
    let base = std::path::PathBuf::from(format!("/proc/{pid}"));
    let binary = std::fs::read_link(base.join("exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let argv = std::fs::read(base.join("cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    ProcInfo {
        ppid: read_ppid(pid),
        binary,
        argv,
    }
}

/// `pid (comm) state ppid ...`: comm may hold spaces and parentheses; split after the last `)`.
pub fn read_ppid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// `/proc` lookups, cached briefly per pid (events come in bursts per process; a pid's image
/// can change by exec, which [`ProcCache::forget`] handles, or by pid reuse, which the TTL
/// bounds).
pub struct ProcCache {
    entries: HashMap<u32, (Instant, Arc<ProcInfo>)>,
    ttl: Duration,
    max: usize,
    /// Lookups that read `/proc` (misses), for tests and tuning.
    pub reads: u64,
}

impl ProcCache {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            ttl,
            max: max.max(1),
            reads: 0,
        }
    }

    pub fn get(&mut self, pid: u32, now: Instant) -> Arc<ProcInfo> {
        if let Some((at, p)) = self.entries.get(&pid)
            && now.duration_since(*at) < self.ttl
        {
            return p.clone();
        }
        if self.entries.len() >= self.max {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if self.entries.len() >= self.max {
                self.entries.clear();
            }
        }
        self.reads += 1;
        let p = Arc::new(read_proc(pid));
        self.entries.insert(pid, (now, p.clone()));
        p
    }

    pub fn forget(&mut self, pid: u32) {
        self.entries.remove(&pid);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The image a pid last exec'd, from exec events: processes that exit before their events are
/// read still get their binary and argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecInfo {
    pub binary: String,
    pub argv: Vec<String>,
    pub exec_id: u64,
    pub parent_exec_id: u64,
    pub ppid: u32,
}

pub struct ExecTable {
    by_pid: HashMap<u32, Arc<ExecInfo>>,
    order: VecDeque<u32>,
    max: usize,
}

impl ExecTable {
    pub fn new(max: usize) -> Self {
        Self {
            by_pid: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
        }
    }

    pub fn get(&self, pid: u32) -> Option<&Arc<ExecInfo>> {
        self.by_pid.get(&pid)
    }

    pub fn insert(&mut self, pid: u32, info: ExecInfo) {
        if self.by_pid.insert(pid, Arc::new(info)).is_none() {
            self.order.push_back(pid);
        }
        while self.by_pid.len() > self.max {
            match self.order.pop_front() {
                Some(old) => {
                    self.by_pid.remove(&old);
                }
                None => break,
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_pid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_from_proc() {
        let p = read_proc(std::process::id());
        assert!(!p.binary.is_empty());
        assert!(!p.argv.is_empty());
        assert!(p.ppid > 0);
    }

    #[test]
    fn proc_cache_hits_within_ttl_and_stays_bounded() {
        let me = std::process::id();
        let mut c = ProcCache::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        let a = c.get(me, now);
        let b = c.get(me, now);
        assert!(Arc::ptr_eq(&a, &b), "a hit shares the entry");
        assert_eq!(c.reads, 1);
        c.get(me, now + Duration::from_secs(61));
        assert_eq!(c.reads, 2, "expired entries are read again");
        for pid in [1, 2, 3, 4] {
            c.get(pid, now);
        }
        assert!(c.len() <= 2);
        c.forget(4);
        c.get(4, now);
        assert_eq!(c.reads, 7);
    }

    #[test]
    fn exec_table_evicts_oldest_first() {
        let mut t = ExecTable::new(2);
        let info = |id| ExecInfo {
            binary: "/bin/x".into(),
            argv: vec![],
            exec_id: id,
            parent_exec_id: 0,
            ppid: 1,
        };
        t.insert(1, info(1));
        t.insert(2, info(2));
        t.insert(1, info(3));
        t.insert(3, info(4));
        assert_eq!(t.len(), 2);
        assert!(t.get(1).is_none(), "pid 1 was inserted first");
        assert_eq!(t.get(2).map(|e| e.exec_id), Some(2));
        assert_eq!(t.get(3).map(|e| e.exec_id), Some(4));
    }
}
