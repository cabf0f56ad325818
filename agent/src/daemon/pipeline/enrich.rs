//! Enrichment: decoded kernel events → [`HubEvent`]s with names (principal, policy, zone),
//! process details from `/proc` or the exec table, and Unix times.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use corral_events::hub::HubEvent;
use corral_proto::v1 as pb;
use prost::Message as _;

use super::{
    PUBLISH_BATCH, grant_available, hook_name,
    procs::{self, ExecInfo, ExecTable, ProcCache},
    proto_name, reason_pb, socket_names, verdict_pb,
};
use crate::{
    daemon::{Shared, policy::Generation},
    ebpf::events::{ConnectDecision, ExecDecision, Reason, SocketDecision, Verdict},
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
    opt_outs: Vec<String>,
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
    /// [`crate::daemon::registry::Registry::version`] when `principals` was last valid.
    registry_version: u64,
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
            registry_version: 0,
            generations: [None, None],
            scratch,
            buf: BytesMut::new(),
            batch: Vec::with_capacity(PUBLISH_BATCH),
            empty: Arc::from(""),
            destination_of: None,
        }
    }

    /// Once per batch: the policy generations, and the principal names cached by index if
    /// the registry changed (a later `corral run` may add opt-outs to a principal).
    pub(super) fn refresh_policy(&mut self) {
        let st = self.shared.policy_state();
        self.generations = st.generations.clone();
        let version = self.shared.registry.version();
        if version != self.registry_version {
            self.principals.clear();
            self.registry_version = version;
        }
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
                    opt_outs: r.opt_outs.clone(),
                },
            );
        }
        let p = self.scratch.principal.get_or_insert_with(Default::default);
        p.cgroup_id = cgroup_id;
        match self.principals.get(&index) {
            Some(n) => {
                set(&mut p.identity, &n.identity);
                set(&mut p.session, &n.session);
                if p.opt_outs != n.opt_outs {
                    p.opt_outs.clone_from(&n.opt_outs);
                }
                n.identity.clone()
            }
            None => {
                p.identity.clear();
                p.session.clear();
                p.opt_outs.clear();
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
        let generation = policy.and_then(|k| {
            self.generations[agent_common::policy_key_generation(k) as usize].as_ref()
        });
        let slot = policy.map(agent_common::policy_key_slot);
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
        self.count_n(v, r, 1);
    }

    /// `n` decisions of one kind (an event standing for repeated calls).
    pub(super) fn count_n(&self, v: Verdict, r: Reason, n: u64) {
        self.shared.counters.decisions[v.index()][r.index()].fetch_add(n, Ordering::Relaxed);
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
        self.count_n(c.header.verdict, c.header.reason, 1 + u64::from(c.repeats));
        if c.header.suppressed != 0 {
            self.shared
                .counters
                .suppressed
                .fetch_add(u64::from(c.header.suppressed), Ordering::Relaxed);
        }
        let identity = self.principal(c.header.principal, c.header.cgroup_id);
        let mut call = match self.scratch.call.take() {
            Some(pb::event::Call::Connect(call)) => call,
            _ => {
                self.destination_of = None;
                pb::ConnectCall::default()
            }
        };
        self.decision(
            c.header.verdict,
            c.header.reason,
            c.header.policy,
            c.header.rule,
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
        // The name that opened this address for this principal, if a DNS answer did.
        call.name.clear();
        if c.unix_path.is_none()
            && let Some(d) = &self.shared.dns
            && let Some(name) = d.name_of(c.header.principal, c.addr)
        {
            call.name.push_str(&name);
        }
        self.scratch.call = Some(pb::event::Call::Connect(call));
        self.process(c.header.pid, c.header.uid, now);
        self.scratch.seq = c.header.seq;
        self.scratch.time_unix_nano = to_unix(c.header.time_ns, boot_to_unix);
        self.scratch.suppressed = c.header.suppressed;
        self.scratch.repeats = c.repeats;
        self.finish(c.header.seq, identity, c.header.verdict, "connect")
    }

    /// A containment guard's refusal of a socket or socket option.
    pub(super) fn socket(
        &mut self,
        s: &SocketDecision,
        boot_to_unix: i128,
        now: Instant,
    ) -> Arc<HubEvent> {
        self.count(s.header.verdict, s.header.reason);
        let identity = self.principal(s.header.principal, s.header.cgroup_id);
        self.decision(
            s.header.verdict,
            s.header.reason,
            s.header.policy,
            s.header.rule,
            None,
            0,
            None,
        );
        self.scratch.call = Some(pb::event::Call::Socket(pb::SocketCall {
            family: socket_names::family(s.family),
            r#type: socket_names::sock_type(s.sock_type),
            protocol: socket_names::protocol(s.family, s.protocol),
            hook: socket_names::hook(s.hook).into(),
            option: socket_names::option(s.level, s.optname),
        }));
        self.process(s.header.pid, s.header.uid, now);
        self.scratch.seq = s.header.seq;
        self.scratch.time_unix_nano = to_unix(s.header.time_ns, boot_to_unix);
        self.scratch.suppressed = s.header.suppressed;
        self.scratch.repeats = 0;
        self.finish(s.header.seq, identity, s.header.verdict, "socket")
    }

    /// Fills the scratch event's process from what is known of `pid`.
    fn process(&mut self, pid: u32, uid: u32, now: Instant) {
        let p = self.scratch.process.get_or_insert_with(Default::default);
        p.pid = pid;
        p.uid = uid;
        match self.execs.get(pid) {
            Some(x) => {
                p.ppid = x.ppid;
                set(&mut p.binary, &x.binary);
                set_argv(&mut p.argv, &x.argv);
                p.exec_id = x.exec_id;
                p.parent_exec_id = x.parent_exec_id;
            }
            None => {
                let info = self.procs.get(pid, now);
                p.ppid = info.ppid;
                set(&mut p.binary, &info.binary);
                set_argv(&mut p.argv, &info.argv);
                p.exec_id = 0;
                p.parent_exec_id = 0;
            }
        }
    }

    pub(super) fn exec(&mut self, x: &ExecDecision, boot_to_unix: i128) -> Arc<HubEvent> {
        self.count(x.header.verdict, x.header.reason);
        // A new image: whatever was cached for the pid is stale.
        self.procs.forget(x.header.pid);
        self.decision(
            x.header.verdict,
            x.header.reason,
            x.header.policy,
            x.header.rule,
            None,
            0,
            None,
        );
        let identity = self.principal(x.header.principal, x.header.cgroup_id);
        let ppid = self
            .execs
            .get(x.header.pid)
            .map(|e| e.ppid)
            .filter(|p| *p != 0)
            .unwrap_or_else(|| procs::read_ppid(x.header.pid));
        // An exec that happened (exec_id != 0) is the pid's image from now on.
        if x.exec_id != 0 && x.header.verdict != Verdict::Deny {
            self.execs.insert(
                x.header.pid,
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
        p.pid = x.header.pid;
        p.ppid = ppid;
        p.uid = x.header.uid;
        set(&mut p.binary, &x.path);
        set_argv(&mut p.argv, &x.argv);
        p.exec_id = x.exec_id;
        p.parent_exec_id = x.parent_exec_id;
        self.scratch.call = Some(pb::event::Call::Exec(pb::ExecCall {
            path: x.path.clone(),
        }));
        self.scratch.seq = x.header.seq;
        self.scratch.time_unix_nano = to_unix(x.header.time_ns, boot_to_unix);
        self.scratch.suppressed = 0;
        self.scratch.repeats = 0;
        self.finish(x.header.seq, identity, x.header.verdict, "exec")
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
