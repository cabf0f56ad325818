//! `corral-fleet-bench --replicas N`: the same distribution measure with the server's state in
//! a real PostgreSQL (a throwaway cluster; root, to run it as the `postgres` user), against 1
//! replica and against N, with the simulated nodes given every replica's URL (each starts at
//! one chosen by its name, as agents do):
//! - apply (on one replica, a different one each round) → every node of every replica ACKed,
//!   p50/p99;
//! - failover: one replica killed with SIGKILL → every node connected to a survivor and ACKing
//!   the current revision.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use corral_proto::v1::{self as pb, policy_service_client::PolicyServiceClient};
use corral_tests::postgres::Postgres;
use tonic::transport::Channel;

use super::{Proc, percentile, policy, sibling, status};

/// Nodes per `corral-simnode` process.
const PER_SIM: usize = 1000;

struct Replica {
    proc: Option<Proc>,
    /// `--replica-name`, as the nodes' status names it.
    name: String,
    url: String,
    client: PolicyServiceClient<Channel>,
}

async fn start(db: &str, name: &str) -> anyhow::Result<Replica> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let proc = Proc(
        Command::new(sibling("corral-server")?)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--db", db, "--plaintext", "--replica-name", name])
            .env("CORRAL_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("spawn corral-server")?,
    );
    let t0 = Instant::now();
    let client = loop {
        match PolicyServiceClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(anyhow::Error::from(e).context("connect to corral-server")),
        }
    };
    Ok(Replica {
        proc: Some(proc),
        name: name.to_owned(),
        url,
        client,
    })
}

/// Over the live replicas: nodes connected, and of those, nodes ACKing `revision` or later.
/// Each replica counts only the nodes syncing with it (its status also shows the others'
/// records, which a killed replica leaves behind until they go stale). A node that just moved
/// may still look connected on the replica it left (until that one notices the stream is
/// gone): each node counts once, ACKed if any replica has its ACK.
async fn census(replicas: &mut [Replica], revision: u64) -> anyhow::Result<(usize, usize)> {
    let mut seen: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for r in replicas.iter_mut().filter(|r| r.proc.is_some()) {
        let s = status(&mut r.client).await?;
        for n in s
            .nodes
            .into_iter()
            .filter(|n| n.connected && n.replica == r.name)
        {
            if n.nacked_revision >= revision && revision > 0 {
                bail!("{} NACKed: {}", n.node, n.nack_detail);
            }
            *seen.entry(n.node).or_default() |= n.acked_revision >= revision;
        }
    }
    Ok((seen.len(), seen.values().filter(|a| **a).count()))
}

/// Waits until every node is connected and ACKs `revision`; how long until all were
/// connected, and until all ACKed.
async fn until_all(
    replicas: &mut [Replica],
    nodes: usize,
    revision: u64,
    limit: Duration,
    what: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut all_connected = None;
    loop {
        let (connected, acked) = census(replicas, revision).await?;
        if connected == nodes && all_connected.is_none() {
            all_connected = Some(t0.elapsed());
        }
        if connected == nodes && acked == nodes {
            return Ok((all_connected.unwrap_or_default(), t0.elapsed()));
        }
        if t0.elapsed() > limit {
            bail!("{what}: {connected} of {nodes} connected, {acked} ACKed in {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One configuration: `n` replicas on a fresh cluster, `nodes` simulated nodes.
async fn run_one(n: usize, nodes: usize, rounds: usize) -> anyhow::Result<()> {
    let pg = Postgres::start(&format!("fleet-bench-{n}"))?;
    let url = pg.url();
    let mut replicas = Vec::with_capacity(n);
    for i in 0..n {
        replicas.push(start(&url, &format!("replica-{i}")).await?);
    }
    let list = replicas
        .iter()
        .map(|r| r.url.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut sims = Vec::new();
    for (i, first) in (0..nodes).step_by(PER_SIM).enumerate() {
        let count = PER_SIM.min(nodes - first);
        sims.push(Proc(
            Command::new(sibling("corral-simnode")?)
                .args(["--server", &list, "--nodes", &count.to_string()])
                .args(["--prefix", &format!("r{n}s{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn corral-simnode")?,
        ));
    }
    let (_, synced) = until_all(
        &mut replicas,
        nodes,
        0,
        Duration::from_secs(180),
        "fleet connect",
    )
    .await?;
    let mut lat = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let t = Instant::now();
        let on = round % n;
        let rev = replicas[on]
            .client
            .apply(pb::ApplyRequest {
                file_name: "bench.yaml".into(),
                yaml: policy(round),
            })
            .await?
            .into_inner()
            .revision;
        until_all(&mut replicas, nodes, rev, Duration::from_secs(60), "apply").await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let spread: Vec<usize> = {
        let mut v = Vec::new();
        for r in &mut replicas {
            v.push(
                status(&mut r.client)
                    .await?
                    .nodes
                    .iter()
                    .filter(|x| x.connected && x.replica == r.name)
                    .count(),
            );
        }
        v
    };
    println!(
        "{n} replica(s), {nodes} nodes {spread:?}: apply → all ACKed p50 {:>7.1} ms  p99 {:>7.1} ms  \
         max {:>7.1} ms ({rounds} applies, each on another replica; fleet synced in {:.2} s)",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        synced.as_secs_f64(),
    );
    if n > 1 {
        let victim = n - 1;
        let moved = spread[victim];
        let revision = status(&mut replicas[0].client).await?.revision;
        if let Some(mut p) = replicas[victim].proc.take() {
            p.0.kill()?;
            p.0.wait()?;
        }
        let (connected, acked) = until_all(
            &mut replicas,
            nodes,
            revision,
            Duration::from_secs(60),
            "failover",
        )
        .await?;
        println!(
            "{n} replicas: one killed (SIGKILL) → its {moved} nodes connected to the others in \
             {:.0} ms, all ACKing revision {revision} in {:.0} ms (goal ≤ 5000 ms)",
            connected.as_secs_f64() * 1e3,
            acked.as_secs_f64() * 1e3
        );
    }
    drop(sims);
    drop(replicas);
    drop(pg);
    Ok(())
}

/// 1 replica, then `n`.
pub async fn run(n: usize, nodes: usize, rounds: usize) -> anyhow::Result<()> {
    println!(
        "replicas on PostgreSQL (corral-server ×N + corral-simnode, loopback; one cluster per \
         configuration)"
    );
    run_one(1, nodes, rounds).await?;
    if n > 1 {
        run_one(n, nodes, rounds).await?;
    }
    Ok(())
}
