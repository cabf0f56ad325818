//! `AgentStatus`: what the agent enforces and how its event path is doing, and the same
//! numbers as Prometheus text.

use std::{fmt::Write as _, sync::atomic::Ordering, time::UNIX_EPOCH};

use corral_proto::v1 as pb;

use super::{
    Shared,
    pipeline::{REASONS, VERDICTS},
    registry::process_count,
};
use crate::{
    ebpf::{ExecMode, loader::SOCK_ADDR_PROGRAMS, unix_hooks::UNIX_PROGRAMS},
    k8s::tracker::Unenrolled,
};

pub fn exec_enforcement(mode: ExecMode) -> &'static str {
    match mode {
        ExecMode::Lsm => "lsm",
        ExecMode::Tracepoint => "tracepoint+sigkill",
    }
}

/// How `#!` scripts are decided (BPF LSM sees the script and its interpreter by itself).
pub fn exec_scripts(shared: &Shared) -> &'static str {
    let both = match shared.exec_mode {
        ExecMode::Lsm => true,
        ExecMode::Tracepoint => shared.enforcer().maps().exec().script_lookup(),
    };
    if both {
        "script and interpreter"
    } else {
        "interpreter only"
    }
}

pub fn kernel_drops(shared: &Shared) -> u64 {
    shared.enforcer().maps().kernel_drops().unwrap_or(0)
}

/// Allow events suppressed by the kernel's rate limit: those carried on delivered events,
/// plus those still waiting in the kernel for the principal's next event.
pub fn suppressed(shared: &Shared) -> u64 {
    shared.counters.suppressed.load(Ordering::Relaxed)
        + shared.enforcer().maps().suppressed_pending()
}

/// An opted-in pod that is not enrolled, as reported.
pub fn unenrolled_pod(u: &Unenrolled) -> pb::UnenrolledPod {
    pb::UnenrolledPod {
        namespace: u.namespace.clone(),
        name: u.name.clone(),
        uid: u.uid.clone(),
        reason: u.reason.clone(),
        state: if u.failed { "failed" } else { "pending" }.into(),
        since_unix_nano: u
            .since_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    }
}

/// The `corral_k8s_pods_not_enrolled` gauge, by state.
fn pods_not_enrolled(s: &mut String, (pending, failed): (usize, usize)) {
    let _ = writeln!(
        s,
        "# HELP corral_k8s_pods_not_enrolled Pods on this node that opted in and are not enrolled \
         (not policed): pending (waiting for the pod's cgroup) or failed.\n\
         # TYPE corral_k8s_pods_not_enrolled gauge\n\
         corral_k8s_pods_not_enrolled{{state=\"pending\"}} {pending}\n\
         corral_k8s_pods_not_enrolled{{state=\"failed\"}} {failed}"
    );
}

pub fn build(shared: &Shared) -> pb::AgentStatus {
    // Before the policy lock (lock order: enforcer, then policy state).
    let (hooks, guards) = {
        let enf = shared.enforcer();
        (enf.sock_addr_hooks(), enf.guard_hooks())
    };
    let (revision, policies, last_error, current) = {
        let st = shared.policy_state();
        let current = st.current().cloned();
        let names = current
            .as_ref()
            .map(|g| g.compiled.policies.iter().map(|p| p.name.clone()).collect())
            .unwrap_or_default();
        (
            st.revision(),
            names,
            st.last_error.clone().unwrap_or_default(),
            current,
        )
    };
    let principals = shared
        .registry
        .list()
        .into_iter()
        .map(|r| {
            let policy = current
                .as_ref()
                .and_then(|g| {
                    let slot = g.compiled.policy_for(&r.identity)?;
                    g.policy_name(slot).map(str::to_owned)
                })
                .unwrap_or_default();
            pb::PrincipalStatus {
                principal: Some(r.to_pb()),
                policy,
                processes: process_count(&r.cgroup),
                containment_opt_outs: r.opt_outs.clone(),
            }
        })
        .collect();
    pb::AgentStatus {
        node: shared.resolved.node.clone(),
        exec_enforcement: exec_enforcement(shared.exec_mode).into(),
        exec_scripts: exec_scripts(shared).into(),
        sock_addr_hooks: hooks.iter().map(|s| (*s).into()).collect(),
        guard_hooks: guards.iter().map(|s| (*s).into()).collect(),
        policy_revision: revision,
        policies,
        last_error,
        principals,
        containers_enrolled: shared.containers.enrolled.load(Ordering::Relaxed),
        containers_failed_open: shared.containers.failed_open.load(Ordering::Relaxed),
        containers_missed: shared.containers.missed.load(Ordering::Relaxed),
        dns: dns_status(shared),
        events_delivered: shared.hub.published.load(Ordering::Relaxed),
        events_dropped_kernel: kernel_drops(shared),
        events_dropped_subscribers: shared.hub.subscriber_dropped.load(Ordering::Relaxed),
        events_suppressed: suppressed(shared),
        server: shared.sync.server(),
        server_state: if shared.resolved.config.server.is_some() {
            shared.sync.describe(revision)
        } else {
            "standalone".into()
        },
        grants: shared
            .grants
            .grants()
            .into_iter()
            .map(|g| pb::ActiveGrant {
                id: g.id.to_string(),
                identity: g.identity,
                session: g.session,
                grant: g.template,
                expires_unix_nano: g.expires_unix_ns,
            })
            .collect(),
        unenrolled_pods: shared
            .k8s_pods
            .unenrolled()
            .iter()
            .map(unenrolled_pod)
            .collect(),
    }
}

/// `corral_sock_addr_hook_attached`: 1 per cgroup sock_addr hook attached, 0 for a unix-socket
/// hook the kernel lacks (6.7+; then unix sockets are not policed).
fn sock_addr_hooks_gauge(s: &mut String, attached: &[&str]) {
    let name = "corral_sock_addr_hook_attached";
    let _ = writeln!(
        s,
        "# HELP {name} Cgroup sock_addr hooks attached (1) or unavailable (0; the unix-socket \
         hooks need kernel 6.7+, without them unix sockets are not policed).\n# TYPE {name} gauge"
    );
    let all = SOCK_ADDR_PROGRAMS
        .iter()
        .chain(UNIX_PROGRAMS.iter().map(|(n, _)| n));
    for hook in all {
        let v = u8::from(attached.contains(hook));
        let _ = writeln!(s, "{name}{{hook=\"{hook}\"}} {v}");
    }
}

/// Prometheus text exposition format.
pub fn metrics(shared: &Shared) -> String {
    let mut s = String::new();
    // Lock order: the enforcer before the policy state.
    let hooks = shared.enforcer().sock_addr_hooks();
    sock_addr_hooks_gauge(&mut s, &hooks);
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    let st = {
        let p = shared.policy_state();
        (
            p.revision(),
            p.apply_errors,
            u64::from(p.last_error.is_some()),
        )
    };
    gauge(
        "corral_policy_revision",
        "Policy revision enforced.",
        "gauge",
        st.0,
    );
    gauge(
        "corral_policy_apply_errors_total",
        "Policy inputs rejected (the previous policy stayed in force).",
        "counter",
        st.1,
    );
    gauge(
        "corral_policy_last_apply_failed",
        "1 if the latest policy input was rejected.",
        "gauge",
        st.2,
    );
    gauge(
        "corral_principals",
        "Enrolled principals.",
        "gauge",
        shared.registry.len() as u64,
    );
    gauge(
        "corral_events_delivered_total",
        "Events read from the kernel and published to subscribers.",
        "counter",
        shared.hub.published.load(Ordering::Relaxed),
    );
    gauge(
        "corral_events_dropped_kernel_total",
        "Events lost in the kernel because the ring buffer was full.",
        "counter",
        kernel_drops(shared),
    );
    gauge(
        "corral_events_dropped_subscribers_total",
        "Events dropped for subscribers that read too slowly.",
        "counter",
        shared.hub.subscriber_dropped.load(Ordering::Relaxed),
    );
    gauge(
        "corral_events_suppressed_total",
        "Allow events suppressed by the in-kernel per-principal rate limit.",
        "counter",
        suppressed(shared),
    );
    gauge(
        "corral_containers_enrolled_total",
        "Containers enrolled by their OCI hook before their first instruction.",
        "counter",
        shared.containers.enrolled.load(Ordering::Relaxed),
    );
    gauge(
        "corral_containers_failed_open_total",
        "Containers an OCI hook let start UNPOLICED (--fail-open, agent unreachable).",
        "counter",
        shared.containers.failed_open.load(Ordering::Relaxed),
    );
    gauge(
        "corral_containers_missed_total",
        "Running containers of enrolled pods that no OCI hook enrolled (seen by the pod watch).",
        "counter",
        shared.containers.missed.load(Ordering::Relaxed),
    );
    if let Some(d) = dns_status(shared) {
        for (name, help, v) in [
            (
                "corral_dns_queries_total",
                "DNS queries the proxy answered.",
                d.queries,
            ),
            (
                "corral_dns_refused_total",
                "DNS queries answered REFUSED (name in no zone).",
                d.refused,
            ),
            (
                "corral_dns_learned_total",
                "Addresses opened from DNS answers.",
                d.learned,
            ),
            (
                "corral_dns_failures_total",
                "DNS upstream failures and addresses that could not be opened.",
                d.failures,
            ),
            (
                "corral_dns_capped_total",
                "Answer addresses not opened: the principal had --dns-max-learned open.",
                d.capped,
            ),
        ] {
            gauge(name, help, "counter", v);
        }
        gauge(
            "corral_dns_learned_addresses",
            "Addresses open by name now (kernel map entries).",
            "gauge",
            d.learned_now,
        );
    }
    gauge(
        "corral_events_undecodable_total",
        "Events the agent could not decode (kernel/agent version skew).",
        "counter",
        shared.counters.undecodable.load(Ordering::Relaxed),
    );
    gauge(
        "corral_audit_log_errors_total",
        "Failed audit log writes.",
        "counter",
        shared.counters.audit_errors.load(Ordering::Relaxed),
    );
    pods_not_enrolled(&mut s, shared.k8s_pods.counts());
    let _ = writeln!(
        s,
        "# HELP corral_decisions_total Decisions by verdict and reason.\n# TYPE corral_decisions_total counter"
    );
    for (vi, v) in VERDICTS.iter().enumerate() {
        for (ri, r) in REASONS.iter().enumerate() {
            let n = shared.counters.decisions[vi][ri].load(Ordering::Relaxed);
            let _ = writeln!(
                s,
                "corral_decisions_total{{verdict=\"{v}\",reason=\"{r}\"}} {n}"
            );
        }
    }
    s
}

/// The DNS proxy's settings and counters, if it runs.
fn dns_status(shared: &Shared) -> Option<pb::DnsProxyStatus> {
    let d = shared.dns.as_ref()?;
    let c = &d.counters;
    let learned_now = shared.enforcer().maps().dns().len() as u64;
    Some(pb::DnsProxyStatus {
        port: u32::from(d.settings.port),
        upstream: d
            .settings
            .upstream
            .map(|u| u.to_string())
            .unwrap_or_default(),
        queries: c.queries.load(Ordering::Relaxed),
        refused: c.refused.load(Ordering::Relaxed),
        learned: c.learned.load(Ordering::Relaxed),
        learned_now,
        failures: c.failures.load(Ordering::Relaxed),
        capped: c.capped.load(Ordering::Relaxed),
        namespaces: d.namespaces(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn unenrolled_pods_are_reported_with_state_and_wall_clock_time() {
        let u = Unenrolled {
            namespace: "agents".into(),
            name: "ghost".into(),
            uid: "0a-1".into(),
            reason: "no cgroup for pod 0a-1".into(),
            failed: false,
            since: Instant::now(),
            since_wall: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let p = unenrolled_pod(&u);
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()),
            ("agents", "ghost", "0a-1")
        );
        assert_eq!(p.reason, "no cgroup for pod 0a-1");
        assert_eq!(p.state, "pending");
        assert_eq!(p.since_unix_nano, 1_700_000_000_000_000_000);
        let failed = Unenrolled { failed: true, ..u };
        assert_eq!(unenrolled_pod(&failed).state, "failed");
    }

    #[test]
    fn the_hooks_gauge_says_which_sock_addr_hooks_are_attached() {
        let mut s = String::new();
        sock_addr_hooks_gauge(&mut s, &["connect4", "connect6", "sendmsg4", "sendmsg6"]);
        assert!(
            s.starts_with("# HELP corral_sock_addr_hook_attached "),
            "{s}"
        );
        assert!(
            s.contains("\n# TYPE corral_sock_addr_hook_attached gauge\n"),
            "{s}"
        );
        assert!(
            s.contains("\ncorral_sock_addr_hook_attached{hook=\"sendmsg6\"} 1\n"),
            "{s}"
        );
        assert!(s.ends_with(
            "corral_sock_addr_hook_attached{hook=\"connect_unix\"} 0\n\
             corral_sock_addr_hook_attached{hook=\"sendmsg_unix\"} 0\n"
        ));
        let mut s = String::new();
        sock_addr_hooks_gauge(&mut s, &["connect4", "connect_unix", "sendmsg_unix"]);
        assert!(s.contains("{hook=\"connect6\"} 0\n"), "{s}");
        assert!(s.contains("{hook=\"sendmsg_unix\"} 1\n"), "{s}");
    }

    #[test]
    fn the_not_enrolled_gauge_is_valid_exposition_by_state() {
        let mut s = String::new();
        pods_not_enrolled(&mut s, (2, 1));
        assert_eq!(
            s,
            "# HELP corral_k8s_pods_not_enrolled Pods on this node that opted in and are not \
             enrolled (not policed): pending (waiting for the pod's cgroup) or failed.\n\
             # TYPE corral_k8s_pods_not_enrolled gauge\n\
             corral_k8s_pods_not_enrolled{state=\"pending\"} 2\n\
             corral_k8s_pods_not_enrolled{state=\"failed\"} 1\n"
        );
    }
}
