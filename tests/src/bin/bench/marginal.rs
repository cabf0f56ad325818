//! The marginal cost of a decision: the syscall alone, on a UDP socket created once
//! (`connect()` again and again, or `sendto()` on an unconnected socket), and the exec loop,
//! so socket setup does not dilute the hooks' share.
//!
//! Configurations, all in one round, rounds alternating whether `none` runs first or last:
//! - `none`: no programs attached;
//! - `empty`: only a trivial connect4 and sendmsg4 program (return 1) on the caller's cgroup,
//!   what any cgroup hook costs at all;
//! - `sys tp`: no programs, only the `syscalls:sys_enter_socket` trace event enabled (through
//!   tracefs), what Corral's socket-family guard costs a syscall that is not `socket()`: any
//!   syscall tracepoint sends every task's every syscall through the kernel's slow entry path;
//! - `unenr`: Corral's programs attached, principals and policies loaded, the caller not
//!   enrolled;
//! - `allow 10`, `allow 10k`: enrolled, the call allowed (an event each, drained as the agent
//!   does), under the 10- and 10k-rule policies;
//! - `allow 1kP`: `allow 10` with 1,000 principals enrolled instead of 2;
//! - `deny 10k`: enrolled, the call denied (EPERM) by default under the 10k-rule policy;
//! - `unenr@root`: `unenr` with the packet programs also attached at the cgroup root, as they
//!   were before they were scoped to the principals' cgroups (the before of that change).
//!
//! Reported: medians of ns per call; per-round differences net of `empty` (medians), checked
//! against the targets; and, from the kernel's BPF run-time statistics in a separate pass,
//! where the time goes per program.

use std::path::Path;

use anyhow::Context as _;
use corral_agent::ebpf::{events::EventReader, raw};

use super::{CALIBRATION, Drainer, Setup, calibration_stats, median, run_probe, stats_delta};

const NONE: usize = 0;
const EMPTY: usize = 1;
const SYS_TP: usize = 2;
const UNENR: usize = 3;
const ALLOW10: usize = 4;
const ALLOW10K: usize = 5;
const ALLOW_1KP: usize = 6;
const DENY10K: usize = 7;
const UNENR_ROOT: usize = 8;
const NAMES: [&str; 9] = [
    "none",
    "empty",
    "sys tp",
    "unenr",
    "allow 10",
    "allow 10k",
    "allow 1kP",
    "deny 10k",
    "unenr@root",
];

/// Principals in the `allow 1kP` configuration.
const MANY: u32 = 1_000;

/// Net of `empty`, ns: un-enrolled, enrolled allow, enrolled deny.
const TARGETS: [(usize, f64); 5] = [
    (UNENR, 25.0),
    (ALLOW10, 120.0),
    (ALLOW10K, 120.0),
    (ALLOW_1KP, 120.0),
    (DENY10K, 150.0),
];

struct Marginal {
    name: &'static str,
    /// The probe argument when the call is allowed, and when it is denied (`None`: no deny
    /// column).
    allow: String,
    deny: Option<String>,
    iters: u32,
}

fn workloads(port: u16, udp_port: u16) -> [Marginal; 3] {
    const CONNECT: u32 = 200_000;
    const SENDTO: u32 = 100_000;
    // Denied: in no zone, default deny (no packet is sent either way for the connect).
    let denied = "192.0.2.1:9";
    [
        Marginal {
            name: "UDP connect() again",
            allow: format!("loop:{CONNECT}:connect:127.0.0.1:{port}"),
            deny: Some(format!("loop:{CONNECT}:connect:{denied}")),
            iters: CONNECT,
        },
        Marginal {
            name: "UDP sendto()",
            allow: format!("loop:{SENDTO}:sendto:127.0.0.1:{udp_port}"),
            deny: Some(format!("loop:{SENDTO}:sendto:{denied}")),
            iters: SENDTO,
        },
        Marginal {
            name: "fork+exec /bin/true",
            allow: "time:300:spawn:/bin/true".into(),
            deny: None,
            iters: 300,
        },
    ]
}

/// One measurement of `w` in configuration `config` (the programs as that configuration
/// needs them are in place); `None` for a deny column the workload has not.
fn measure(setup: &Setup, w: &Marginal, config: usize) -> anyhow::Result<Option<f64>> {
    let (cg, arg, expect) = match config {
        NONE | EMPTY | SYS_TP | UNENR | UNENR_ROOT => (&setup.plain.path, &w.allow, "ok"),
        ALLOW10 | ALLOW_1KP => (&setup.small.path, &w.allow, "ok"),
        ALLOW10K => (&setup.big.path, &w.allow, "ok"),
        _ => match &w.deny {
            Some(d) => (&setup.big.path, d, "EPERM"),
            None => return Ok(None),
        },
    };
    run_probe(Some(cg), arg, w.iters, expect).map(Some)
}

/// The trivial connect4 and sendmsg4 programs, linked to the cgroups `at` while held.
fn empty_programs(at: &[&Path]) -> anyhow::Result<Vec<std::os::fd::OwnedFd>> {
    let mut held = Vec::new();
    for attach in [raw::ATTACH_INET4_CONNECT, raw::ATTACH_UDP4_SENDMSG] {
        let prog = raw::constant_sock_addr(CALIBRATION, attach, 1).map_err(anyhow::Error::msg)?;
        for cg in at {
            held.push(raw::link_cgroup(&prog, &std::fs::File::open(cg)?, attach)?);
        }
        held.push(prog);
    }
    Ok(held)
}

/// The `syscalls:sys_enter_socket` trace event, enabled while held (through tracefs: no
/// program runs on the measured calls either way, and what a syscall pays for the tracepoint
/// is the same whoever listens).
struct SyscallTracepoint(std::path::PathBuf);

impl SyscallTracepoint {
    fn enable() -> anyhow::Result<Self> {
        let path = Path::new("/sys/kernel/tracing/events/syscalls/sys_enter_socket/enable");
        std::fs::write(path, "1").with_context(|| format!("enable {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for SyscallTracepoint {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.0, "0") {
            eprintln!("could not disable {}: {e}", self.0.display());
        }
    }
}

/// Enrols `MANY - 2` more principals (cgroup ids no process has) beside the bench's two.
fn enrol_many(maps: &mut corral_agent::ebpf::PolicyMaps, level: u32) -> anyhow::Result<()> {
    for i in 0..MANY - 2 {
        maps.add_principal(0x7fff_0000_0000 + u64::from(i), level, 3 + i, Some(0))?;
    }
    Ok(())
}

/// cells[workload][config]: one value per round.
type Cells = Vec<[Vec<f64>; 9]>;

pub fn run(setup: &Setup, port: u16, udp_port: u16, rounds: usize) -> anyhow::Result<()> {
    let ws = workloads(port, udp_port);
    let mut cells: Cells = ws.iter().map(|_| Default::default()).collect();
    let push = |cells: &mut Cells, w: usize, c: usize, v: Option<f64>| {
        if let Some(v) = v {
            cells[w][c].push(v);
        }
    };
    for round in 0..rounds {
        let none_first = round % 2 == 0;
        let bare = |cells: &mut Cells| -> anyhow::Result<()> {
            for (i, w) in ws.iter().enumerate() {
                push(cells, i, NONE, measure(setup, w, NONE)?);
            }
            let held = empty_programs(&[&setup.plain.path])?;
            for (i, w) in ws.iter().enumerate() {
                push(cells, i, EMPTY, measure(setup, w, EMPTY)?);
            }
            drop(held);
            let tp = SyscallTracepoint::enable()?;
            for (i, w) in ws.iter().enumerate() {
                push(cells, i, SYS_TP, measure(setup, w, SYS_TP)?);
            }
            drop(tp);
            Ok(())
        };
        if none_first {
            bare(&mut cells)?;
        }
        let mut loaded = setup.load()?;
        let drainer = Drainer::start(EventReader::take(loaded.enforcer.maps())?);
        for (i, w) in ws.iter().enumerate() {
            for c in [UNENR, ALLOW10, ALLOW10K, DENY10K] {
                push(&mut cells, i, c, measure(setup, w, c)?);
            }
        }
        enrol_many(loaded.enforcer.maps(), setup.small.level())?;
        for (i, w) in ws.iter().enumerate() {
            push(&mut cells, i, ALLOW_1KP, measure(setup, w, ALLOW_1KP)?);
        }
        let root = corral_agent::cgroup::id(&setup.plain.root)?;
        loaded.enforcer.maps().attach_packet_programs_at(root)?;
        for (i, w) in ws.iter().enumerate() {
            push(&mut cells, i, UNENR_ROOT, measure(setup, w, UNENR_ROOT)?);
        }
        let events = drainer.stop()?;
        let drops = loaded.enforcer.maps().kernel_drops()?;
        drop(loaded);
        if !none_first {
            bare(&mut cells)?;
        }
        eprintln!(
            "marginal round {}/{rounds}: {events} events read, {drops} dropped",
            round + 1
        );
    }
    report(&ws, &cells, rounds);
    where_the_time_goes(setup, &ws)
}

/// Median of the per-round `a - b` (rounds where both were measured).
fn diff(c: &[Vec<f64>; 9], a: usize, b: usize) -> Option<f64> {
    (!c[a].is_empty()).then(|| median(c[a].iter().zip(&c[b]).map(|(x, y)| x - y).collect()))
}

fn ratio(c: &[Vec<f64>; 9], a: usize, b: usize) -> Option<f64> {
    (!c[a].is_empty()).then(|| median(c[a].iter().zip(&c[b]).map(|(x, y)| x / y).collect()))
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

fn report(ws: &[Marginal], cells: &Cells, rounds: usize) {
    println!();
    println!("marginal cost of a decision (ns per call, medians over {rounds} rounds)");
    print!("{:<22}", "workload");
    for n in NAMES {
        print!(" {n:>10}");
    }
    println!();
    for (w, c) in ws.iter().zip(cells) {
        print!("{:<22}", w.name);
        for v in c {
            print!(
                " {:>10}",
                cell((!v.is_empty()).then(|| median(v.clone())), 0)
            );
        }
        println!();
    }
    println!();
    println!(
        "net of `empty` (`sys tp`: of `none`; ns, median of per-round differences) and ratios \
         (median per round)"
    );
    print!("{:<22}", "workload");
    for n in &NAMES[SYS_TP..] {
        print!(" {n:>10}");
    }
    println!("  targets: unenr <= +25, allow <= +120, deny <= +150");
    for (w, c) in ws.iter().zip(cells) {
        print!("{:<22}", w.name);
        // (`sys tp` has no program: net of `none`.)
        print!(" {:>10}", cell(diff(c, SYS_TP, NONE), 1));
        for i in UNENR..NAMES.len() {
            print!(" {:>10}", cell(diff(c, i, EMPTY), 1));
        }
        let missed: Vec<String> = TARGETS
            .iter()
            .filter_map(|&(i, t)| {
                let d = diff(c, i, EMPTY)?;
                (d > t).then(|| format!("{} +{d:.0} > +{t:.0}", NAMES[i]))
            })
            .collect();
        if w.name.starts_with("fork") {
            println!("  (exec: no sock_addr program runs; `empty` = bare)");
        } else if missed.is_empty() {
            println!("  all met");
        } else {
            println!("  missed: {}", missed.join(", "));
        }
        print!("{:<22}", "  vs none");
        for i in SYS_TP..NAMES.len() {
            print!(" {:>10}", cell(ratio(c, i, NONE), 3));
        }
        println!();
        print!("{:<22}", "  vs empty");
        print!(" {:>10}", "-");
        for i in UNENR..NAMES.len() {
            print!(" {:>10}", cell(ratio(c, i, EMPTY), 3));
        }
        println!();
    }
}

/// One pass with the kernel's run-time statistics on: each program's ns per run (gross, and
/// net of the empty program's run), per workload and configuration.
fn where_the_time_goes(setup: &Setup, ws: &[Marginal]) -> anyhow::Result<()> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enable BPF run-time statistics")?;
    let mut loaded = setup.load()?;
    let held = empty_programs(&[&setup.plain.path, &setup.small.path, &setup.big.path])?;
    let drainer = Drainer::start(EventReader::take(loaded.enforcer.maps())?);
    println!();
    println!("where the time goes: BPF run-time statistics, one pass (ns per run of each program)");
    for w in ws.iter().filter(|w| w.deny.is_some()) {
        for c in [UNENR, ALLOW10, ALLOW10K, DENY10K] {
            let (before, e0) = (loaded.enforcer.program_stats(), calibration_stats());
            measure(setup, w, c)?;
            let (after, e1) = (loaded.enforcer.program_stats(), calibration_stats());
            let empty =
                (e1.1.saturating_sub(e0.1)) as f64 / (e1.0.saturating_sub(e0.0)).max(1) as f64;
            let progs: Vec<String> = stats_delta(&before, &after)
                .iter()
                .filter(|(_, runs, _)| *runs >= u64::from(w.iters) / 2)
                .map(|(name, runs, ns)| {
                    let per = *ns as f64 / *runs as f64;
                    format!("{name} {per:.0} (net {:.0})", per - empty)
                })
                .collect();
            println!(
                "  {:<22} {:<10} empty program {empty:.0}; {}",
                w.name,
                NAMES[c],
                progs.join(", ")
            );
        }
    }
    drainer.stop()?;
    drop(held);
    Ok(())
}
