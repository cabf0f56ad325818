//! `corral-spiffe-bench` (`cargo xtask bench spiffe`, root): the SPIFFE Workload API of a real
//! standalone agent, asked through the `spiffe` crate's client (`corral-spiffe-probe`) from
//! inside a real principal.
//!
//! - **Issuance latency**: X.509-SVID and JWT-SVID fetches, p50/p99 per round (medians over
//!   rounds), against the baseline of the same round on the same connection: an X.509 bundle
//!   fetch, a Workload API round trip that signs nothing.
//! - **Memory per principal**: the agent's RSS with `PRINCIPALS` principals enrolled and idle
//!   (the baseline), then with each also holding an open X.509-SVID stream (its credentials
//!   issued and kept for rotation); the difference per principal.

use std::time::Duration;

use anyhow::Context as _;
use corral_tests::{
    e2e::{Reaped, bin, json_lines},
    fleet::{Agent, Dir, Node},
    harness::rss_kib,
};
use serde_json::Value;

const ID: &str = "spiffe://bench.corral/agent/spiffe";
const ROUNDS: usize = 5;
const FETCHES: usize = 500;
const PRINCIPALS: usize = 100;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn latency(node: &Node) -> anyhow::Result<()> {
    let probe = bin("corral-spiffe-probe")?.display().to_string();
    let n = FETCHES.to_string();
    let mut rounds: Vec<Value> = Vec::new();
    for r in 0..ROUNDS {
        let session = format!("lat{r}");
        let out = node.local(&[
            "run",
            "--identity",
            ID,
            "--session",
            &session,
            "--",
            &probe,
            "bench",
            &n,
        ])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.lines().last().context("no output")?)?;
        anyhow::ensure!(v["error"].is_null(), "{v}");
        eprintln!("round {}/{ROUNDS}: {v}", r + 1);
        rounds.push(v);
    }
    let med = |k: &str| median(rounds.iter().filter_map(|v| v[k].as_f64()).collect());
    println!(
        "## SPIFFE Workload API issuance: {FETCHES} fetches of each kind x {ROUNDS} rounds, \
         one client connection, medians over rounds"
    );
    println!("| | p50 | p99 | p50 / baseline p50 |");
    println!("| --- | --- | --- | --- |");
    let base = med("bundle_p50_us");
    for (label, k) in [
        ("X.509 bundle (baseline: no signing)", "bundle"),
        ("X.509-SVID (P-256 key + certificate)", "x509"),
        ("JWT-SVID (ES256)", "jwt"),
    ] {
        let p50 = med(&format!("{k}_p50_us"));
        println!(
            "| {label} | {p50:.0} µs | {:.0} µs | {:.2} |",
            med(&format!("{k}_p99_us")),
            p50 / base.max(1.0)
        );
    }
    Ok(())
}

fn memory(node: &Node, agent_pid: u32) -> anyhow::Result<()> {
    let settle = |what: &str| -> u64 {
        std::thread::sleep(Duration::from_secs(2));
        let kib = rss_kib(agent_pid);
        eprintln!("agent RSS {what}: {kib} KiB");
        kib
    };
    let before = settle("with no principal");
    let mut held = Vec::new();
    for i in 0..PRINCIPALS {
        held.push(node.hold(ID, &format!("mem{i}"))?);
    }
    let idle = settle(&format!("with {PRINCIPALS} idle principals"));
    let probe = bin("corral-spiffe-probe")?;
    let mut streams = Vec::new();
    for (i, h) in held.iter().enumerate() {
        // Inside principal i (its cgroup), an open X.509-SVID stream.
        let mut child = std::process::Command::new(bin("corral-spawn")?)
            .arg("--cgroup")
            .arg(&h.cgroup)
            .arg(&probe)
            .arg("watch")
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", node.workload.display()),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let lines = json_lines(child.stdout.take().context("stdout")?);
        let first = lines
            .recv_timeout(Duration::from_secs(20))
            .with_context(|| format!("no SVID for principal {i}"))?;
        anyhow::ensure!(first["spiffe_id"] == ID, "{first}");
        streams.push((Reaped(Some(child)), lines));
    }
    let with_streams = settle(&format!("with {PRINCIPALS} principals holding a stream"));
    println!("\n## SPIFFE Workload API memory: the agent's RSS, {PRINCIPALS} principals");
    println!("| | agent RSS | per principal vs the row above |");
    println!("| --- | --- | --- |");
    println!("| no principal | {before} KiB | |");
    let per = |a: u64, b: u64| (a as f64 - b as f64) / PRINCIPALS as f64;
    println!(
        "| {PRINCIPALS} idle principals (baseline) | {idle} KiB | {:+.1} KiB |",
        per(idle, before)
    );
    println!(
        "| each also holding an X.509-SVID stream | {with_streams} KiB | {:+.1} KiB (the credentials' cost) |",
        per(with_streams, idle)
    );
    drop(streams);
    drop(held);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        corral_tests::privileged(),
        "corral-spiffe-bench needs root (it runs a real agent)"
    );
    let dir = Dir::new("spiffe-bench")?;
    let node = Node::new(&dir, "n1")?.context("bpffs")?;
    let file = dir.write(
        "policy.yaml",
        &corral_tests::fleet::workload_api_policy(
            "spiffe://bench.corral/agent/**",
            &node.workload,
        )?,
    )?;
    let agent = Agent::standalone(&node, &file, &[])?;
    let pid = agent
        .child
        .as_ref()
        .map(std::process::Child::id)
        .context("agent pid")?;
    memory(&node, pid)?;
    latency(&node)?;
    drop(agent);
    Ok(())
}
