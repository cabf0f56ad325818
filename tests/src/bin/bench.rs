//! `corral-bench`: enforcement overhead, as ratios against baselines measured in the same run
//! (run by `cargo xtask bench`, as root). Rounds interleave the configurations so machine noise
//! hits them alike; each cell is the median over rounds.
//!
//! Configurations: `none` (no programs attached), `unenrolled` (programs attached, process
//! not enrolled), `10 rules` and `10k rules` (process enrolled; policy of 10 or 10k
//! zones+rules; the measured call is allowed, so it succeeds and records an event, which a
//! reader thread drains as the agent would).
use std::{
    net::{Ipv4Addr, TcpListener},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use corral_agent::{
    compiled::{Action, CompiledPolicy, ExecRule, PolicyAddenda},
    ebpf::Enforcer,
    ebpf::events::EventReader,
};
use corral_tests::{TestCgroup, build, probe_bin};

const ROUNDS: usize = 5;

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
    let mut c = Command::new(probe_bin()?);
    if let Some(cg) = cg {
        c.arg("--cgroup").arg(cg);
    }
    let out = c.arg(format!("time:{iters}:{op}")).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ns = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ns="))
        .context("probe printed no ns=")?
        .parse::<f64>()?;
    let oks: u32 = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ok="))
        .context("probe printed no ok=")?
        .parse()?;
    anyhow::ensure!(
        oks == iters,
        "{op}: only {oks}/{iters} calls succeeded: {text}"
    );
    Ok(ns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let plain = TestCgroup::new("bench-plain")?;
    let small = TestCgroup::new("bench-10")?;
    let big = TestCgroup::new("bench-10k")?;
    let set = build::set(1, vec![policy_with(10, port), policy_with(10_000, port)]);
    let (small_id, big_id) = (small.id()?, big.id()?);

    // cells[workload][config]
    let mut cells: Vec<[Vec<f64>; 4]> = workloads.iter().map(|_| Default::default()).collect();
    let mut apply_ms = Vec::new();
    for round in 0..ROUNDS {
        for (w, wl) in workloads.iter().enumerate() {
            cells[w][0].push(time(Some(&plain.path), &wl.op, wl.iters)?);
        }
        let mut e = Enforcer::load_and_attach(&plain.root)?;
        e.maps()
            .add_principal(small_id, small.level(), 1, Some(0))?;
        e.maps().add_principal(big_id, big.level(), 2, Some(1))?;
        let t = std::time::Instant::now();
        // The exec workload runs /bin/true in the enrolled cgroups: allowed by an exact rule
        // (default deny applies to exec too).
        let allow_true = PolicyAddenda {
            exec: vec![ExecRule {
                index: 0,
                action: Action::Allow,
                exact: vec!["/bin/true".into()],
                prefixes: vec![],
            }],
            ..PolicyAddenda::default()
        };
        e.maps()
            .apply_with_addenda(&set, &[allow_true.clone(), allow_true], |cg, _| {
                Some(if cg == small_id { 0 } else { 1 })
            })?;
        apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let mut reader = EventReader::take(e.maps())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let drainer = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut n = 0usize;
            while !stop2.load(Ordering::Relaxed) {
                reader.drain(&mut buf);
                n += buf.len();
                buf.clear();
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        });
        for (w, wl) in workloads.iter().enumerate() {
            cells[w][1].push(time(Some(&plain.path), &wl.op, wl.iters)?);
            cells[w][2].push(time(Some(&small.path), &wl.op, wl.iters)?);
            cells[w][3].push(time(Some(&big.path), &wl.op, wl.iters)?);
        }
        stop.store(true, Ordering::Relaxed);
        let events = drainer
            .join()
            .map_err(|_| anyhow::anyhow!("drainer panicked"))?;
        let drops = e.maps().kernel_drops()?;
        eprintln!(
            "round {}/{ROUNDS}: {events} events read, {drops} dropped",
            round + 1
        );
        drop(e);
    }

    println!();
    println!(
        "{:<22} {:>10} {:>12} {:>10} {:>10} | {:>12} {:>12} {:>12}  goal",
        "workload (ns/op)",
        "none",
        "unenrolled",
        "10 rules",
        "10k rules",
        "unenr/none",
        "10/unenr",
        "10k/unenr"
    );
    for (w, wl) in workloads.iter().enumerate() {
        let m: Vec<f64> = cells[w].iter().map(|v| median(v.clone())).collect();
        println!(
            "{:<22} {:>10.0} {:>12.0} {:>10.0} {:>10.0} | {:>12.3} {:>12.3} {:>12.3}  enrolled <= {:.2}x, unenrolled <= 1.01x",
            wl.name,
            m[0],
            m[1],
            m[2],
            m[3],
            m[1] / m[0],
            m[2] / m[1],
            m[3] / m[1],
            wl.goal_vs_unenrolled
        );
    }
    println!(
        "policy apply (10 + 10k rules, into the kernel maps): median {:.1} ms over {ROUNDS} rounds",
        median(apply_ms)
    );
    println!("medians over {ROUNDS} interleaved rounds; 2-core VM, expect noise of a few percent");
    Ok(())
}
