//! `corral-dns-bench`: zones by host name, measured against baselines taken in the same run
//! (run by `cargo xtask bench dns`, as root). Absolute numbers on a 2-core VM mean little; the
//! ratios are the result.
//!
//! - **Proxy latency and throughput**: a real `corral-agent` with its DNS proxy forwarding to a
//!   real `dnsmasq`. One client in a principal sends its queries to a resolver address (the
//!   kernel redirects them to the proxy); the baseline is the same client, outside any
//!   principal, asking dnsmasq directly. p50/p99 per lookup and lookups per second.
//! - **Connect overhead with learned addresses**: the real programs (no agent), a process in
//!   an enrolled principal connecting (UDP `connect()`: the hook, no packet) to an address
//!   opened by name, with 1 and 10k (principal, address) entries in `LEARNED`, against the
//!   same connect under a CIDR-only policy. Mean ns per connect, median over rounds.
//! - **Memory with 100k learned addresses**: the kernel map's memory (`memlock`, fixed by its
//!   size), and the agent's per-address name table (the same type, 100k entries, RSS delta).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, TcpListener},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use corral_agent::{clock::boottime_ns, ebpf::Enforcer};
use corral_tests::{
    Outcome, TestCgroup,
    build::{policy, set},
    dnsmasq::{Dnsmasq, Record},
    fleet::{Agent, Dir, Node, free_port},
    probe_in, probe_outside,
};

const ID: &str = "spiffe://bench.corral/agent/dns";
const NAME: &str = "bench.corral.test";
const LOOKUPS: usize = 3000;
const ROUNDS: usize = 7;
const CONNECTS: u32 = 20_000;

fn field(line: &str, key: &str) -> anyhow::Result<f64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .with_context(|| format!("no {key} in {line}"))?
        .parse()
        .with_context(|| format!("{key} in {line}"))
}

fn one(out: Vec<Outcome>) -> anyhow::Result<String> {
    match out.as_slice() {
        [Outcome::Errno(l)] if l.contains("p50=") || l.contains("ns=") => Ok(l.clone()),
        other => bail!("unexpected probe output {other:?}"),
    }
}

fn proxy(dir: &Dir) -> anyhow::Result<()> {
    let resolver = Dnsmasq::start(dir, &[Record::Address(NAME, "127.0.0.2")], 300)?;
    let node = Node::new(dir, "n1")?.context("bpffs")?;
    let pol = dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: {{ name: dns-bench }}
spec:
  identities: [\"spiffe://bench.corral/agent/**\"]
  defaultAction: deny
  zones:
    bench: {{ hosts: [{NAME}] }}
  connect:
    - {{ action: allow, zones: [bench], ports: [443] }}
  exec:
    - {{ action: allow, paths: [\"{}/**\"] }}
",
            corral_tests::harness::bin_dir()?.display()
        ),
    )?;
    let upstream = resolver.addr.to_string();
    let port = free_port()?.to_string();
    let _agent = Agent::standalone(
        &node,
        &pol,
        &["--dns-upstream", &upstream, "--dns-port", &port],
    )?;
    let direct = format!("dnslat:{LOOKUPS}:{NAME}@{}", resolver.addr);
    let via = format!("dnslat:{LOOKUPS}:{NAME}@192.0.2.53:53");
    let (mut base, mut prox) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        let b = || one(probe_outside(&[&direct])?);
        let p = || -> anyhow::Result<String> {
            let l = node.probe_as(ID, "bench", &[&via])?;
            l.into_iter().next().context("no output")
        };
        if r % 2 == 0 {
            base.push(b()?);
            prox.push(p()?);
        } else {
            prox.push(p()?);
            base.push(b()?);
        }
    }
    let med = |v: &[String], k: &str| -> anyhow::Result<f64> {
        let mut x: Vec<f64> = v.iter().map(|l| field(l, k)).collect::<Result<_, _>>()?;
        x.sort_by(f64::total_cmp);
        Ok(x[x.len() / 2])
    };
    println!("## DNS proxy: {LOOKUPS} lookups x {ROUNDS} rounds, one client, medians over rounds");
    println!("| | p50 | p99 | lookups/s |");
    println!("| --- | --- | --- | --- |");
    for (label, v) in [
        ("dnsmasq direct (baseline)", &base),
        ("through the proxy (principal, redirected)", &prox),
    ] {
        println!(
            "| {label} | {:.0} µs | {:.0} µs | {:.0} |",
            med(v, "p50")? / 1e3,
            med(v, "p99")? / 1e3,
            med(v, "qps")?
        );
    }
    let added50 = (med(&prox, "p50")? - med(&base, "p50")?) / 1e3;
    let added99 = (med(&prox, "p99")? - med(&base, "p99")?) / 1e3;
    println!(
        "added per lookup: p50 {added50:.0} µs, p99 {added99:.0} µs (goal: p99 ≤ 1000 µs: {}); throughput {:.2}x the baseline",
        if added99 <= 1000.0 { "met" } else { "NOT met" },
        med(&prox, "qps")? / med(&base, "qps")?
    );
    Ok(())
}

fn connects() -> anyhow::Result<()> {
    let l = TcpListener::bind("127.0.0.2:0")?;
    let port = l.local_addr()?.port();
    let cg = TestCgroup::new("dns-bench")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 1, Some(0))?;
    let cidr = set(
        1,
        vec![
            policy("cidr")
                .zone("local", &["127.0.0.0/8"])
                .allow(&["local"], &[port], &[])
                .build(),
        ],
    );
    let named = set(
        2,
        vec![
            policy("named")
                .hosts_zone("bench", &[NAME])
                .allow(&["bench"], &[port], &[])
                .build(),
        ],
    );
    let op = format!("time:{CONNECTS}:udp:127.0.0.2:{port}");
    // Each configuration: apply, (learn), time; rounds alternate the order.
    let apply_cidr = |e: &mut Enforcer| -> anyhow::Result<()> {
        e.maps().apply(&cidr, |_, _| Some(0))?;
        Ok(())
    };
    let apply_named = |e: &mut Enforcer, extra: u32| -> anyhow::Result<()> {
        e.maps().apply(&named, |_, _| Some(0))?;
        let key = agent_common::policy_key(e.maps().config()?.generation & 1, 0);
        let until = boottime_ns()? + 3_600_000_000_000;
        let ip: IpAddr = "127.0.0.2".parse()?;
        e.maps().dns().learn(1, ip, key, 0, until)?;
        for i in 0..extra {
            let a = IpAddr::V4(Ipv4Addr::from(0x0b00_0000u32 + i));
            e.maps().dns().learn(1 + (i % 7), a, key, 0, until)?;
        }
        Ok(())
    };
    let time = |cg: &TestCgroup| -> anyhow::Result<f64> {
        field(&one(probe_in(&cg.path, &[&op])?)?, "ns")
    };
    let (mut c, mut n1, mut n10k) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        let mut order = [0u8, 1, 2];
        if r % 2 == 1 {
            order.reverse();
        }
        for which in order {
            match which {
                0 => {
                    apply_cidr(&mut e)?;
                    c.push(time(&cg)?);
                }
                1 => {
                    apply_named(&mut e, 0)?;
                    n1.push(time(&cg)?);
                }
                _ => {
                    apply_named(&mut e, 10_000)?;
                    n10k.push(time(&cg)?);
                }
            }
            let now = boottime_ns()?;
            e.maps().dns().sweep(now + 7_200_000_000_000, |_| true);
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, n1, n10k) = (med(c), med(n1), med(n10k));
    println!();
    println!(
        "## connect() to an address opened by name ({CONNECTS} UDP connects x {ROUNDS} rounds, medians)"
    );
    println!("| policy | ns/connect | vs CIDR-only |");
    println!("| --- | --- | --- |");
    println!("| CIDR-only zone (baseline) | {c:.0} | 1.00x |");
    println!("| by name, 1 learned address | {n1:.0} | {:.2}x |", n1 / c);
    println!(
        "| by name, 10k learned addresses | {n10k:.0} | {:.2}x |",
        n10k / c
    );
    println!(
        "flat with 10k learned: {:.2}x the 1-address case (goal: within the CIDR path's noise)",
        n10k / n1
    );

    // Memory: the kernel map is preallocated to its size; fill it to 100k anyway.
    apply_named(&mut e, 100_000)?;
    println!();
    println!("## memory with 100k learned addresses");
    match learned_memlock() {
        Some(m) => println!(
            "kernel LEARNED map: {} entries, memlock {:.1} MiB (the kernel's figure for a map of \
             {} entries, not preallocated)",
            e.maps().dns().len(),
            m as f64 / 1_048_576.0,
            agent_common::maps::limits::LEARNED
        ),
        None => println!(
            "kernel LEARNED map: {} entries; its memlock figure was not found in /proc/self/fdinfo",
            e.maps().dns().len()
        ),
    }
    drop(l);
    Ok(())
}

/// `memlock` of this process's `LEARNED` map, found in /proc/self/fdinfo by its shape (fdinfo
/// has no map names): key and value sizes and max_entries.
fn learned_memlock() -> Option<u64> {
    let want = [
        (
            "key_size:",
            std::mem::size_of::<agent_common::LearnedKey>() as u64,
        ),
        (
            "value_size:",
            std::mem::size_of::<agent_common::LearnedValue>() as u64,
        ),
        (
            "max_entries:",
            u64::from(agent_common::maps::limits::LEARNED),
        ),
    ];
    for fd in std::fs::read_dir("/proc/self/fdinfo").ok()?.flatten() {
        let text = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if want.iter().all(|(k, v)| get(k) == Some(*v)) {
            return get("memlock:");
        }
    }
    None
}

/// The agent's name table (`DnsProxy`'s, same type) with 100k entries: RSS delta.
fn name_table() {
    let before = corral_tests::harness::rss_kib(std::process::id());
    let mut t: HashMap<(u32, IpAddr), (Arc<str>, u64)> = HashMap::new();
    for i in 0..100_000u32 {
        let name: Arc<str> = Arc::from(format!("host-{i}.cdn.example.com").as_str());
        t.insert(
            (i % 64, IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))),
            (name, u64::from(i)),
        );
    }
    let after = corral_tests::harness::rss_kib(std::process::id());
    println!(
        "agent name table: 100k entries, +{:.1} MiB RSS ({} bytes per address)",
        (after.saturating_sub(before)) as f64 / 1024.0,
        after.saturating_sub(before) * 1024 / 100_000
    );
    drop(t);
}

fn main() -> anyhow::Result<()> {
    if !corral_tests::privileged() {
        bail!("corral-dns-bench needs root");
    }
    // First: the heap has not grown yet, so the RSS delta is the table's.
    name_table();
    let dir = Dir::new("dns-bench")?;
    proxy(&dir)?;
    connects()?;
    Ok(())
}
