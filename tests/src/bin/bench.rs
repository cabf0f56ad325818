//! `corral-bench`: enforcement overhead, as ratios against baselines measured in the same run
//! (run by `cargo xtask bench`, as root).
//!
//! Configurations: `none` (no programs attached), `unenrolled` (programs attached, principals
//! and policies loaded, the process not enrolled), `10 rules` and `10k rules` (process
//! enrolled; policy of 10 or 10k zones+rules; the measured call is allowed, so it succeeds and
//! records an event, which a reader thread drains as the agent does: woken by the ring
//! buffer or every 20 ms).
//!
//! Noise on a small VM is larger than the effects, so:
//! - each round measures every configuration, and a round's ratios compare measurements taken
//!   seconds apart; the table reports the median of the per-round ratios;
//! - rounds alternate the order (`none` first, then last), so a drift over time does not favour
//!   either side;
//! - a second pass, with the kernel's BPF run-time statistics on, reports how much time the
//!   programs themselves take per operation: a direct measure that no scheduler noise enters
//!   (the statistics cost time themselves, so they are off during the timed rounds).
use std::{
    net::{Ipv4Addr, TcpListener},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use corral_agent::{
    ebpf::Enforcer,
    ebpf::events::EventReader,
    ebpf::{loader::ProgramStats, raw},
};
use corral_policy::compiled::{Action, CompiledPolicy, CompiledSet, ExecRule};
use corral_tests::{TestCgroup, build, probe_bin};

#[path = "bench/marginal.rs"]
mod marginal;

/// Timed rounds; `CORRAL_BENCH_ROUNDS` overrides (at least 1).
const ROUNDS: usize = 12;

struct Workload {
    name: &'static str,
    op: String,
    iters: u32,
    goal_vs_unenrolled: f64,
}

fn policy_with(n: u32, port: u16) -> CompiledPolicy {
    let mut p = build::policy(&format!("bench-{n}"))
        .zone("local", &["127.0.0.0/8"])
        .allow(&["local"], &[port], &[])
        .allow(&["local"], &[], &[agent_common::PROTO_UDP]);
    // n-2 further zones (distinct /32s in 10.0.0.0/8) each with an allow rule.
    for i in 0..n.saturating_sub(2) {
        let name = format!("z{i}");
        let ip = Ipv4Addr::from(0x0a00_0000u32 + i + 1);
        p = p.zone(&name, &[&format!("{ip}/32")]).allow(
            &[name.as_str()],
            &[443],
            &[agent_common::PROTO_TCP],
        );
    }
    p.build()
}

fn time(cg: Option<&Path>, op: &str, iters: u32) -> anyhow::Result<f64> {
    run_probe(cg, &format!("time:{iters}:{op}"), iters, "ok")
}

/// Runs the probe (in `cg`) with `arg`, which prints `ns=<per call>` and outcome counts
/// (`ok=N`, `EPERM=N`); the ns per call, once all `iters` calls had outcome `expect`.
fn run_probe(cg: Option<&Path>, arg: &str, iters: u32, expect: &str) -> anyhow::Result<f64> {
    let mut c = Command::new(probe_bin()?);
    if let Some(cg) = cg {
        c.arg("--cgroup").arg(cg);
    }
    let out = c.arg(arg).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let ns: f64 = field("ns").context("probe printed no ns=")?.parse()?;
    let got: u32 = field(expect).map_or(Ok(0), str::parse)?;
    anyhow::ensure!(got == iters, "{arg}: {got}/{iters} calls {expect}: {text}");
    Ok(ns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The configurations, in table order.
const NONE: usize = 0;
const UNENROLLED: usize = 1;
const SMALL: usize = 2;
const BIG: usize = 3;
/// `unenrolled` with the packet programs also at the cgroup root, as before they were scoped to
/// the principals' cgroups.
const ROOT_SKB: usize = 4;

/// An enforcer loaded as the agent would have it: programs attached at the root, two
/// principals enrolled, the 10- and 10k-rule policies applied.
struct Loaded {
    enforcer: Enforcer,
    apply_ms: f64,
}

struct Setup {
    plain: TestCgroup,
    small: TestCgroup,
    big: TestCgroup,
    set: CompiledSet,
}

impl Setup {
    fn load(&self) -> anyhow::Result<Loaded> {
        let (small_id, big_id) = (self.small.id()?, self.big.id()?);
        let mut e = Enforcer::load_and_attach(&self.plain.root)?;
        e.maps()
            .add_principal(small_id, self.small.level(), 1, Some(0))?;
        e.maps()
            .add_principal(big_id, self.big.level(), 2, Some(1))?;
        let t = std::time::Instant::now();
        // The exec workload runs /bin/true in the enrolled cgroups: allowed by an exact rule
        // (default deny applies to exec too).
        let allow_true = vec![ExecRule {
            index: 0,
            action: Action::Allow,
            exact: vec!["/bin/true".into()],
            prefixes: vec![],
        }];
        let mut set = self.set.clone();
        for p in &mut set.policies {
            p.exec.clone_from(&allow_true);
        }
        e.maps()
            .apply(&set, |cg, _| Some(if cg == small_id { 0 } else { 1 }))?;
        Ok(Loaded {
            enforcer: e,
            apply_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn cgroup(&self, config: usize) -> &Path {
        match config {
            SMALL => &self.small.path,
            BIG => &self.big.path,
            _ => &self.plain.path,
        }
    }
}

/// Drains the ring buffer as the agent does: woken by the kernel (a deny, or a quarter of the
/// ring unread) or every 20 ms.
struct Drainer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl Drainer {
    fn start(mut reader: EventReader) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let fd = reader.ring().as_fd().as_raw_fd();
            let mut buf = Vec::new();
            let mut n = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the ring buffer's fd outlives this loop.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                reader.drain(&mut buf);
                n += buf.len();
                buf.clear();
            }
            n
        });
        Self { stop, thread }
    }

    fn stop(self) -> anyhow::Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("drainer panicked"))
    }
}

/// Times every workload in the enrolled configurations and `unenrolled`, with the enforcer
/// loaded; returns the events read and the kernel's drop count.
fn time_loaded(
    setup: &Setup,
    loaded: &mut Loaded,
    workloads: &[Workload],
    cells: &mut [[Vec<f64>; 5]],
) -> anyhow::Result<(usize, u64)> {
    let drainer = Drainer::start(EventReader::take(loaded.enforcer.maps())?);
    for (w, wl) in workloads.iter().enumerate() {
        for config in [UNENROLLED, SMALL, BIG] {
            cells[w][config].push(time(Some(setup.cgroup(config)), &wl.op, wl.iters)?);
        }
    }
    let root = corral_agent::cgroup::id(&setup.plain.root)?;
    loaded.enforcer.maps().attach_packet_programs_at(root)?;
    for (w, wl) in workloads.iter().enumerate() {
        let cg = setup.cgroup(UNENROLLED);
        cells[w][ROOT_SKB].push(time(Some(cg), &wl.op, wl.iters)?);
    }
    let events = drainer.stop()?;
    Ok((events, loaded.enforcer.maps().kernel_drops()?))
}

/// One configuration's share of the kernel's BPF run-time statistics for a workload.
#[derive(Default)]
struct KernelCost {
    /// Program time per operation, each run net of the empty program's run time.
    net_ns_per_op: f64,
    /// `name ns/run` (gross) of each program that ran.
    programs: Vec<String>,
}

/// The kernel's own accounting of the programs' time, one pass per workload and configuration,
/// and the run time it reports for an empty program (what the statistics and the bare call
/// cost), which is subtracted from each run.
struct KernelCosts {
    empty_ns_per_run: f64,
    rows: Vec<[KernelCost; 3]>,
}

const CALIBRATION: &str = "corral_calib";

fn kernel_cost(setup: &Setup, workloads: &[Workload]) -> anyhow::Result<KernelCosts> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enable BPF run-time statistics")?;
    let mut loaded = setup.load()?;
    // The empty program runs beside the real ones for every connect in the un-enrolled cgroup.
    let empty = raw::constant_sock_addr(CALIBRATION, raw::ATTACH_INET4_CONNECT, 1)
        .map_err(anyhow::Error::msg)?;
    let _empty_link = raw::link_cgroup(
        &empty,
        &std::fs::File::open(&setup.plain.path)?,
        raw::ATTACH_INET4_CONNECT,
    )?;
    let drainer = Drainer::start(EventReader::take(loaded.enforcer.maps())?);
    let mut passes = Vec::new();
    let (mut empty_runs, mut empty_ns) = (0u64, 0u128);
    for wl in workloads {
        let mut row: [Vec<(String, u64, u128)>; 3] = Default::default();
        for (i, config) in [UNENROLLED, SMALL, BIG].into_iter().enumerate() {
            let (before, e0) = (loaded.enforcer.program_stats(), calibration_stats());
            time(Some(setup.cgroup(config)), &wl.op, wl.iters)?;
            let (after, e1) = (loaded.enforcer.program_stats(), calibration_stats());
            empty_runs += e1.0.saturating_sub(e0.0);
            empty_ns += e1.1.saturating_sub(e0.1);
            row[i] = stats_delta(&before, &after);
        }
        passes.push(row);
    }
    drainer.stop()?;
    anyhow::ensure!(empty_runs > 0, "the calibration program never ran");
    let empty_ns_per_run = empty_ns as f64 / empty_runs as f64;
    let rows = passes
        .into_iter()
        .zip(workloads)
        .map(|(row, wl)| {
            row.map(|progs| KernelCost {
                net_ns_per_op: progs
                    .iter()
                    .map(|(_, runs, ns)| (*ns as f64 - empty_ns_per_run * *runs as f64).max(0.0))
                    .sum::<f64>()
                    / f64::from(wl.iters),
                programs: progs
                    .iter()
                    .map(|(name, runs, ns)| format!("{name} {:.0}", *ns as f64 / *runs as f64))
                    .collect(),
            })
        })
        .collect();
    Ok(KernelCosts {
        empty_ns_per_run,
        rows,
    })
}

/// Runs and nanoseconds of the calibration program so far.
fn calibration_stats() -> (u64, u128) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(CALIBRATION))
        .fold((0, 0), |(r, t), p| {
            (r + p.run_count(), t + p.run_time().as_nanos())
        })
}

/// (program, runs, nanoseconds) of each program that ran between two snapshots.
fn stats_delta(before: &[ProgramStats], after: &[ProgramStats]) -> Vec<(String, u64, u128)> {
    let mut ran: Vec<(String, u64, u128)> = after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.name == a.name)?;
            let runs = a.runs.saturating_sub(b.runs);
            (runs > 0).then(|| {
                (
                    a.name.clone(),
                    runs,
                    a.run_time.saturating_sub(b.run_time).as_nanos(),
                )
            })
        })
        .collect();
    ran.sort();
    ran
}

fn main() -> anyhow::Result<()> {
    // A deep accept queue: with std's default backlog (128) the loop of connects overflows it
    // and SYN retransmits (1 s) dominate the TCP timing.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    sock.listen(4096)?;
    let listener: TcpListener = sock.into();
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let workloads = [
        Workload {
            name: "UDP connect()",
            op: format!("udp:127.0.0.1:{port}"),
            iters: 20_000,
            goal_vs_unenrolled: 1.35,
        },
        Workload {
            name: "TCP connect+accept",
            op: format!("tcp:127.0.0.1:{port}"),
            iters: 5_000,
            goal_vs_unenrolled: 1.03,
        },
        Workload {
            name: "fork+exec /bin/true",
            op: "spawn:/bin/true".into(),
            iters: 300,
            goal_vs_unenrolled: 1.03,
        },
    ];
    let setup = Setup {
        plain: TestCgroup::new("bench-plain")?,
        small: TestCgroup::new("bench-10")?,
        big: TestCgroup::new("bench-10k")?,
        set: build::set(1, vec![policy_with(10, port), policy_with(10_000, port)]),
    };

    // cells[workload][config]: one measurement per round.
    let mut cells: Vec<[Vec<f64>; 5]> = workloads.iter().map(|_| Default::default()).collect();
    let mut apply_ms = Vec::new();
    let rounds = std::env::var("CORRAL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(ROUNDS)
        .max(1);
    for round in 0..rounds {
        let none_first = round % 2 == 0;
        let time_none = |cells: &mut [[Vec<f64>; 5]]| -> anyhow::Result<()> {
            for (w, wl) in workloads.iter().enumerate() {
                cells[w][NONE].push(time(Some(&setup.plain.path), &wl.op, wl.iters)?);
            }
            Ok(())
        };
        if none_first {
            time_none(&mut cells)?;
        }
        let mut loaded = setup.load()?;
        apply_ms.push(loaded.apply_ms);
        let (events, drops) = time_loaded(&setup, &mut loaded, &workloads, &mut cells)?;
        drop(loaded);
        if !none_first {
            time_none(&mut cells)?;
        }
        eprintln!(
            "round {}/{rounds}: {events} events read, {drops} dropped",
            round + 1
        );
    }
    let cost = kernel_cost(&setup, &workloads)?;
    // Where `sendto()` lands: bound, never read (a full queue drops; nothing answers ICMP).
    let sink = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let udp_port = sink.local_addr()?.port();

    println!();
    println!(
        "{:<22} {:>10} {:>12} {:>10} {:>10} {:>12} | {:>12} {:>12} {:>12} {:>12}  goal",
        "workload (ns/op)",
        "none",
        "unenrolled",
        "10 rules",
        "10k rules",
        "unenr@root",
        "unenr/none",
        "10/unenr",
        "10k/unenr",
        "@root/none"
    );
    for (w, wl) in workloads.iter().enumerate() {
        let c = &cells[w];
        let m: Vec<f64> = c.iter().map(|v| median(v.clone())).collect();
        let ratio = |num: usize, den: usize| {
            median(c[num].iter().zip(&c[den]).map(|(a, b)| a / b).collect())
        };
        println!(
            "{:<22} {:>10.0} {:>12.0} {:>10.0} {:>10.0} {:>12.0} | {:>12.3} {:>12.3} {:>12.3} {:>12.3}  enrolled <= {:.2}x, unenrolled <= 1.01x",
            wl.name,
            m[NONE],
            m[UNENROLLED],
            m[SMALL],
            m[BIG],
            m[ROOT_SKB],
            ratio(UNENROLLED, NONE),
            ratio(SMALL, UNENROLLED),
            ratio(BIG, UNENROLLED),
            ratio(ROOT_SKB, NONE),
            wl.goal_vs_unenrolled
        );
    }
    println!(
        "ns/op: medians over {rounds} rounds; ratios: medians of the {rounds} per-round ratios \
         (rounds alternate whether `none` runs first or last)"
    );
    println!(
        "policy apply (10 + 10k rules, into the kernel maps): median {:.1} ms over {rounds} rounds",
        median(apply_ms)
    );
    println!();
    println!(
        "time in the programs per op, from the kernel's BPF run-time statistics (one pass): \
         each run net of the {:.0} ns/run an empty program reports",
        cost.empty_ns_per_run
    );
    println!(
        "{:<22} {:>12} {:>10} {:>10} | {:>12}  programs that ran un-enrolled (gross ns/run)",
        "workload (ns/op)", "unenrolled", "10 rules", "10k rules", "1+unenr/none"
    );
    for (w, wl) in workloads.iter().enumerate() {
        let row = &cost.rows[w];
        let none = median(cells[w][NONE].clone());
        println!(
            "{:<22} {:>12.1} {:>10.1} {:>10.1} | {:>12.4}  {}",
            wl.name,
            row[0].net_ns_per_op,
            row[1].net_ns_per_op,
            row[2].net_ns_per_op,
            1.0 + row[0].net_ns_per_op / none,
            row[0].programs.join(", ")
        );
    }
    println!(
        "(the programs also run for the node's other processes during a pass: exec_fork and \
         exec_exit from other tasks can appear)"
    );
    marginal::run(&setup, port, udp_port, rounds)?;
    drop(sink);
    Ok(())
}
