//! The event path: ring buffer → decode → enrichment (principal from the registry; policy
//! name, zone and revision from the map generation; ppid, binary and argv from `/proc`, or
//! from the exec event itself) → the [`Hub`] (subscribers, history) and the audit log.
//!
//! Nothing here panics or blocks on a consumer. Lost events are counted: in the kernel
//! (`DROPS` map, ring full), undecodable ones here, and per subscriber in the hub.

use std::{
    collections::HashMap,
    io::Write as _,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::{
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, PROTO_TCP, PROTO_UDP,
};
use corral_proto::v1 as pb;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, warn};

use super::{Shared, hub::Hub, shutdown::ShutdownSignal};
use crate::ebpf::events::{ConnectDecision, Event, EventReader, ExecDecision, Reason, Verdict};

/// Decisions by verdict and reason, for metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// `[verdict][reason]`, indices as in [`verdict_index`] / [`reason_index`].
    pub decisions: [[AtomicU64; 5]; 3],
    pub undecodable: AtomicU64,
    pub audit_errors: AtomicU64,
}

pub const VERDICTS: [&str; 3] = ["allow", "deny", "audit-deny"];
pub const REASONS: [&str; 5] = ["rule", "default", "chaining", "grant", "no-policy"];

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Allow => 0,
        Verdict::Deny => 1,
        Verdict::AuditDeny => 2,
    }
}

fn reason_index(r: Reason) -> usize {
    match r {
        Reason::Rule => 0,
        Reason::Default => 1,
        Reason::Chaining => 2,
        Reason::Grant => 3,
        Reason::NoPolicy => 4,
    }
}

fn verdict_pb(v: Verdict) -> pb::Verdict {
    match v {
        Verdict::Allow => pb::Verdict::Allow,
        Verdict::Deny => pb::Verdict::Deny,
        Verdict::AuditDeny => pb::Verdict::AuditDeny,
    }
}

fn reason_pb(r: Reason) -> pb::Reason {
    match r {
        Reason::Rule => pb::Reason::Rule,
        Reason::Default => pb::Reason::Default,
        Reason::Chaining => pb::Reason::Chaining,
        Reason::Grant => pb::Reason::Grant,
        Reason::NoPolicy => pb::Reason::NoPolicy,
    }
}

fn hook_name(h: u8) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        _ => "unknown",
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "",
    }
}

/// What `/proc` says about a process (cached briefly: events come in bursts per process).
#[derive(Debug, Clone, Default)]
struct ProcInfo {
    ppid: u32,
    binary: String,
    argv: Vec<String>,
}

const PROC_TTL: Duration = Duration::from_secs(1);
const PROC_CACHE_MAX: usize = 4096;

fn read_proc(pid: u32) -> ProcInfo {
    let base = PathBuf::from(format!("/proc/{pid}"));
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
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; split after the last `)`.
    let ppid = std::fs::read_to_string(base.join("stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    ProcInfo { ppid, binary, argv }
}

/// The image a pid last exec'd, from exec events: processes that exit before their events are
/// read still get their binary and argv.
#[derive(Debug, Clone)]
struct ExecInfo {
    binary: String,
    argv: Vec<String>,
    exec_id: u64,
    parent_exec_id: u64,
    ppid: u32,
}

const EXEC_TABLE_MAX: usize = 16_384;

struct Enricher {
    shared: Arc<Shared>,
    procs: HashMap<u32, (Instant, ProcInfo)>,
    execs: HashMap<u32, ExecInfo>,
    exec_order: std::collections::VecDeque<u32>,
    batch: Vec<Arc<pb::Event>>,
}

impl Enricher {
    fn proc(&mut self, pid: u32) -> ProcInfo {
        let now = Instant::now();
        if let Some((at, p)) = self.procs.get(&pid)
            && now.duration_since(*at) < PROC_TTL
        {
            return p.clone();
        }
        if self.procs.len() >= PROC_CACHE_MAX {
            self.procs
                .retain(|_, (at, _)| now.duration_since(*at) < PROC_TTL);
        }
        let p = read_proc(pid);
        self.procs.insert(pid, (now, p.clone()));
        p
    }

    fn remember_exec(&mut self, pid: u32, info: ExecInfo) {
        if self.execs.insert(pid, info).is_none() {
            self.exec_order.push_back(pid);
        }
        while self.execs.len() > EXEC_TABLE_MAX {
            match self.exec_order.pop_front() {
                Some(old) => {
                    self.execs.remove(&old);
                }
                None => break,
            }
        }
    }

    fn principal(&self, index: u32, cgroup_id: u64) -> pb::Principal {
        match self.shared.registry.get(index) {
            Some(r) => pb::Principal {
                identity: r.identity.clone(),
                session: r.session.clone(),
                cgroup_id,
            },
            None => pb::Principal {
                cgroup_id,
                ..Default::default()
            },
        }
    }

    fn decision(
        &self,
        verdict: Verdict,
        reason: Reason,
        policy: Option<u32>,
        rule: Option<u32>,
        zone: Option<u32>,
        grant_id: u64,
    ) -> (pb::Decision, String) {
        let state = self.shared.policy_state();
        let generation = policy.and_then(|k| state.by_key(k).cloned());
        let slot = policy.map(|k| k & 0x7fff_ffff);
        let name = match (&generation, slot) {
            (Some(g), Some(s)) => g.policy_name(s).unwrap_or_default().to_owned(),
            _ => String::new(),
        };
        let zone_name = match (&generation, slot, zone) {
            (Some(g), Some(s), Some(z)) => g.zone_name(s, z).unwrap_or_default().to_owned(),
            _ => String::new(),
        };
        let d = pb::Decision {
            verdict: verdict_pb(verdict) as i32,
            reason: reason_pb(reason) as i32,
            policy: name,
            revision: generation.map_or(0, |g| g.revision),
            rule_index: rule,
            grant_id: if grant_id == 0 {
                String::new()
            } else {
                grant_id.to_string()
            },
            grant_available: String::new(),
        };
        (d, zone_name)
    }

    fn count(&self, v: Verdict, r: Reason) {
        self.shared.counters.decisions[verdict_index(v)][reason_index(r)]
            .fetch_add(1, Ordering::Relaxed);
    }

    fn connect(&mut self, c: &ConnectDecision, boot_to_unix: i128) -> pb::Event {
        self.count(c.verdict, c.reason);
        let (decision, zone) =
            self.decision(c.verdict, c.reason, c.policy, c.rule, c.zone, c.grant_id);
        let (ppid, binary, argv, exec_id, parent_exec_id) = match self.execs.get(&c.pid) {
            Some(x) => (
                x.ppid,
                x.binary.clone(),
                x.argv.clone(),
                x.exec_id,
                x.parent_exec_id,
            ),
            None => {
                let p = self.proc(c.pid);
                (p.ppid, p.binary, p.argv, 0, 0)
            }
        };
        pb::Event {
            seq: c.seq,
            time_unix_nano: to_unix(c.time_ns, boot_to_unix),
            node: self.shared.resolved.node.clone(),
            principal: Some(self.principal(c.principal, c.cgroup_id)),
            process: Some(pb::Process {
                pid: c.pid,
                ppid,
                uid: c.uid,
                binary,
                argv,
                exec_id,
                parent_exec_id,
            }),
            call: Some(pb::event::Call::Connect(pb::ConnectCall {
                family: if c.addr.is_ipv4() { "ipv4" } else { "ipv6" }.into(),
                protocol: proto_name(c.proto).into(),
                destination: c.addr.to_string(),
                port: u32::from(c.port),
                zone,
                hook: hook_name(c.hook).into(),
            })),
            decision: Some(decision),
            suppressed: c.suppressed,
        }
    }

    fn exec(&mut self, x: &ExecDecision, boot_to_unix: i128) -> pb::Event {
        self.count(x.verdict, x.reason);
        // A new image: whatever was cached for the pid is stale.
        self.procs.remove(&x.pid);
        let (decision, _) = self.decision(x.verdict, x.reason, x.policy, x.rule, None, 0);
        let ppid = self
            .execs
            .get(&x.pid)
            .map(|e| e.ppid)
            .filter(|p| *p != 0)
            .unwrap_or_else(|| read_proc(x.pid).ppid);
        // An exec that happened (exec_id != 0) is the pid's image from now on.
        if x.exec_id != 0 && x.verdict != Verdict::Deny {
            self.remember_exec(
                x.pid,
                ExecInfo {
                    binary: x.path.clone(),
                    argv: x.argv.clone(),
                    exec_id: x.exec_id,
                    parent_exec_id: x.parent_exec_id,
                    ppid,
                },
            );
        }
        pb::Event {
            seq: x.seq,
            time_unix_nano: to_unix(x.time_ns, boot_to_unix),
            node: self.shared.resolved.node.clone(),
            principal: Some(self.principal(x.principal, x.cgroup_id)),
            process: Some(pb::Process {
                pid: x.pid,
                ppid,
                uid: x.uid,
                binary: x.path.clone(),
                argv: x.argv.clone(),
                exec_id: x.exec_id,
                parent_exec_id: x.parent_exec_id,
            }),
            call: Some(pb::event::Call::Exec(pb::ExecCall {
                path: x.path.clone(),
            })),
            decision: Some(decision),
            suppressed: 0,
        }
    }
}

fn to_unix(boot_ns: u64, boot_to_unix: i128) -> u64 {
    u64::try_from(i128::from(boot_ns) + boot_to_unix).unwrap_or(0)
}

/// Unix time minus CLOCK_BOOTTIME, in ns.
fn boot_to_unix() -> i128 {
    let boot = crate::clock::boottime_ns().unwrap_or(0);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    i128::try_from(unix).unwrap_or(0) - i128::from(boot)
}

/// JSON-lines audit log with size-based rotation (`FILE` → `FILE.1`).
pub struct AuditLog {
    path: PathBuf,
    max: u64,
    out: Option<std::io::BufWriter<std::fs::File>>,
    size: u64,
}

impl AuditLog {
    pub fn open(path: PathBuf, max: u64) -> std::io::Result<Self> {
        let mut a = Self {
            path,
            max: max.max(4096),
            out: None,
            size: 0,
        };
        a.reopen()?;
        Ok(a)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = f.metadata()?.len();
        self.out = Some(std::io::BufWriter::new(f));
        Ok(())
    }

    pub fn write(&mut self, events: &[Arc<pb::Event>]) -> std::io::Result<()> {
        for e in events {
            if self.size >= self.max {
                if let Some(mut o) = self.out.take() {
                    o.flush()?;
                }
                let mut rotated = self.path.clone().into_os_string();
                rotated.push(".1");
                std::fs::rename(&self.path, rotated)?;
                self.reopen()?;
            }
            let mut line = super::render::event_json(e, None).to_string();
            line.push('\n');
            let out = match self.out.as_mut() {
                Some(o) => o,
                None => {
                    self.reopen()?;
                    self.out
                        .as_mut()
                        .ok_or_else(|| std::io::Error::other("audit log not open"))?
                }
            };
            out.write_all(line.as_bytes())?;
            self.size += line.len() as u64;
        }
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

struct ReaderFd(EventReader);

impl AsRawFd for ReaderFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring().as_raw_fd()
    }
}

/// How often the ring is drained even without a wakeup (the kernel may batch wakeups).
const POLL: Duration = Duration::from_millis(20);

fn drain(
    reader: &mut EventReader,
    enricher: &mut Enricher,
    hub: &Hub,
    audit: &mut Option<AuditLog>,
    raw: &mut Vec<Event>,
) {
    raw.clear();
    let before = reader.undecodable;
    reader.drain_all(raw);
    let bad = reader.undecodable - before;
    if bad > 0 {
        enricher
            .shared
            .counters
            .undecodable
            .fetch_add(bad, Ordering::Relaxed);
    }
    if raw.is_empty() {
        return;
    }
    let offset = boot_to_unix();
    // Bounded batches into a reused buffer: no large allocation is freed per drain (with glibc
    // that triggers heap consolidation, which dominated the profile at high event rates).
    let mut batch = std::mem::take(&mut enricher.batch);
    for chunk in raw.chunks(PUBLISH_BATCH) {
        batch.clear();
        batch.extend(chunk.iter().map(|e| {
            Arc::new(match e {
                Event::Connect(c) => enricher.connect(c, offset),
                Event::Exec(x) => enricher.exec(x, offset),
            })
        }));
        if let Some(a) = audit.as_mut()
            && let Err(e) = a.write(&batch)
        {
            enricher
                .shared
                .counters
                .audit_errors
                .fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "write the audit log");
        }
        hub.publish(&batch);
    }
    batch.clear();
    enricher.batch = batch;
}

/// Events enriched and published per hub lock.
const PUBLISH_BATCH: usize = 1024;

/// Reads the ring buffer until shutdown, then drains what is left.
pub async fn run(
    shared: Arc<Shared>,
    reader: EventReader,
    mut audit: Option<AuditLog>,
    mut stop: ShutdownSignal,
) {
    let mut enricher = Enricher {
        shared: shared.clone(),
        procs: HashMap::new(),
        execs: HashMap::new(),
        exec_order: std::collections::VecDeque::new(),
        batch: Vec::with_capacity(PUBLISH_BATCH),
    };
    let mut raw = Vec::with_capacity(1024);
    // `register_with_interest` is `unsafe`; this crate forbids unsafe code. The I/O-safety
    // concern (the fd closed while registered) cannot arise: `ReaderFd` owns the ring buffer,
    // and the AsyncFd owns `ReaderFd`, so the fd lives exactly as long as the registration.
    #[expect(
        deprecated,
        reason = "the safe constructor is sound here: the AsyncFd owns the fd"
    )]
    let registered = AsyncFd::with_interest(ReaderFd(reader), Interest::READABLE);
    let mut afd = match registered {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot wait on the ring buffer; events are not read");
            stop.wait().await;
            return;
        }
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            r = afd.readable_mut() => match r {
                Ok(mut guard) => {
                    drain(&mut guard.get_inner_mut().0, &mut enricher, &shared.hub, &mut audit, &mut raw);
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "wait on the ring buffer");
                    tokio::time::sleep(POLL).await;
                }
            },
            _ = tick.tick() => {
                drain(&mut afd.get_mut().0, &mut enricher, &shared.hub, &mut audit, &mut raw);
            }
        }
    }
    drain(
        &mut afd.get_mut().0,
        &mut enricher,
        &shared.hub,
        &mut audit,
        &mut raw,
    );
    debug!("event pipeline stopped");
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
    fn audit_log_rotates_by_size() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("corral-audit-{}", std::process::id()));
        let path = dir.join("audit.jsonl");
        let mut a = AuditLog::open(path.clone(), 4096)?;
        let e = Arc::new(pb::Event {
            seq: 1,
            ..Default::default()
        });
        let len = super::super::render::event_json(&e, None).to_string().len() + 1;
        let n = 4096 / len + 3;
        let batch: Vec<_> = (0..n).map(|_| e.clone()).collect();
        a.write(&batch)?;
        let rotated = dir.join("audit.jsonl.1");
        assert!(rotated.exists(), "rotated once past 4096 bytes");
        let cur = std::fs::read_to_string(&path)?;
        let old = std::fs::read_to_string(&rotated)?;
        assert_eq!(cur.lines().count() + old.lines().count(), n);
        assert!(old.len() as u64 >= 4096);
        for l in cur.lines() {
            assert!(serde_json::from_str::<serde_json::Value>(l).is_ok());
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
