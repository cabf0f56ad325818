//! Just-in-time grants end to end: real `corral-server` (GrantService), real `corral-agent
//! --server` enforcing in the real kernel, the real `corral grant` CLI.
//!
//! Principals are held open by a `sleep` run through `corral run`; the probes then join the
//! principal's cgroup directly (`corral-probe --cgroup`), so they work while the agent is
//! stopped with SIGSTOP: what they see is the kernel's decision alone.
//!
//! The binaries are built by `cargo xtask test`.

use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Output, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, ensure};
use corral_tests::{
    e2e::{bin, wait_for},
    fleet::{Agent, Dir, Follower, Node, Server, connected, free_port, probe_cgroup, text, until},
    privileged,
};
use serde_json::Value;

const ID: &str = "spiffe://e2e.corral/agent/grants";
/// Zone `crm`: only reachable with a grant (5433: approval required; 5434: automatic).
const CRM_WRITE: &str = "udp:127.0.0.2:5433";
const CRM_READ: &str = "udp:127.0.0.2:5434";
/// Zone `secrets`: allowed, but afterwards the session may not reach `crm` (chaining).
const SECRETS: &str = "udp:127.0.0.3:9";
/// The users calling the plaintext server: it names them by the uid owning their socket
/// (no passwd entry: the number), so the tests run the CLI as these uids.
const AGENT_BOT: u32 = 2001;
const ALICE: u32 = 2002;

fn policy() -> anyhow::Result<String> {
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-grants
spec:
  identities:
    - spiffe://e2e.corral/agent/**
  mode: enforce
  defaultAction: deny
  zones:
    crm:     {{ cidrs: [127.0.0.2/32] }}
    secrets: {{ cidrs: [127.0.0.3/32] }}
  connect:
    - {{ action: allow, zones: [secrets], ports: [9] }}
  chaining:
    - after: [secrets]
      deny: [crm]
  grants:
    - {{ name: crm-write, zones: [crm], ports: [5433], maxTtl: 15m, approval: required }}
    - {{ name: crm-read,  zones: [crm], ports: [5434], maxTtl: 1m,  approval: auto }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
    ))
}

/// A server and one node enforcing the test policy, with the fleet event stream followed
/// from before the first decision.
struct Fleet {
    // Field order is drop order: processes before the directories they use.
    follower: Follower,
    agent: Agent,
    server: Server,
    node: Node,
    _dir: Dir,
}

fn fleet(name: &str) -> anyhow::Result<Option<Fleet>> {
    if !privileged() {
        return Ok(None);
    }
    let dir = Dir::new(name)?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(None);
    };
    let server = Server::start(&dir, free_port()?)?;
    let agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let follower = Follower::start(&server)?;
    let file = dir.write("grants.yaml", &policy()?)?;
    let out = server.apply(&file, &[])?;
    ensure!(
        out.status.success(),
        "apply: {}\n{}",
        text(&out),
        agent.log_text()
    );
    Ok(Some(Fleet {
        follower,
        agent,
        server,
        node,
        _dir: dir,
    }))
}

/// `grant request` arguments (`session` "" and `ttl` None: left out).
fn req<'a>(
    identity: &'a str,
    session: &'a str,
    grant: &'a str,
    ttl: Option<&'a str>,
    reason: &'a str,
) -> Vec<&'a str> {
    let mut a = vec![
        "request",
        "--identity",
        identity,
        "--grant",
        grant,
        "--reason",
        reason,
    ];
    if !session.is_empty() {
        a.extend(["--session", session]);
    }
    if let Some(t) = ttl {
        a.extend(["--ttl", t]);
    }
    a
}

/// `corral grant ARGS` expected to fail; its stderr.
fn refused(server: &Server, user: u32, args: &[&str]) -> anyhow::Result<String> {
    let mut a = vec!["grant"];
    a.extend_from_slice(args);
    let out: Output = server.cli_as(user, &a)?;
    ensure!(
        !out.status.success(),
        "corral grant {args:?} should fail: {}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn state_of(server: &Server, id: &str) -> anyhow::Result<String> {
    let out = server.cli(&["grant", "list", "--json"])?;
    ensure!(out.status.success(), "grant list: {}", text(&out));
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let g: Value = serde_json::from_str(l)?;
        if g["id"] == id {
            return Ok(g["state"].as_str().unwrap_or_default().to_owned());
        }
    }
    anyhow::bail!("grant {id} not listed")
}

fn is_connect(e: &Value, session: &str, port: u16, verdict: &str) -> bool {
    e["principal"]["session"] == session
        && e["connect"]["port"] == port
        && e["decision"]["verdict"] == verdict
}

#[test]
fn approved_grant_opens_the_path_the_kernel_expires_it_and_it_is_session_bound()
-> anyhow::Result<()> {
    let Some(f) = fleet("approve")? else {
        return Ok(());
    };
    let (s1, s2) = (f.node.hold(ID, "s1")?, f.node.hold(ID, "s2")?);

    // Denied by policy, and the event names the grant that would allow it.
    assert_eq!(probe_cgroup(&s1.cgroup, &[CRM_WRITE])?, ["EPERM"]);
    let e = f
        .follower
        .find(10, "the deny event", |e| is_connect(e, "s1", 5433, "deny"))?;
    assert_eq!(e["decision"]["grant_available"], "crm-write", "{e}");
    assert_eq!(e["decision"]["reason"], "default", "{e}");

    // Request → pending: still denied.
    let g = f.server.request_when_known(
        AGENT_BOT,
        &req(ID, "s1", "crm-write", Some("5s"), "ticket 42"),
    )?;
    assert_eq!(g["state"], "pending", "{g}");
    let id = g["id"].as_str().context("grant id")?.to_owned();
    assert_eq!(probe_cgroup(&s1.cgroup, &[CRM_WRITE])?, ["EPERM"]);

    // The requester cannot approve its own request.
    let err = refused(&f.server, AGENT_BOT, &["approve", &id])?;
    println!("self-approval refused: {err}");

    // Approve → the same connect succeeds within 1 s; session s2 stays denied.
    let g = f.server.grant(ALICE, &["approve", &id, "--reason", "ok"])?;
    assert_eq!(g["state"], "active", "{g}");
    let took = until(&s1.cgroup, CRM_WRITE, "ok", 1)?;
    println!("approve → enforced in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(
        probe_cgroup(&s2.cgroup, &[CRM_WRITE])?,
        ["EPERM"],
        "session-bound"
    );
    let st = f.node.status()?;
    let shown = st["grants"].as_array().context("grants in status")?;
    assert!(
        shown
            .iter()
            .any(|g| g["id"] == id.as_str() && g["session"] == "s1"),
        "the node's status lists the grant: {st}"
    );

    // Expiry with the agent's userspace frozen: only the kernel can deny it now.
    let expires = g["expires_unix_nano"].as_u64().context("expiry")?;
    let pid = f.agent.child.as_ref().context("agent")?.id().to_string();
    let stop = Command::new("kill").args(["-STOP", &pid]).status()?;
    ensure!(stop.success(), "SIGSTOP the agent");
    let frozen = (|| -> anyhow::Result<Vec<String>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
        std::thread::sleep(
            Duration::from_nanos(expires.saturating_sub(now)) + Duration::from_millis(300),
        );
        probe_cgroup(&s1.cgroup, &[CRM_WRITE])
    })();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(
        frozen?,
        ["EPERM"],
        "expired in the kernel with the agent stopped"
    );
    wait_for(10, "the server to mark it expired", || {
        Ok((state_of(&f.server, &id)? == "expired").then_some(()))
    })?;

    // The allowed connect carried the grant id; the grant's state changes were events.
    let e = f.follower.find(10, "the grant-allowed event", |e| {
        is_connect(e, "s1", 5433, "allow")
    })?;
    assert_eq!(e["decision"]["reason"], "grant", "{e}");
    assert_eq!(e["decision"]["grant_id"], id.as_str(), "{e}");
    let states: Vec<String> = ["pending", "active", "expired"]
        .iter()
        .map(|want| {
            f.follower
                .find(10, &format!("grant {id} {want}"), |e| {
                    e["kind"] == "grant"
                        && e["grant"]["id"] == id.as_str()
                        && e["grant"]["state"] == *want
                })
                .map(|e| e["grant"]["state"].as_str().unwrap_or_default().to_owned())
        })
        .collect::<anyhow::Result<_>>()?;
    println!("grant events: {states:?}");
    Ok(())
}

#[test]
fn revoke_closes_the_path_chaining_beats_a_grant_bad_requests_are_refused_and_sessions_end_grants()
-> anyhow::Result<()> {
    let Some(f) = fleet("revoke")? else {
        return Ok(());
    };
    let s1 = f.node.hold(ID, "s1")?;

    // approval: auto → issued at once.
    let g = f.server.request_when_known(
        AGENT_BOT,
        &req(ID, "s1", "crm-read", Some("1m"), "read the CRM"),
    )?;
    assert_eq!(g["state"], "active", "{g}");
    assert_eq!(g["decided_by"], "auto", "{g}");
    let id = g["id"].as_str().context("grant id")?.to_owned();
    let took = until(&s1.cgroup, CRM_READ, "ok", 1)?;
    println!("auto grant → enforced in {took:?}");

    // Revoke → denied within 1 s.
    let g = f
        .server
        .grant(ALICE, &["revoke", &id, "--reason", "done"])?;
    assert_eq!(g["state"], "revoked", "{g}");
    let took = until(&s1.cgroup, CRM_READ, "EPERM", 1)?;
    println!("revoke → enforced in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Chaining beats a grant: after `secrets`, `crm` is closed even with an active grant.
    let g = f
        .server
        .grant(AGENT_BOT, &req(ID, "s1", "crm-read", None, "again"))?;
    assert_eq!(g["state"], "active", "{g}");
    assert_eq!(g["ttl_seconds"], 60, "no --ttl: the template's maxTtl");
    let id2 = g["id"].as_str().context("grant id")?.to_owned();
    until(&s1.cgroup, CRM_READ, "ok", 1)?;
    assert_eq!(
        probe_cgroup(&s1.cgroup, &[SECRETS, CRM_READ])?,
        ["ok", "EPERM"]
    );
    let e = f.follower.find(10, "the chaining deny", |e| {
        is_connect(e, "s1", 5434, "deny") && e["decision"]["reason"] == "chaining"
    })?;
    assert_eq!(
        e["decision"]["grant_available"], "",
        "a grant cannot help: {e}"
    );

    // Refusals, each with its reason.
    let ttl = refused(
        &f.server,
        AGENT_BOT,
        &req(ID, "s1", "crm-write", Some("20m"), "x"),
    )?;
    println!("ttl over max: {ttl}");
    assert!(ttl.contains("15m") || ttl.contains("900"), "{ttl}");
    let unknown = refused(&f.server, AGENT_BOT, &req(ID, "", "nope", None, "x"))?;
    println!("unknown grant: {unknown}");
    assert!(unknown.contains("nope"), "{unknown}");
    let stranger = refused(
        &f.server,
        AGENT_BOT,
        &req("spiffe://elsewhere.org/x", "", "crm-read", None, "x"),
    )?;
    println!("identity not covered: {stranger}");
    assert!(stranger.contains("spiffe://elsewhere.org/x"), "{stranger}");
    let session = refused(
        &f.server,
        AGENT_BOT,
        &req(ID, "no-such-session", "crm-read", None, "x"),
    )?;
    println!("unknown session: {session}");
    assert!(session.contains("no-such-session"), "{session}");

    // `request --wait` blocks until a person decides; a denial ends it with status 3.
    let mut waiting = Command::new(bin("corral")?)
        .args([
            "grant",
            "request",
            "--identity",
            ID,
            "--session",
            "s1",
            "--grant",
            "crm-write",
            "--reason",
            "please",
            "--wait",
            "--json",
            "--server",
            &f.server.url,
        ])
        .uid(AGENT_BOT)
        .gid(AGENT_BOT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pending = wait_for(10, "the waiting request to be pending", || {
        let out = f.server.cli(&["grant", "list", "--pending", "--json"])?;
        ensure!(out.status.success(), "grant list --pending: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|g| g["reason"] == "please"))
    })?;
    let id3 = pending["id"].as_str().context("grant id")?.to_owned();
    let g = f
        .server
        .grant(ALICE, &["deny", &id3, "--reason", "not now"])?;
    assert_eq!(g["state"], "denied", "{g}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = waiting.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = waiting.kill();
            let _ = waiting.wait();
            anyhow::bail!("grant request --wait did not return after the denial");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = waiting.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status.code(), Some(3), "denied: {stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"denied\"")),
        "{stdout}"
    );
    assert_eq!(
        probe_cgroup(&s1.cgroup, &[CRM_WRITE])?,
        ["EPERM"],
        "a denied grant opens nothing"
    );

    // The session ends (its last process exits): its grant ends with it.
    drop(s1);
    wait_for(20, "the session-bound grant to end", || {
        Ok((state_of(&f.server, &id2)? == "ended").then_some(()))
    })?;
    Ok(())
}
