//! `corral-fleet-bench`: policy distribution latency (run by `cargo xtask bench fleet`).
//!
//! Starts a real `corral-server` (temporary database, loopback port) and, for each fleet size
//! (1, 100, 1000 by default), a `corral-simnode` process with that many simulated nodes (the
//! agent's real sync client; it compiles each snapshot and ACKs, loading nothing into the
//! kernel). Then it applies a changed policy `--rounds` times and measures, from just before
//! the `Apply` call to the moment `Status` shows every node ACKed the new revision, the
//! p50/p99 latency; and the server's RSS with the fleet connected.
//!
//! `corral-fleet-bench [--nodes 1,100,1000] [--rounds 30]`. Goal (issue 6): 1000 nodes ACKed
//! p99 ≤ 1 s.
//!
//! `corral-fleet-bench --replicas 3 [--nodes 3000] [--rounds 30]`: replicas on PostgreSQL
//! ([`replicas`]); goal (issue 18): apply p99 ≤ 1 s, failover ≤ 5 s.
#![forbid(unsafe_code)]

#[path = "fleet_bench/replicas.rs"]
mod replicas;

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use corral_proto::v1::{self as pb, policy_service_client::PolicyServiceClient};
use tonic::transport::Channel;

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!("{} is not built", p.display());
    }
    Ok(p)
}

/// SIGTERM by pid, then SIGKILL after 10 s.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn policy(round: usize) -> String {
    format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: bench
spec:
  identities: [spiffe://bench.corral/**]
  defaultAction: deny
  zones:
    api: {{ cidrs: [203.0.113.0/24] }}
    data: {{ cidrs: [10.20.0.0/16] }}
  connect:
    - {{ action: allow, zones: [api], ports: [443] }}
    - {{ action: allow, zones: [data], ports: [{}] }}
  exec:
    - {{ action: allow, paths: [/usr/bin/python3, /opt/agent/**] }}
",
        1000 + round
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn status(c: &mut PolicyServiceClient<Channel>) -> anyhow::Result<pb::PolicyStatusResponse> {
    Ok(c.status(pb::PolicyStatusRequest {}).await?.into_inner())
}

async fn bench_fleet(
    c: &mut PolicyServiceClient<Channel>,
    url: &str,
    server_pid: u32,
    nodes: usize,
    rounds: usize,
    round0: usize,
) -> anyhow::Result<()> {
    let prefix = format!("bench{nodes}");
    let sim = Proc(
        Command::new(sibling("corral-simnode")?)
            .args([
                "--server",
                url,
                "--nodes",
                &nodes.to_string(),
                "--prefix",
                &prefix,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn corral-simnode")?,
    );
    let mine = |s: &pb::PolicyStatusResponse| {
        s.nodes
            .iter()
            .filter(|n| n.connected && n.node.starts_with(&format!("{prefix}-")))
            .cloned()
            .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    loop {
        let s = status(c).await?;
        let m = mine(&s);
        if m.len() == nodes && m.iter().all(|n| n.acked_revision == s.revision) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{nodes} nodes not connected and in sync in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = t0.elapsed();
    let rss = corral_tests::harness::rss_kib(server_pid);
    let mut lat = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let t = Instant::now();
        let rev = c
            .apply(pb::ApplyRequest {
                file_name: "bench.yaml".into(),
                yaml: policy(round0 + r),
            })
            .await?
            .into_inner()
            .revision;
        loop {
            let s = status(c).await?;
            let m = mine(&s);
            if m.iter().filter(|n| n.acked_revision >= rev).count() == nodes {
                break;
            }
            if let Some(n) = m.iter().find(|n| n.nacked_revision >= rev) {
                bail!("{} NACKed: {}", n.node, n.nack_detail);
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("revision {rev} not ACKed by all {nodes} nodes in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "{nodes:>5} nodes: apply → all ACKed p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  \
         ({rounds} applies; fleet connected and synced in {:.2} s; server RSS {:.1} MiB)",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        connect_time.as_secs_f64(),
        rss as f64 / 1024.0
    );
    drop(sim);
    Ok(())
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = arg(&args, "--nodes")
        .unwrap_or_else(|| "1,100,1000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("--nodes N,N,...")?;
    let rounds: usize = arg(&args, "--rounds")
        .map_or(Ok(30), |r| r.parse())
        .context("--rounds N")?;
    if let Some(n) = arg(&args, "--replicas") {
        let n: usize = n.parse().context("--replicas N")?;
        let nodes = match sizes.as_slice() {
            [n] if arg(&args, "--nodes").is_some() => *n,
            _ => 3000,
        };
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(replicas::run(n, nodes, rounds));
    }
    let dir = std::env::temp_dir().join(format!("corral-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let server = Proc(
        Command::new(sibling("corral-server")?)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(dir.join("server.db"))
            .arg("--plaintext")
            .env("CORRAL_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("spawn corral-server")?,
    );
    let pid = server.0.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(async {
        let t0 = Instant::now();
        let mut c = loop {
            match PolicyServiceClient::connect(url.clone()).await {
                Ok(c) => break c,
                Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(anyhow::Error::from(e).context("connect to corral-server")),
            }
        };
        println!(
            "policy distribution (corral-server + corral-simnode, loopback; server RSS idle {:.1} MiB)",
            corral_tests::harness::rss_kib(pid) as f64 / 1024.0
        );
        for (i, n) in sizes.iter().enumerate() {
            bench_fleet(&mut c, &url, pid, *n, rounds, i * rounds).await?;
        }
        anyhow::Ok(())
    });
    // Close the client's connection before the server drains its connections.
    drop(rt);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    res
}
