//! The event path: ring buffer → decode → enrichment (principal from the registry; policy
//! name, zone and revision from the map generation; ppid, binary and argv from `/proc`, or
//! from the exec event itself) → the [`Hub`] (subscribers, history) and the audit log.
//!
//! Nothing here panics or blocks on a consumer. Lost events are counted: in the kernel
//! (`DROPS` map, ring full), undecodable ones here, and per subscriber in the hub.

mod audit;
mod enrich;
mod procs;
mod socket_names;

use std::{
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
use corral_events::hub::Hub;
use corral_proto::v1 as pb;
use corral_runtime::shutdown::ShutdownSignal;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{debug, warn};

pub use self::audit::AuditLog;
use self::enrich::{Enricher, boot_to_unix};
use super::{Shared, policy::Generation};
use crate::ebpf::events::{ConnectDecision, Event, EventReader, Reason, Verdict};

/// Decisions by verdict and reason, for metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// `[verdict][reason]`, indexed by `Verdict::index` / `Reason::index`.
    pub decisions: [[AtomicU64; Reason::ALL.len()]; Verdict::ALL.len()],
    pub undecodable: AtomicU64,
    pub audit_errors: AtomicU64,
    /// Allow events the kernel's per-principal rate limit suppressed, as reported by the events
    /// that carried the counts (`EventHeader::suppressed`).
    pub suppressed: AtomicU64,
}

pub const VERDICTS: [&str; 3] = [
    Verdict::ALL[0].name(),
    Verdict::ALL[1].name(),
    Verdict::ALL[2].name(),
];
pub const REASONS: [&str; 6] = [
    Reason::ALL[0].name(),
    Reason::ALL[1].name(),
    Reason::ALL[2].name(),
    Reason::ALL[3].name(),
    Reason::ALL[4].name(),
    Reason::ALL[5].name(),
];

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
        Reason::Containment => pb::Reason::Containment,
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
    if !grant_could_help(c.header.verdict, c.header.reason) {
        return None;
    }
    let key = c.header.policy?;
    let generation = generations[agent_common::policy_key_generation(key) as usize].as_ref()?;
    generation.grant_available(agent_common::policy_key_slot(key), c.zone?, c.port, c.proto)
}

fn hook_name(h: u8) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_CONNECT_UNIX => "connect_unix",
        HOOK_SENDMSG_UNIX => "sendmsg_unix",
        // An established connection ended by the egress re-decision.
        agent_common::HOOK_CUT4 => "cut4",
        agent_common::HOOK_CUT6 => "cut6",
        // An echo request from a ping socket, decided by destination.
        agent_common::HOOK_PING4 => "ping4",
        agent_common::HOOK_PING6 => "ping6",
        _ => "unknown",
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        agent_common::PROTO_ICMP => "icmp",
        _ => "",
    }
}

struct ReaderFd(EventReader);

impl AsRawFd for ReaderFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring().as_raw_fd()
    }
}

/// How often the ring is drained without a wakeup. Allow events do not wake the reader until a
/// quarter of the ring is unread (agent-ebpf `events::submit_flags`), so this bounds their
/// delay; deny events wake it at once.
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
        Event::Socket(s) => enricher.socket(s, offset, now),
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
            warn!(error = %corral_runtime::error_chain(&e), "set the allow-event rate limit");
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
        use crate::ebpf::events::DecisionHeader;
        ConnectDecision {
            header: DecisionHeader {
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
                suppressed: 0,
            },
            zone,
            addr: IpAddr::V4(Ipv4Addr::new(10, 20, 0, 1)),
            port,
            proto: PROTO_TCP,
            hook: HOOK_CONNECT4,
            grant_id: 0,
            unix_path: None,
            repeats: 0,
        }
    }

    #[test]
    fn denied_connects_name_the_first_template_that_would_allow_them() {
        let compiled = corral_policy::compile_str("p.yaml", POLICY, 3).expect("valid");
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
        other.header.policy = Some(agent_common::policy_key(0, 0));
        assert_eq!(name(other), None);
    }
}
