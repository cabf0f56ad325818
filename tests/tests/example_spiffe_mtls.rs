//! `examples/spiffe-mtls.yaml` and its ledger (`examples/spiffe-mtls/ledger.rs`), run the way
//! the example says, on a real node agent enforcing in the kernel and a real server holding
//! the grants. The policy file is the example's, with only the node-specific values replaced:
//! the Workload API socket's path, the ledger's port, and where the binary is (plus `sleep`,
//! which holds the session open for the grant request).
//!
//! - the billing agent calls the ledger over mTLS with its own SVID: a read is served, and the
//!   ledger names the caller's identity and session;
//! - a write is refused until a person approves `ledger-write` for that session; then the
//!   JWT-SVID lists the grant and the write is served, for that session and not another;
//! - the research agent reaches the ledger's port (its policy allows it) but the ledger refuses
//!   it at the TLS handshake, by identity;
//! - the billing agent cannot reach any other port (the kernel refuses the connect).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use corral_tests::{
    e2e::{Reaped, bin, wait_for},
    fleet::{Agent, Dir, Node, Server, connected, free_port, text},
    privileged,
};
use serde_json::Value;

const BILLING: &str = "spiffe://demo.corral/agent/billing";
const RESEARCH: &str = "spiffe://demo.corral/agent/research";
const LEDGER: &str = "spiffe://demo.corral/service/ledger";
/// CLI users of the plaintext server, named by uid: the requester and the approver.
const AGENT_BOT: u32 = 2001;
const ALICE: u32 = 2002;

/// The example policy for this node, checked to have had each value replaced.
fn example_policy(node: &Node, port: u16) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/spiffe-mtls.yaml");
    let mut src = std::fs::read_to_string(&path)?;
    let ledger = bin("spiffe-mtls-ledger")?.display().to_string();
    for (from, to) in [
        (
            "/run/corral/workload.sock".to_owned(),
            node.workload.display().to_string(),
        ),
        ("8443".to_owned(), port.to_string()),
        (
            "[/usr/local/bin/spiffe-mtls-ledger]".to_owned(),
            format!("[\"{ledger}\", /usr/bin/sleep]"),
        ),
    ] {
        ensure!(src.contains(&from), "the example no longer has {from}");
        src = src.replace(&from, &to);
    }
    Ok(src)
}

/// `corral run --identity ID --session S -- spiffe-mtls-ledger ARGS`: its last JSON line.
fn ledger_in(node: &Node, id: &str, session: &str, args: &[&str]) -> anyhow::Result<Value> {
    let ledger = bin("spiffe-mtls-ledger")?.display().to_string();
    let mut a = vec!["run", "--identity", id, "--session", session, "--", &ledger];
    a.extend_from_slice(args);
    let out = node.local(&a)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("the ledger printed nothing: {}", text(&out)))?;
    Ok(serde_json::from_str(line)?)
}

#[test]
fn an_agent_calls_a_service_over_mtls_with_its_session_bound_svid_as_the_example_shows()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("example-spiffe-mtls")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let server = Server::start(&dir, free_port()?)?;
    let agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let port = free_port()?;
    let file = dir.write("spiffe-mtls.yaml", &example_policy(&node, port)?)?;
    let out = server.apply(&file, &[])?;
    ensure!(
        out.status.success(),
        "apply: {}\n{}",
        text(&out),
        agent.log_text()
    );

    // The ledger, in its own principal.
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin("corral")?)
        .args(["run", "--socket"])
        .arg(&node.socket)
        .args(["--identity", LEDGER, "--session", "ledger-1", "--"])
        .arg(bin("spiffe-mtls-ledger")?)
        .args(["serve", &addr, BILLING])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let _ledger = Reaped(Some(child));
    let lines = corral_tests::e2e::json_lines(stdout);
    let up = lines
        .recv_timeout(Duration::from_secs(20))
        .context("the ledger did not start")?;
    assert_eq!(up["listening"], addr.as_str(), "{up}");
    assert_eq!(up["as"], LEDGER, "the ledger's own SVID: {up}");

    // A read, served: the ledger names the caller's identity and session.
    let read = ledger_in(&node, BILLING, "task-42", &["call", &addr, LEDGER, "read"])?;
    assert_eq!(read["ok"], true, "{read}");
    assert_eq!(read["caller"], BILLING, "{read}");
    assert_eq!(read["session"], "task-42", "{read}");
    let seen = lines.recv_timeout(Duration::from_secs(5))?;
    assert_eq!(seen, read, "the ledger's log line is its answer");

    // A write needs a grant a person approved for this session.
    let write = ledger_in(&node, BILLING, "task-42", &["call", &addr, LEDGER, "write"])?;
    assert_eq!(write["ok"], false, "{write}");
    ensure!(
        write["error"].as_str().is_some_and(|e| e.contains("grant")),
        "{write}"
    );
    let held = node.hold(BILLING, "task-42")?;
    let g = server.request_when_known(
        AGENT_BOT,
        &[
            "request",
            "--identity",
            BILLING,
            "--session",
            "task-42",
            "--grant",
            "ledger-write",
            "--ttl",
            "5m",
            "--reason",
            "post the refund",
        ],
    )?;
    assert_eq!(g["state"], "pending", "approval required: {g}");
    let id = g["id"].as_str().context("grant id")?.to_owned();
    let g = server.grant(ALICE, &["approve", &id, "--reason", "ok"])?;
    assert_eq!(g["state"], "active", "{g}");
    let write = wait_for(10, "the write to be served under the grant", || {
        let w = ledger_in(&node, BILLING, "task-42", &["call", &addr, LEDGER, "write"])?;
        Ok((w["ok"] == true).then_some(w))
    })?;
    assert_eq!(
        write["grants"],
        serde_json::json!([id]),
        "the JWT-SVID lists the grant: {write}"
    );
    // Another session of the same identity has no grant: its write is refused.
    let other = ledger_in(&node, BILLING, "task-43", &["call", &addr, LEDGER, "write"])?;
    assert_eq!(other["ok"], false, "{other}");
    drop(held);

    // The research agent reaches the port but not the ledger: refused by identity, at the
    // handshake (the ledger's side; with TLS 1.3 the client may see it only on its read).
    let research = ledger_in(&node, RESEARCH, "r1", &["call", &addr, LEDGER, "read"])?;
    assert_eq!(research["ok"], false, "{research}");
    let refused = loop {
        let l = lines
            .recv_timeout(Duration::from_secs(5))
            .context("the ledger logged no refused handshake")?;
        if l["error"].as_str().is_some_and(|e| e.starts_with("TLS")) {
            break l;
        }
        ensure!(
            l["caller"] != RESEARCH,
            "the research agent got past TLS: {l}"
        );
    };

    // Any other port: the kernel refuses the billing agent's connect.
    let other_port = free_port()?;
    let elsewhere = format!("127.0.0.1:{other_port}");
    let denied = ledger_in(
        &node,
        BILLING,
        "task-42",
        &["call", &elsewhere, LEDGER, "read"],
    )?;
    ensure!(
        denied["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("connect") && e.contains("not permitted")),
        "EPERM: {denied}"
    );
    println!(
        "read: {read}\nwrite: {write}\nresearch: {research}, ledger: {refused}\nelsewhere: {denied}"
    );
    Ok(())
}
