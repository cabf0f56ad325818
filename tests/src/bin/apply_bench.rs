//! `corral-apply-bench`: apply → enforced in the real kernel on a real node (run by `cargo
//! xtask bench apply`, as root). Goal (issue 6): p99 ≤ 100 ms.
//!
//! Starts a real `corral-server` (plaintext loopback, temporary database) and a real
//! `corral-agent --server` (own socket, state, cgroup and pin directories; `--uninstall`), with
//! [`corral_tests::harness`]. A prober process inside an enrolled principal connects to a
//! loopback TCP listener (UDP with `--udp`) every `--interval-us` and reports each change of
//! outcome with a CLOCK_MONOTONIC timestamp. Each round applies, through
//! `PolicyService.Apply`, the policy with that port's rule flipped (allow ↔ deny) and measures
//! from just before the call:
//! - the Apply RPC (the server validated, compiled and committed the revision);
//! - enforced: the prober's first observation of the new outcome (resolution: the interval);
//! - the node's ACK as recorded by the server (its `acked_unix_nano`, same host clock).
//!
//! The next round starts after the ACK and a `--gap-ms` pause, so applies are not coalesced.
//!
//! Then grants (issue 7, goal p99 ≤ 100 ms): with the port denied by policy, each round
//! requests a grant for the prober's session through `GrantService`, then measures approve →
//! the prober connects, and revoke → the prober gets EPERM.
//!
//! `corral-apply-bench [--rounds 100] [--interval-us 1000] [--udp] [--extra-rules 0]
//! [--gap-ms 20] [--timeout-ms 5000] [--goal-ms 100] [--require-goal]`; `--require-goal` makes
//! a missed goal an error (exit status 1).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use corral_proto::v1::{self as pb, grant_service_client::GrantServiceClient};
use corral_tests::{
    Listener,
    harness::{self, Harness, Prober, Summary, rss_kib},
};

struct Opts {
    rounds: usize,
    interval: Duration,
    udp: bool,
    extra_rules: usize,
    gap: Duration,
    timeout: Duration,
    goal: Duration,
    require_goal: bool,
}

const IDENTITY: &str = "spiffe://bench.corral/apply/prober";
const FILE: &str = "apply-bench.yaml";

/// The benchmark's policy: the probed port allowed or denied, `extra` more deny rules (policy
/// size), execs of the build's binaries and system tools allowed, and a grant (approval
/// required) that opens the probed port.
fn policy(port: u16, allow: bool, extra: usize, bindir: &str) -> String {
    let action = if allow { "allow" } else { "deny" };
    let mut more = String::new();
    for i in 0..extra {
        more.push_str(&format!(
            "    - {{ action: deny, zones: [local], ports: [{}] }}\n",
            20000 + i
        ));
    }
    format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: apply-bench
spec:
  identities: [spiffe://bench.corral/**]
  mode: enforce
  defaultAction: deny
  zones:
    local: {{ cidrs: [127.0.0.0/8] }}
  connect:
    - {{ action: {action}, zones: [local], ports: [{port}] }}
{more}  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
  grants:
    - {{ name: {GRANT}, zones: [local], ports: [{port}], maxTtl: 1h, approval: required }}
"
    )
}

const GRANT: &str = "bench-port";

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn mib(pid: Option<u32>) -> f64 {
    pid.map_or(0.0, |p| rss_kib(p) as f64 / 1024.0)
}

fn outcome(allow: bool) -> &'static str {
    if allow { "ok" } else { "EPERM" }
}

/// What a scenario measured: table rows, and the enforcement latencies the goal is judged on.
struct Report {
    title: String,
    rows: Vec<(&'static str, Summary)>,
    enforced: Summary,
}

/// The node a scenario runs on: server + agent, and a prober in a principal allowed to connect
/// to `port` by the initial policy.
struct Setup<'h> {
    h: &'h Harness,
    prober: Prober<'h>,
    port: u16,
    proto: &'static str,
    bindir: String,
}

/// Apply → enforced: each round flips the probed port's rule (deny first, then allow, ...).
fn apply_scenario(s: &mut Setup<'_>, o: &Opts) -> anyhow::Result<Report> {
    let h = s.h;
    let (mut rpc, mut acked, mut enforced) = (vec![], vec![], vec![]);
    let (mut to_deny, mut to_allow) = (vec![], vec![]);
    for r in 0..o.rounds {
        let allow = r % 2 == 1;
        let yaml = policy(s.port, allow, o.extra_rules, &s.bindir);
        let m = s
            .prober
            .measure(outcome(allow), o.timeout, || h.apply(FILE, &yaml))
            .with_context(|| format!("round {r}\n{}", h.logs()))?;
        let node = h.wait_acked(m.value.revision, o.timeout)?;
        rpc.push(m.action);
        acked.push(Duration::from_nanos(
            node.acked_unix_nano.saturating_sub(m.t0_wall_ns),
        ));
        enforced.push(m.enforced);
        if allow {
            to_allow.push(m.enforced);
        } else {
            to_deny.push(m.enforced);
        }
        std::thread::sleep(o.gap);
    }
    // Leave the node as the scenario found it (the port allowed) for the next scenario.
    if s.prober.current() != outcome(true) {
        let r = h.apply(FILE, &policy(s.port, true, o.extra_rules, &s.bindir))?;
        h.wait_acked(r.revision, o.timeout)?;
        s.prober.wait_for(outcome(true), o.timeout)?;
    }
    Ok(Report {
        title: format!(
            "apply → enforced: {} applies flipping the rule of {}:127.0.0.1:{}; policy of {} \
             connect + 1 exec rules",
            o.rounds,
            s.proto,
            s.port,
            1 + o.extra_rules
        ),
        rows: vec![
            ("Apply RPC returned (committed)", Summary::of(&rpc)),
            (
                "enforced: prober sees the new outcome",
                Summary::of(&enforced),
            ),
            ("  allow → deny (EPERM)", Summary::of(&to_deny)),
            ("  deny → allow (ok)", Summary::of(&to_allow)),
            ("node ACK recorded by the server", Summary::of(&acked)),
        ],
        enforced: Summary::of(&enforced),
    })
}

/// The requesting user: the plaintext server names callers by the uid owning their socket,
/// and a requester may not approve their own grant, so requests come from the CLI run as this
/// uid and the bench (root) approves and revokes.
const REQUESTER_UID: u32 = 2001;

/// `corral grant request ... --json` as [`REQUESTER_UID`]: the new grant's id.
fn request_grant(
    h: &Harness,
    identity: &str,
    session: &str,
    round: usize,
) -> anyhow::Result<String> {
    let reason = format!("bench round {round}");
    let out = h.server().cli_as(
        REQUESTER_UID,
        &[
            "grant",
            "request",
            "--identity",
            identity,
            "--session",
            session,
            "--grant",
            GRANT,
            "--ttl",
            "600s",
            "--reason",
            &reason,
            "--json",
        ],
    )?;
    ensure!(
        out.status.success(),
        "corral grant request: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let g: serde_json::Value =
        serde_json::from_str(stdout.lines().last().context("a grant printed")?)?;
    Ok(g["id"].as_str().context("grant id")?.to_owned())
}

/// Grant approve → enforced and revoke → enforced: the port is denied by policy; each round
/// requests the grant for the prober's session (pending: not measured), approves it
/// (measured until the prober connects) and revokes it (measured until EPERM).
fn grant_scenario(s: &mut Setup<'_>, o: &Opts) -> anyhow::Result<Report> {
    let h = s.h;
    let r = h.apply(FILE, &policy(s.port, false, o.extra_rules, &s.bindir))?;
    h.wait_acked(r.revision, o.timeout)?;
    s.prober.wait_for(outcome(false), o.timeout)?;
    let (identity, session) = {
        let p = s.prober.principal();
        (p.identity.clone(), p.session.clone())
    };
    let mut client = GrantServiceClient::new(h.channel());
    let (mut approve_rpc, mut approved, mut revoke_rpc, mut revoked) =
        (vec![], vec![], vec![], vec![]);
    for r in 0..o.rounds {
        let id = request_grant(h, &identity, &session, r)
            .with_context(|| format!("grant request, round {r}\n{}", h.logs()))?;
        let decision = pb::GrantDecisionRequest {
            id,
            reason: String::new(),
        };
        let m = s
            .prober
            .measure(outcome(true), o.timeout, || {
                Ok(h.block_on(client.approve(decision.clone()))?)
            })
            .with_context(|| format!("approve, round {r}\n{}", h.logs()))?;
        approve_rpc.push(m.action);
        approved.push(m.enforced);
        std::thread::sleep(o.gap);
        let m = s
            .prober
            .measure(outcome(false), o.timeout, || {
                Ok(h.block_on(client.revoke(decision.clone()))?)
            })
            .with_context(|| format!("revoke, round {r}\n{}", h.logs()))?;
        revoke_rpc.push(m.action);
        revoked.push(m.enforced);
        std::thread::sleep(o.gap);
    }
    let mut both = approved.clone();
    both.extend_from_slice(&revoked);
    Ok(Report {
        title: format!(
            "grant → enforced: {} rounds of request, approve, revoke for the prober's session \
             ({}:127.0.0.1:{} denied by policy, opened by grant `{GRANT}`)",
            o.rounds, s.proto, s.port
        ),
        rows: vec![
            ("Approve RPC returned", Summary::of(&approve_rpc)),
            ("approve → enforced (connect ok)", Summary::of(&approved)),
            ("Revoke RPC returned", Summary::of(&revoke_rpc)),
            ("revoke → enforced (EPERM)", Summary::of(&revoked)),
        ],
        enforced: Summary::of(&both),
    })
}

fn bench(o: &Opts) -> anyhow::Result<()> {
    if let Some(why) = harness::unavailable() {
        bail!("cannot run: {why}");
    }
    let load_before = loadavg();
    // TCP: a listener that accepts (and drops) in the background. UDP: connect() needs none.
    let listener = Listener::tcp("127.0.0.1:0")?;
    let (proto, port) = if o.udp {
        ("udp", corral_tests::fleet::free_port()?)
    } else {
        ("tcp", listener.port)
    };
    let bindir = harness::bin_dir()?.display().to_string();
    let started = Instant::now();
    let h = Harness::start("apply-bench", &[])?;
    let first = h.apply(FILE, &policy(port, true, o.extra_rules, &bindir))?;
    h.wait_acked(first.revision, o.timeout)?;
    let prober = h.prober(IDENTITY, &format!("{proto}:127.0.0.1:{port}"), o.interval)?;
    let mut s = Setup {
        h: &h,
        prober,
        port,
        proto,
        bindir,
    };
    s.prober
        .wait_for("ok", o.timeout)
        .with_context(|| h.logs())?;
    let setup = started.elapsed();

    let reports = vec![apply_scenario(&mut s, o)?, grant_scenario(&mut s, o)?];

    let agent_rss = mib(h.agent_pid());
    let server_rss = mib(h.server_pid());
    let node = h.node_status()?;
    let agent = h.agent_status()?;
    let unexpected = s.prober.unexpected_changes();
    drop(s);
    drop(h);

    println!(
        "real node latency (corral-server + corral-agent --server, loopback plaintext, release \
         builds; prober in a principal: {proto} connect every {} µs, so ≤ ~{:.1} ms sampling \
         delay)",
        o.interval.as_micros(),
        o.interval.as_secs_f64() * 1e3 + 0.1
    );
    let mut met = true;
    for r in &reports {
        println!("{}", r.title);
        println!("{}", Summary::HEADER);
        for (label, sum) in &r.rows {
            println!("{}", sum.row(label));
        }
        met &= r.enforced.p99 <= o.goal;
        println!(
            "goal (issues 6, 7): real node enforced p99 ≤ {} ms: {} (p99 {:.2} ms)",
            o.goal.as_millis(),
            if r.enforced.p99 <= o.goal {
                "met"
            } else {
                "NOT MET"
            },
            r.enforced.p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "context: {} CPUs; load average before {load_before}, after {}; setup {:.1} s; \
         agent RSS {agent_rss:.1} MiB, server RSS {server_rss:.1} MiB; node at revision {} \
         ({} events forwarded, {} dropped in the kernel); outcome changes no action caused: \
         {unexpected}",
        std::thread::available_parallelism().map_or(0, usize::from),
        loadavg(),
        setup.as_secs_f64(),
        node.acked_revision,
        node.events_forwarded,
        agent.events_dropped_kernel,
    );
    if !met && o.require_goal {
        bail!("goal not met");
    }
    Ok(())
}

fn value<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| name.to_owned()),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "corral-apply-bench [--rounds 100] [--interval-us 1000] [--udp] [--extra-rules 0] \
             [--gap-ms 20] [--timeout-ms 5000] [--goal-ms 100] [--require-goal]"
        );
        return Ok(());
    }
    let o = Opts {
        rounds: value(&args, "--rounds", 100)?,
        interval: Duration::from_micros(value(&args, "--interval-us", 1000)?),
        udp: args.iter().any(|a| a == "--udp"),
        extra_rules: value(&args, "--extra-rules", 0)?,
        gap: Duration::from_millis(value(&args, "--gap-ms", 20)?),
        timeout: Duration::from_millis(value(&args, "--timeout-ms", 5000)?),
        goal: Duration::from_millis(value(&args, "--goal-ms", 100)?),
        require_goal: args.iter().any(|a| a == "--require-goal"),
    };
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    bench(&o)
}
