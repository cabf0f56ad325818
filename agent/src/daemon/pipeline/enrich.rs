//! Enrichment: decoded kernel events → [`HubEvent`]s with names (principal, policy, zone),
//! process details from `/proc` or the exec table, and Unix times.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use corral_proto::v1 as pb;
use prost::Message as _;

use super::{
    PUBLISH_BATCH, grant_available, hook_name,
    procs::{self, ExecInfo, ExecTable, ProcCache},
    proto_name, reason_index, reason_pb, verdict_index, verdict_pb,
};
use crate::{
    daemon::{Shared, hub::HubEvent, policy::Generation},
    ebpf::events::{ConnectDecision, ExecDecision, Reason, Verdict},
};

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
pub(super) struct Enricher {
    pub(super) shared: Arc<Shared>,
    procs: ProcCache,
    execs: ExecTable,
    principals: HashMap<u32, PrincipalNames>,
    /// Policy generations, refreshed once per batch.
    generations: [Option<Arc<Generation>>; 2],
    scratch: pb::Event,
    buf: BytesMut,
    pub(super) batch: Vec<Arc<HubEvent>>,
    empty: Arc<str>,
    /// The address `scratch`'s connect call holds as its destination text.
    destination_of: Option<std::net::IpAddr>,
}

impl Enricher {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
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

    pub(super) fn refresh_policy(&mut self) {
        let st = self.shared.policy_state();
        self.generations = st.generations.clone();
    }

    /// Fills `scratch.principal`; returns the identity for filters.
    pub(super) fn principal(&mut self, index: u32, cgroup_id: u64) -> Arc<str> {
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
    pub(super) fn decision(
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

    pub(super) fn count(&self, v: Verdict, r: Reason) {
        self.shared.counters.decisions[verdict_index(v)][reason_index(r)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Encodes the scratch event into the shared block.
    pub(super) fn finish(
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

    pub(super) fn connect(
        &mut self,
        c: &ConnectDecision,
        boot_to_unix: i128,
        now: Instant,
    ) -> Arc<HubEvent> {
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

    pub(super) fn exec(&mut self, x: &ExecDecision, boot_to_unix: i128) -> Arc<HubEvent> {
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
pub(super) fn boot_to_unix() -> i128 {
    let boot = crate::clock::boottime_ns().unwrap_or(0);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    i128::try_from(unix).unwrap_or(0) - i128::from(boot)
}
