//! Several `corral-server` replicas on one real PostgreSQL (a throwaway cluster the test
//! starts), real agents enforcing in the real kernel, `corral-simnode` nodes (the agent's own
//! sync client, no kernel) on the other replicas:
//! - every replica shows every replica's nodes, and a change made on one is acknowledged by
//!   the nodes of all (`corral policy apply` on one waits for them all);
//! - a grant requested on one replica and approved on another is enforced by a node syncing
//!   with a third, and revoked again; `corral events` over the replica list sees it all;
//! - a replica killed with SIGKILL: its nodes move to another within 5 s and keep enforcing;
//! - PostgreSQL restarted: the replicas go on, revisions neither skipped nor repeated.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use corral_tests::{
    e2e::{bin, wait_for},
    fleet::{
        Agent, Dir, Follower, Node, Server, cli, connected, free_port, probe_cgroup, stop_child,
        text, until,
    },
    postgres::Postgres,
    privileged,
};

const ID: &str = "spiffe://e2e.corral/agent/replicas";
/// Zone `crm`: reachable only with the grant.
const CRM: &str = "udp:127.0.0.2:5433";
/// Zone `ok`: allowed from revision 1 on; `version` moves the port.
const OK9: &str = "udp:127.0.0.4:9";
const AGENT_BOT: u32 = 2001;
const ALICE: u32 = 2002;

fn policy(ok_port: u16) -> anyhow::Result<String> {
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-replicas
spec:
  identities:
    - spiffe://e2e.corral/agent/**
  mode: enforce
  defaultAction: deny
  zones:
    crm: {{ cidrs: [127.0.0.2/32] }}
    ok:  {{ cidrs: [127.0.0.4/32] }}
  connect:
    - {{ action: allow, zones: [ok], ports: [{ok_port}] }}
  grants:
    - {{ name: crm-write, zones: [crm], ports: [5433], maxTtl: 15m, approval: required }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
    ))
}

/// `corral-simnode` nodes, stopped by pid on drop.
struct Sim(Child);

impl Sim {
    fn start(servers: &str, nodes: usize, prefix: &str) -> anyhow::Result<Self> {
        let child = Command::new(bin("corral-simnode")?)
            .args(["--server", servers, "--nodes", &nodes.to_string()])
            .args(["--prefix", prefix])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn corral-simnode")?;
        Ok(Self(child))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.0);
    }
}

/// Nodes named `prefix*` connected (to any replica) and acknowledging `revision`, as
/// `server` shows them.
fn acked(server: &Server, prefix: &str, revision: u64) -> anyhow::Result<usize> {
    count(server, prefix, revision, false)
}

/// [`acked`], counting only the nodes connected to `server` itself (not the records of other
/// replicas, which a killed replica leaves behind until they go stale).
fn acked_here(server: &Server, prefix: &str, revision: u64) -> anyhow::Result<usize> {
    count(server, prefix, revision, true)
}

fn count(server: &Server, prefix: &str, revision: u64, here: bool) -> anyhow::Result<usize> {
    let port = server.url.rsplit(':').next().unwrap_or_default();
    let s = server.status()?;
    Ok(s["nodes"].as_array().map_or(0, |n| {
        n.iter()
            .filter(|n| {
                n["node"].as_str().is_some_and(|x| x.starts_with(prefix))
                    && n["connected"] == true
                    && n["acked_revision"] == revision
                    && (!here
                        || n["replica"]
                            .as_str()
                            .is_some_and(|r| r.ends_with(&format!(":{port}"))))
            })
            .count()
    }))
}

fn apply(server: &Server, dir: &Dir, name: &str, yaml: &str) -> anyhow::Result<()> {
    let file = dir.write(name, yaml)?;
    let out = server.apply(&file, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));
    Ok(())
}

#[test]
fn three_replicas_serve_one_fleet_and_a_grant_crosses_replicas() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let pg = Postgres::start("replicas3")?;
    let dir = Dir::new("replicas3")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let url = pg.url();
    let a = Server::start_db(&dir, free_port()?, &url, None, &[])?;
    let b = Server::start_db(&dir, free_port()?, &url, None, &[])?;
    let c = Server::start_db(&dir, free_port()?, &url, None, &[])?;
    let agent = Agent::start(&node, &b.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let _sa = Sim::start(&a.url, 3, "ra")?;
    let _sc = Sim::start(&c.url, 3, "rc")?;
    // The fleet's events, merged from every replica's stream by `corral events`.
    let follower = Follower::start_url(&format!("{},{},{}", a.url, b.url, c.url), &[])?;

    // Every replica shows the whole fleet (node registrations in the database).
    wait_for(10, "every replica to see all 7 nodes", || {
        let mut all = true;
        for s in [&a, &b, &c] {
            all &= acked(s, "r", 0)? == 6 && acked(s, &node.name, 0)? == 1;
        }
        Ok(all.then_some(()))
    })?;
    let n1 = a.node(&node.name)?.context("A lists B's node")?;
    let b_port = b.url.rsplit(':').next().unwrap_or_default();
    assert!(
        n1["replica"]
            .as_str()
            .is_some_and(|r| r.ends_with(&format!(":{b_port}"))),
        "named by its replica: {n1}"
    );

    // Applied on A: `corral policy apply` waits for the nodes of A, B and C.
    let t0 = Instant::now();
    let file = dir.write("p1.yaml", &policy(9)?)?;
    let out = a.apply(&file, &[])?;
    let said = text(&out);
    ensure!(out.status.success(), "apply: {said}\n{}", agent.log_text());
    println!(
        "apply on A → ACKed on A, B, C in {:?}:\n{said}",
        t0.elapsed()
    );
    ensure!(said.contains("7 ACK, 0 NACK"), "{said}");
    ensure!(
        said.contains(&format!("{}: ACK revision 1", node.name)),
        "{said}"
    );
    ensure!(acked(&b, &node.name, 1)? == 1 && acked(&c, "rc", 1)? == 3);

    // A grant requested on C (which sees the session through B's registration), approved on
    // A: the node, on B, enforces it.
    let held = node.hold(ID, "s1")?;
    assert_eq!(probe_cgroup(&held.cgroup, &[OK9, CRM])?, ["ok", "EPERM"]);
    let g = c.request_when_known(
        AGENT_BOT,
        &[
            "request",
            "--identity",
            ID,
            "--session",
            "s1",
            "--grant",
            "crm-write",
            "--reason",
            "ticket 7",
        ],
    )?;
    assert_eq!(g["state"], "pending", "{g}");
    let id = g["id"].as_str().context("grant id")?.to_owned();
    let g = a.grant(ALICE, &["approve", &id, "--reason", "ok"])?;
    assert_eq!(g["state"], "active", "{g}");
    let took = until(&held.cgroup, CRM, "ok", 5)?;
    println!("request on C, approve on A → enforced on B's node in {took:?}");
    // Revoked on C: closed again.
    let g = c.grant(ALICE, &["revoke", &id, "--reason", "done"])?;
    assert_eq!(g["state"], "revoked", "{g}");
    let took = until(&held.cgroup, CRM, "EPERM", 5)?;
    println!("revoke on C → enforced on B's node in {took:?}");
    // One follower of the replica list sees B's node's decisions and the grant's changes made
    // on C (request, revoke) and A (approve).
    let allowed = follower.find(10, "the node's grant-allowed connect", |e| {
        e["node"] == node.name.as_str()
            && e["connect"]["port"] == 5433
            && e["decision"]["verdict"] == "allow"
    })?;
    assert_eq!(allowed["decision"]["grant_id"], id.as_str(), "{allowed}");
    for state in ["pending", "active", "revoked"] {
        follower.find(10, &format!("grant {state}"), |e| {
            e["kind"] == "grant" && e["grant"]["id"] == id.as_str() && e["grant"]["state"] == state
        })?;
    }

    // Applied on C this time: revision 2 everywhere, one sequence.
    apply(&c, &dir, "p2.yaml", &policy(10)?)?;
    wait_for(10, "every replica's nodes to ACK revision 2", || {
        let all = acked(&a, "ra", 2)? == 3 && acked(&c, "rc", 2)? == 3;
        Ok((all && acked(&b, &node.name, 2)? == 1).then_some(()))
    })?;
    assert_eq!(
        probe_cgroup(&held.cgroup, &[OK9, "udp:127.0.0.4:10"])?,
        ["EPERM", "ok"]
    );
    ensure!(
        pg.sql("SELECT string_agg(revision::text, ',' ORDER BY revision) FROM revisions")? == "1,2"
    );
    Ok(())
}

#[test]
fn a_killed_replica_s_nodes_move_to_another_within_5s_and_keep_enforcing() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let pg = Postgres::start("failover")?;
    let dir = Dir::new("failover")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let url = pg.url();
    let mut servers = [
        Server::start_db(&dir, free_port()?, &url, None, &[])?,
        Server::start_db(&dir, free_port()?, &url, None, &[])?,
    ];
    let list = format!("{},{}", servers[0].url, servers[1].url);
    let agent = Agent::start(&node, &list, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    const SIMS: usize = 20;
    let _sim = Sim::start(&list, SIMS, "fo")?;
    apply(&servers[0], &dir, "p1.yaml", &policy(9)?)?;
    let total = |rev: u64, servers: &[Server]| -> anyhow::Result<usize> {
        servers
            .iter()
            .map(|s| acked_here(s, "fo", rev))
            .sum::<anyhow::Result<usize>>()
    };
    wait_for(10, "the simulated nodes to ACK revision 1", || {
        Ok((total(1, &servers)? == SIMS).then_some(()))
    })?;
    let held = node.hold(ID, "s1")?;
    assert_eq!(probe_cgroup(&held.cgroup, &[OK9, CRM])?, ["ok", "EPERM"]);

    // The replica the real node is on is killed outright.
    let on = node.status()?["server"]
        .as_str()
        .context("status names the replica")?
        .to_owned();
    let (dead, alive) = if on == servers[0].url { (0, 1) } else { (1, 0) };
    ensure!(on == servers[dead].url, "{on} is one of the replicas");
    let on_dead = acked_here(&servers[dead], "fo", 1)?;
    println!("node on {on}; {on_dead} simulated nodes there too");
    let t0 = Instant::now();
    let mut killed = servers[dead]
        .child
        .take()
        .context("the replica's process")?;
    killed.kill()?;
    killed.wait()?;
    // Enforcing throughout: the kernel's decisions do not wait for a server.
    assert_eq!(probe_cgroup(&held.cgroup, &[OK9, CRM])?, ["ok", "EPERM"]);
    let survivor = &servers[alive];
    wait_for(5, "every node on the surviving replica", || {
        let st = node.status()?;
        let real = st["server"] == survivor.url.as_str()
            && st["server_state"] == "connected"
            && acked_here(survivor, &node.name, 1)? == 1;
        Ok((real && acked_here(survivor, "fo", 1)? == SIMS).then_some(()))
    })
    .with_context(|| agent.log_text())?;
    let took = t0.elapsed();
    println!("replica killed → its nodes resynced on the other in {took:?}");
    ensure!(took < Duration::from_secs(5), "{took:?}");

    // The CLI given both replicas goes on with the one that answers.
    let both = format!("{},{}", servers[dead].url, survivor.url);
    let out = cli(&["policy", "list", "--server", &both])?;
    ensure!(
        out.status.success(),
        "policy list over both: {}",
        text(&out)
    );

    // Nothing lost: the survivor has the whole state and serves the next change.
    apply(survivor, &dir, "p2.yaml", &policy(10)?)?;
    wait_for(10, "revision 2 on every node", || {
        let real = acked_here(survivor, &node.name, 2)? == 1;
        Ok((real && acked_here(survivor, "fo", 2)? == SIMS).then_some(()))
    })?;
    assert_eq!(
        probe_cgroup(&held.cgroup, &[OK9, "udp:127.0.0.4:10"])?,
        ["EPERM", "ok"]
    );
    Ok(())
}

#[test]
fn a_postgres_restart_is_survived_with_one_revision_sequence() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let mut pg = Postgres::start("pgrestart")?;
    let dir = Dir::new("pgrestart")?;
    let url = pg.url();
    let a = Server::start_db(&dir, free_port()?, &url, None, &["--resync-secs", "1"])?;
    let b = Server::start_db(&dir, free_port()?, &url, None, &["--resync-secs", "1"])?;
    let _sb = Sim::start(&b.url, 3, "pr")?;
    apply(&a, &dir, "p1.yaml", &policy(9)?)?;
    wait_for(10, "B's nodes to ACK revision 1", || {
        Ok((acked(&b, "pr", 1)? == 3).then_some(()))
    })?;
    pg.restart()?;
    // The first call after the restart may meet a dead pooled connection; the next works.
    wait_for(15, "an apply after the restart", || {
        let file = dir.write("p2.yaml", &policy(10)?)?;
        Ok(a.apply(&file, &[])?.status.success().then_some(()))
    })?;
    wait_for(15, "B's nodes to ACK revision 2", || {
        Ok((acked(&b, "pr", 2)? == 3).then_some(()))
    })
    .with_context(|| b.log_text())?;
    apply(&b, &dir, "p3.yaml", &policy(11)?)?;
    wait_for(10, "revision 3 from B", || {
        Ok((acked(&b, "pr", 3)? == 3).then_some(()))
    })?;
    ensure!(
        pg.sql("SELECT string_agg(revision::text, ',' ORDER BY revision) FROM revisions")?
            == "1,2,3"
    );
    wait_for(5, "A to follow B's change", || {
        Ok((a.status()?["revision"] == 3).then_some(()))
    })
    .with_context(|| a.log_text())?;
    Ok(())
}
