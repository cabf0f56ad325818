//! The event path: ring buffer → decode → enrichment (principal from the registry; policy
//! name, zone and revision from the map generation; ppid, binary and argv from `/proc`, or
//! from the exec event itself) → the [`Hub`] (subscribers, history) and the audit log.
//!
//! Nothing here panics or blocks on a consumer. Lost events are counted: in the kernel
//! (`DROPS` map, ring full), undecodable ones here, and per subscriber in the hub.

mod audit;
mod procs;

use std::{
    collections::HashMap,
    fmt::Write as _,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::{
    HOOK_CONNECT_UNIX, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG_UNIX, HOOK_SENDMSG4,
    HOOK_SENDMSG6, PROTO_TCP, PROTO_UDP,
};
use bytes::BytesMut;
use corral_proto::v1 as pb;
use prost::Message as _;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, warn};

pub use self::audit::AuditLog;
use self::procs::{ExecInfo, ExecTable, ProcCache};
use super::{
    Shared,
    hub::{Hub, HubEvent},
    policy::Generation,
    shutdown::ShutdownSignal,
};
use crate::ebpf::events::{ConnectDecision, Event, EventReader, ExecDecision, Reason, Verdict};

/// Decisions by verdict and reason, for metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// `[verdict][reason]`, indices as in [`verdict_index`] / [`reason_index`].
    pub decisions: [[AtomicU64; 5]; 3],
    pub undecodable: AtomicU64,
    pub audit_errors: AtomicU64,
    /// Allow events the kernel's per-principal rate limit suppressed, as reported by the events
    /// that carried the counts (`EventHeader::suppressed`).
    pub suppressed: AtomicU64,
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

pub(super) fn verdict_pb(v: Verdict) -> pb::Verdict {
    match v {
        Verdict::Allow => pb::Verdict::Allow,
        Verdict::Deny => pb::Verdict::Deny,
        Verdict::AuditDeny => pb::Verdict::AuditDeny,
    }
}

pub(super) fn reason_pb(r: Reason) -> pb::Reason {
    match r {
        Reason::Rule => pb::Reason::Rule,
        Reason::Default => pb::Reason::Default,
        Reason::Chaining => pb::Reason::Chaining,
        Reason::Grant => pb::Reason::Grant,
        Reason::NoPolicy => pb::Reason::NoPolicy,
    }
}

/// Whether a grant would turn this decision into an allow: denied (or audit-denied) by a rule
/// or the default action.
pub(super) fn grant_could_help(v: Verdict, r: Reason) -> bool {
    matches!(v, Verdict::Deny | Verdict::AuditDeny) && matches!(r, Reason::Rule | Reason::Default)
}

/// The grant template that would allow a connect denied by a rule or the default (not
/// chaining, which beats grants; not no-policy, which has no templates), from the generation
/// that decided it. A short scan of the policy's templates, no allocation.
fn grant_available<'a>(
    generations: &'a [Option<Arc<Generation>>; 2],
    c: &ConnectDecision,
) -> Option<&'a str> {
    if !grant_could_help(c.verdict, c.reason) {
        return None;
    }
    let key = c.policy?;
    let generation = generations[(key >> 31) as usize].as_ref()?;
    generation.grant_available(key & 0x7fff_ffff, c.zone?, c.port, c.proto)
}

fn hook_name(h: u8) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_CONNECT_UNIX => "connect_unix",
        HOOK_SENDMSG_UNIX => "sendmsg_unix",
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

const PROC_TTL: Duration = Duration::from_secs(1);
const PROC_CACHE_MAX: usize = 4096;
const EXEC_TABLE_MAX: usize = 16_384;
/// Principals whose identity is cached (cleared when full: a re-read is one registry lookup).
const PRINCIPAL_CACHE_MAX: usize = 16_384;
/// Encoded events are carved out of blocks of this size: one allocation per block, freed when
/// the last event in it has left every queue and the history.
const ENCODE_BLOCK: usize = 64 * 1024;

/// A principal as events name it, cached by kernel index.
struct PrincipalNames {
    identity: Arc<str>,
    session: Arc<str>,
}

fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

fn set_argv(dst: &mut Vec<String>, src: &[String]) {
    dst.truncate(src.len());
    for (i, a) in src.iter().enumerate() {
        match dst.get_mut(i) {
            Some(d) => set(d, a),
            None => dst.push(a.clone()),
        }
    }
}

/// Turns decoded kernel events into [`HubEvent`]s. Allocation-free per event in the steady
/// state apart from the `Arc<HubEvent>`: one scratch `pb::Event` is refilled in place (its
/// strings keep their capacity) and encoded into a shared block; identities are interned per
/// principal; `/proc` and exec lookups are cached `Arc`s.
struct Enricher {
    shared: Arc<Shared>,
    procs: ProcCache,
    execs: ExecTable,
    principals: HashMap<u32, PrincipalNames>,
    /// Policy generations, refreshed once per batch.
    generations: [Option<Arc<Generation>>; 2],
    scratch: pb::Event,
    buf: BytesMut,
    batch: Vec<Arc<HubEvent>>,
    empty: Arc<str>,
    /// The address `scratch`'s connect call holds as its destination text.
    destination_of: Option<std::net::IpAddr>,
}

impl Enricher {
    fn new(shared: Arc<Shared>) -> Self {
        let scratch = pb::Event {
            node: shared.resolved.node.clone(),
            ..Default::default()
        };
        Self {
            shared,
            procs: ProcCache::new(PROC_TTL, PROC_CACHE_MAX),
            execs: ExecTable::new(EXEC_TABLE_MAX),
            principals: HashMap::new(),
            generations: [None, None],
            scratch,
            buf: BytesMut::new(),
            batch: Vec::with_capacity(PUBLISH_BATCH),
            empty: Arc::from(""),
            destination_of: None,
        }
    }

    fn refresh_policy(&mut self) {
        let st = self.shared.policy_state();
        self.generations = st.generations.clone();
    }

    /// Fills `scratch.principal`; returns the identity for filters.
    fn principal(&mut self, index: u32, cgroup_id: u64) -> Arc<str> {
        if !self.principals.contains_key(&index)
            && let Some(r) = self.shared.registry.get(index)
        {
            if self.principals.len() >= PRINCIPAL_CACHE_MAX {
                self.principals.clear();
            }
            self.principals.insert(
                index,
                PrincipalNames {
                    identity: Arc::from(r.identity.as_str()),
                    session: Arc::from(r.session.as_str()),
                },
            );
        }
        let p = self.scratch.principal.get_or_insert_with(Default::default);
        p.cgroup_id = cgroup_id;
        match self.principals.get(&index) {
            Some(n) => {
                set(&mut p.identity, &n.identity);
                set(&mut p.session, &n.session);
                n.identity.clone()
            }
            None => {
                p.identity.clear();
                p.session.clear();
                self.empty.clone()
            }
        }
    }

    /// Fills `scratch.decision`; returns the zone name's owner generation for the caller.
    #[expect(clippy::too_many_arguments, reason = "the decision's fields, unpacked")]
    fn decision(
        &mut self,
        verdict: Verdict,
        reason: Reason,
        policy: Option<u32>,
        rule: Option<u32>,
        zone: Option<u32>,
        grant_id: u64,
        zone_out: Option<&mut String>,
    ) {
        let generation = policy.and_then(|k| self.generations[(k >> 31) as usize].as_ref());
        let slot = policy.map(|k| k & 0x7fff_ffff);
        let d = self.scratch.decision.get_or_insert_with(Default::default);
        d.verdict = verdict_pb(verdict) as i32;
        d.reason = reason_pb(reason) as i32;
        d.policy.clear();
        if let (Some(g), Some(s)) = (generation, slot) {
            d.policy.push_str(g.policy_name(s).unwrap_or_default());
        }
        d.revision = generation.map_or(0, |g| g.revision);
        d.rule_index = rule;
        d.grant_id.clear();
        if grant_id != 0 {
            let _ = write!(d.grant_id, "{grant_id}");
        }
        d.grant_available.clear();
        if let Some(z) = zone_out {
            z.clear();
            if let (Some(g), Some(s), Some(zone)) = (generation, slot, zone) {
                z.push_str(g.zone_name(s, zone).unwrap_or_default());
            }
        }
    }

    fn count(&self, v: Verdict, r: Reason) {
        self.shared.counters.decisions[verdict_index(v)][reason_index(r)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Encodes the scratch event into the shared block.
    fn finish(
        &mut self,
        seq: u64,
        identity: Arc<str>,
        verdict: Verdict,
        kind: &'static str,
    ) -> Arc<HubEvent> {
        let len = self.scratch.encoded_len();
        if self.buf.capacity() - self.buf.len() < len {
            self.buf = BytesMut::with_capacity(ENCODE_BLOCK.max(len));
        }
        self.scratch.encode_raw(&mut self.buf);
        Arc::new(HubEvent {
            seq,
            identity,
            verdict: verdict_pb(verdict) as i32,
            kind,
            encoded: self.buf.split().freeze(),
        })
    }

    fn connect(&mut self, c: &ConnectDecision, boot_to_unix: i128, now: Instant) -> Arc<HubEvent> {
        self.count(c.verdict, c.reason);
        if c.suppressed != 0 {
            self.shared
                .counters
                .suppressed
                .fetch_add(u64::from(c.suppressed), Ordering::Relaxed);
        }
        let identity = self.principal(c.principal, c.cgroup_id);
        let mut call = match self.scratch.call.take() {
            Some(pb::event::Call::Connect(call)) => call,
            _ => {
                self.destination_of = None;
                pb::ConnectCall::default()
            }
        };
        self.decision(
            c.verdict,
            c.reason,
            c.policy,
            c.rule,
            c.zone,
            c.grant_id,
            Some(&mut call.zone),
        );
        if let Some(name) = grant_available(&self.generations, c)
            && let Some(d) = self.scratch.decision.as_mut()
        {
            d.grant_available.push_str(name);
        }
        if let Some(path) = &c.unix_path {
            set(&mut call.family, "unix");
            set(&mut call.destination, path);
            self.destination_of = None;
        } else {
            set(
                &mut call.family,
                if c.addr.is_ipv4() { "ipv4" } else { "ipv6" },
            );
            // Bursts go to the same destination: format the address only when it changes.
            if self.destination_of != Some(c.addr) {
                call.destination.clear();
                let _ = write!(call.destination, "{}", c.addr);
                self.destination_of = Some(c.addr);
            }
        }
        set(&mut call.protocol, proto_name(c.proto));
        call.port = u32::from(c.port);
        set(&mut call.hook, hook_name(c.hook));
        self.scratch.call = Some(pb::event::Call::Connect(call));

        let p = self.scratch.process.get_or_insert_with(Default::default);
        p.pid = c.pid;
        p.uid = c.uid;
        match self.execs.get(c.pid) {
            Some(x) => {
                p.ppid = x.ppid;
                set(&mut p.binary, &x.binary);
                set_argv(&mut p.argv, &x.argv);
                p.exec_id = x.exec_id;
                p.parent_exec_id = x.parent_exec_id;
            }
            None => {
                let info = self.procs.get(c.pid, now);
                p.ppid = info.ppid;
                set(&mut p.binary, &info.binary);
                set_argv(&mut p.argv, &info.argv);
                p.exec_id = 0;
                p.parent_exec_id = 0;
            }
        }
        self.scratch.seq = c.seq;
        self.scratch.time_unix_nano = to_unix(c.time_ns, boot_to_unix);
        self.scratch.suppressed = c.suppressed;
        self.finish(c.seq, identity, c.verdict, "connect")
    }

    fn exec(&mut self, x: &ExecDecision, boot_to_unix: i128) -> Arc<HubEvent> {
        self.count(x.verdict, x.reason);
        // A new image: whatever was cached for the pid is stale.
        self.procs.forget(x.pid);
        self.decision(x.verdict, x.reason, x.policy, x.rule, None, 0, None);
        let identity = self.principal(x.principal, x.cgroup_id);
        let ppid = self
            .execs
            .get(x.pid)
            .map(|e| e.ppid)
            .filter(|p| *p != 0)
            .unwrap_or_else(|| procs::read_ppid(x.pid));
        // An exec that happened (exec_id != 0) is the pid's image from now on.
        if x.exec_id != 0 && x.verdict != Verdict::Deny {
            self.execs.insert(
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
        let p = self.scratch.process.get_or_insert_with(Default::default);
        p.pid = x.pid;
        p.ppid = ppid;
        p.uid = x.uid;
        set(&mut p.binary, &x.path);
        set_argv(&mut p.argv, &x.argv);
        p.exec_id = x.exec_id;
        p.parent_exec_id = x.parent_exec_id;
        self.scratch.call = Some(pb::event::Call::Exec(pb::ExecCall {
            path: x.path.clone(),
        }));
        self.scratch.seq = x.seq;
        self.scratch.time_unix_nano = to_unix(x.time_ns, boot_to_unix);
        self.scratch.suppressed = 0;
        self.finish(x.seq, identity, x.verdict, "exec")
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
    // Bounded batches: a full ring is drained in several rounds, each published under one hub
    // lock, so subscribers see events while the ring is still being read.
    loop {
        raw.clear();
        let before = reader.undecodable;
        reader.drain_some(raw, PUBLISH_BATCH);
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
        publish(enricher, hub, audit, raw);
        if raw.len() < PUBLISH_BATCH {
            return;
        }
    }
}

fn publish(enricher: &mut Enricher, hub: &Hub, audit: &mut Option<AuditLog>, raw: &[Event]) {
    let offset = boot_to_unix();
    let now = Instant::now();
    enricher.refresh_policy();
    let mut batch = std::mem::take(&mut enricher.batch);
    batch.clear();
    batch.extend(raw.iter().map(|e| match e {
        Event::Connect(c) => enricher.connect(c, offset, now),
        Event::Exec(x) => enricher.exec(x, offset),
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
    {
        // Written on every start (also when adopting pins), so the flag is what is in force.
        let cfg = &shared.resolved.config;
        let (rate, burst) = (cfg.allow_event_rate, cfg.allow_event_burst);
        if let Err(e) = shared.enforcer().maps().set_allow_rate(rate, burst) {
            warn!(error = %super::policy::error_chain(&e), "set the allow-event rate limit");
        }
    }
    let mut enricher = Enricher::new(shared.clone());
    let mut raw = Vec::with_capacity(PUBLISH_BATCH);
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
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    const POLICY: &str = "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata: { name: p }\nspec:\n  identities: [spiffe://t/a]\n  zones:\n    internet: { cidrs: [0.0.0.0/0] }\n    db: { cidrs: [10.20.0.0/16] }\n  connect:\n    - { action: deny, zones: [db], ports: [22] }\n  grants:\n    - { name: db-write, zones: [db], ports: [5433], protocols: [tcp], maxTtl: 15m, approval: required }\n    - { name: db-any, zones: [db], maxTtl: 15m, approval: auto }\n";

    fn connect(verdict: Verdict, reason: Reason, zone: Option<u32>, port: u16) -> ConnectDecision {
        ConnectDecision {
            seq: 1,
            time_ns: 0,
            cgroup_id: 1,
            pid: 1,
            tid: 1,
            uid: 0,
            principal: 1,
            verdict,
            reason,
            // Generation 1, slot 0.
            policy: Some(agent_common::policy_key(1, 0)),
            rule: None,
            zone,
            addr: IpAddr::V4(Ipv4Addr::new(10, 20, 0, 1)),
            port,
            proto: PROTO_TCP,
            hook: HOOK_CONNECT4,
            grant_id: 0,
            suppressed: 0,
            unix_path: None,
        }
    }

    #[test]
    fn denied_connects_name_the_first_template_that_would_allow_them() {
        let compiled = crate::policy::compile_str("p.yaml", POLICY, 3).expect("valid");
        let generations = [
            None,
            Some(Arc::new(Generation {
                revision: 3,
                compiled: Arc::new(compiled),
            })),
        ];
        let name = |c: ConnectDecision| grant_available(&generations, &c).map(str::to_owned);
        let (deny, audit, allow) = (Verdict::Deny, Verdict::AuditDeny, Verdict::Allow);
        assert_eq!(
            name(connect(deny, Reason::Default, Some(1), 5433)).as_deref(),
            Some("db-write")
        );
        assert_eq!(
            name(connect(audit, Reason::Rule, Some(1), 22)).as_deref(),
            Some("db-any")
        );
        // Chaining beats grants; allowed and no-policy decisions have nothing to escalate.
        assert_eq!(name(connect(deny, Reason::Chaining, Some(1), 5433)), None);
        assert_eq!(name(connect(allow, Reason::Rule, Some(1), 5433)), None);
        assert_eq!(name(connect(deny, Reason::NoPolicy, Some(1), 5433)), None);
        // No template covers the zone, or no zone at all.
        assert_eq!(name(connect(deny, Reason::Default, Some(0), 5433)), None);
        assert_eq!(name(connect(deny, Reason::Default, None, 5433)), None);
        // A generation the event's key does not point to.
        let mut other = connect(deny, Reason::Default, Some(1), 5433);
        other.policy = Some(agent_common::policy_key(0, 0));
        assert_eq!(name(other), None);
    }
}
