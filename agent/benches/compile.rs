//! Policy compile-time benchmark: generated policies of 1, 100 and 10k connect rules, timed
//! through parse + validate + compile, expansion into map entries, and (as root) loading into
//! the real kernel maps with the generation flip. Goal: 10k rules compile and load < 100 ms.
//!
//! `cargo xtask bench` runs it; directly: `cargo bench -p corral-agent --bench compile`.

use std::time::{Duration, Instant};

use corral_agent::{ebpf::Enforcer, paths};
use corral_policy::bench;

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mut enforcer = if is_root() {
        Some(Enforcer::load_and_attach(&paths::cgroup2_root()?)?)
    } else {
        println!("(not root: kernel map load not measured)");
        None
    };
    println!(
        "{:>7} {:>12} {:>10} {:>16} {:>10} {:>14}",
        "rules", "compile ms", "expand ms", "entries z/r/c", "load ms", "compile+load"
    );
    let mut goal = None;
    for rules in [1usize, 100, 10_000] {
        let runs = if rules >= 10_000 { 5 } else { 20 };
        let row = bench::measure(rules, runs)?;
        let load = match enforcer.as_mut() {
            Some(e) => {
                let mut best = Duration::MAX;
                for _ in 0..runs {
                    let t = Instant::now();
                    e.maps().apply(&row.compiled, |_, _| None)?;
                    best = best.min(t.elapsed());
                }
                Some(best)
            }
            None => None,
        };
        let total = row.compile + load.unwrap_or_default();
        println!(
            "{:>7} {:>12} {:>10} {:>16} {:>10} {:>14}",
            rules,
            ms(row.compile),
            ms(row.expand),
            format!("{}/{}/{}", row.entries.0, row.entries.1, row.entries.2),
            load.map_or_else(|| "-".into(), ms),
            ms(total)
        );
        if rules == 10_000 {
            goal = Some((total, load.is_some()));
        }
    }
    if let Some((total, loaded)) = goal {
        let what = if loaded { "compile+load" } else { "compile" };
        let verdict = if total < Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "goal: 10k rules {what} under 100 ms: {verdict} ({} ms)",
            ms(total)
        );
    }
    Ok(())
}
