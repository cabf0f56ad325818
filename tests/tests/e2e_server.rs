//! End to end with the central server: real `corral-server`, real `corral-agent --server`
//! processes enforcing in the real kernel, the real `corral` CLI, and `corral-simnode` (the
//! simulated-node test tool) for fleet size.
//!
//! The processes are run by the fleet harness (`corral_tests::fleet`).
//!
//! The binaries are built by `cargo xtask test`; run `cargo build -p corral-agent -p corral-cli
//! -p corral-server -p corral-tests` first when invoking `cargo test -p corral-tests` directly.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use corral_tests::{
    e2e::{Reaped, bin, udp, wait_for},
    fleet::{Agent, Dir, Node, Server, cli, connected, free_port, pki, stop_child, text, tls_args},
    privileged,
};
use serde_json::Value;

const ALLOWED: u16 = 7;
const DENIED: u16 = 9;

/// The test policy: `allow` and `deny` are ports on loopback; execs of the build's binaries
/// and of system tools are allowed. `extra` more connect rules (for the node-limit test).
fn policy(allow: u16, deny: u16, extra: usize) -> anyhow::Result<String> {
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    let mut more = String::new();
    for i in 0..extra {
        more.push_str(&format!(
            "    - {{ action: deny, zones: [local], ports: [{}] }}\n",
            20000 + i
        ));
    }
    Ok(format!(
        "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-server
spec:
  identities:
    - spiffe://e2e.corral/**
  mode: enforce
  defaultAction: deny
  zones:
    local: {{ cidrs: [127.0.0.0/8] }}
  connect:
    - {{ action: allow, zones: [local], ports: [{allow}] }}
    - {{ action: deny,  zones: [local], ports: [{deny}] }}
{more}  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
    ))
}

#[test]
fn apply_is_enforced_within_a_second_a_change_holds_and_events_reach_the_fleet_stream()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("apply")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let server = Server::start(&dir, free_port()?)?;
    let agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 0, "no policy yet: {s}");

    // Follow the fleet's events from before the first decision.
    let mut follower = Command::new(bin("corral")?)
        .args(["events", "--server", &server.url, "--json", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = follower.stdout.take().context("follower stdout")?;
    let _follower = Reaped(Some(follower));
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });

    let file = dir.write("p1.yaml", &policy(ALLOWED, DENIED, 0)?)?;
    let out = server.apply(&file, &[])?;
    let returned = Instant::now();
    let t = text(&out);
    println!("apply:\n{t}");
    ensure!(
        out.status.success(),
        "apply failed: {t}\n{}",
        agent.log_text()
    );
    assert!(t.contains("revision 1: applied e2e-server"), "{t}");
    assert!(
        t.contains(&format!("{}: ACK revision 1 in ", node.name)),
        "the node's ACK and its time: {t}"
    );
    let (a, d) = (udp(ALLOWED), udp(DENIED));
    assert_eq!(node.probe("s1", &[&d, &a])?, ["EPERM", "ok"]);
    let within = returned.elapsed();
    println!("denied {within:?} after apply returned");
    assert!(
        within < Duration::from_secs(1),
        "denied within 1 s: {within:?}"
    );
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 1);
    assert_eq!(s["server_state"], "connected");

    // The deny reached the fleet stream with this node's name.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = rx
            .recv_timeout(left)
            .context("the deny event on the fleet stream within 10 s")?;
        let e: Value = serde_json::from_str(&l)?;
        if e["connect"]["port"] == DENIED && e["decision"]["verdict"] == "deny" {
            break e;
        }
    };
    println!("fleet event: {ev}");
    assert_eq!(ev["node"], node.name.as_str());
    assert_eq!(ev["principal"]["identity"], "spiffe://e2e.corral/agent/srv");
    assert_eq!(ev["decision"]["revision"], 1);

    // A change: the ports swap roles; the new rule holds at once.
    let file = dir.write("p2.yaml", &policy(DENIED, ALLOWED, 0)?)?;
    let out = server.apply(&file, &[])?;
    ensure!(out.status.success(), "apply failed: {}", text(&out));
    assert!(text(&out).contains(&format!("{}: ACK revision 2", node.name)));
    assert_eq!(node.probe("s2", &[&d, &a])?, ["ok", "EPERM"]);
    assert_eq!(node.status()?["policy_revision"], 2);
    let n = server.node(&node.name)?.context("node in status")?;
    assert_eq!(n["connected"], true);
    assert_eq!(n["acked_revision"], 2);
    Ok(())
}

#[test]
fn invalid_policy_is_rejected_and_a_node_limit_violation_is_nacked_keeping_the_old_revision()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("nack")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let server = Server::start(&dir, free_port()?)?;
    // The node limit is exactly the rules of the first policy (as `policy check` counts
    // them); two more connect rules are over it.
    let file = dir.write("ok.yaml", &policy(ALLOWED, DENIED, 0)?)?;
    let f = file.display().to_string();
    let check = cli(&["policy", "check", &f])?;
    ensure!(check.status.success(), "check: {}", text(&check));
    let words: Vec<String> = text(&check).split_whitespace().map(str::to_owned).collect();
    let count = |what: &str| -> anyhow::Result<usize> {
        let i = words.iter().position(|w| w == what).context("rule count")?;
        Ok(words[i - 1].parse()?)
    };
    let limit = count("connect")? + count("exec")?;
    let limit_arg = limit.to_string();
    let _agent = Agent::start(&node, &server.url, &["--max-rules", &limit_arg])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let out = server.apply(&file, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));

    // Invalid for the server: rejected with file:line:col; nothing changes.
    let bad = dir.write(
        "bad.yaml",
        &policy(ALLOWED, DENIED, 0)?.replace("127.0.0.0/8", "127.0.0.0/33"),
    )?;
    let out = server.apply(&bad, &[])?;
    let t = text(&out);
    println!("invalid:\n{t}");
    assert!(!out.status.success());
    assert!(
        t.contains(&format!("{}:11:", bad.display())) && t.contains("127.0.0.0/33"),
        "file:line:col diagnostic: {t}"
    );
    assert_eq!(server.status()?["revision"], 1, "no new revision");

    // Valid for the server, over this node's limit: NACKed; the node keeps revision 1.
    let big = dir.write("big.yaml", &policy(ALLOWED, DENIED, 2)?)?;
    let out = server.apply(&big, &[])?;
    let t = text(&out);
    println!("over the node limit:\n{t}");
    assert!(!out.status.success(), "a NACK fails the apply command");
    assert!(t.contains("revision 2: applied"), "{t}");
    assert!(
        t.contains(&format!("{}: NACK revision 2", node.name)) && t.contains("--max-rules"),
        "{t}"
    );
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 1, "old revision kept: {s}");
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("node limit exceeded")),
        "{s}"
    );
    let n = server.node(&node.name)?.context("node in status")?;
    println!("server status of the node: {n}");
    assert_eq!(n["acked_revision"], 1);
    assert_eq!(n["nacked_revision"], 2);
    assert!(
        n["nack_detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("at most {limit}"))),
        "{n}"
    );
    // Still enforcing revision 1.
    assert_eq!(
        node.probe("s1", &[&udp(DENIED), &udp(ALLOWED)])?,
        ["EPERM", "ok"]
    );
    Ok(())
}

#[test]
fn server_down_keeps_enforcement_lkg_applies_at_boot_and_the_node_resyncs() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("lkg")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    let port = free_port()?;
    let mut server = Server::start(&dir, port)?;
    let mut agent = Agent::start(&node, &server.url, &[])?;
    wait_for(10, "the agent to connect", || connected(&node))?;
    let out = server.apply(&dir.write("p1.yaml", &policy(ALLOWED, DENIED, 0)?)?, &[])?;
    ensure!(out.status.success(), "apply: {}", text(&out));
    let (a, d) = (udp(ALLOWED), udp(DENIED));

    // Server gone: enforcement unchanged, status says so.
    assert!(
        server.stop()?,
        "server exits cleanly:\n{}",
        server.log_text()
    );
    let s = wait_for(10, "status to show the lost server", || {
        let s = node.status()?;
        Ok((s["server_state"] != "connected").then_some(s))
    })?;
    assert_eq!(
        s["server_state"],
        "disconnected (enforcing last-known-good revision 1)"
    );
    assert_eq!(node.probe("s1", &[&d, &a])?, ["EPERM", "ok"]);

    // A new agent, fresh pins (the old one uninstalled its), server still down: the
    // last-known-good policy is enforced from boot.
    assert!(agent.stop()?, "agent exits cleanly:\n{}", agent.log_text());
    assert!(!node.pins.exists(), "--uninstall removed the pins");
    let agent2 = Agent::start(&node, &server.url, &[])?;
    assert_eq!(node.probe("s2", &[&d, &a])?, ["EPERM", "ok"]);
    let s = node.status()?;
    assert_eq!(s["policy_revision"], 1);
    assert_eq!(
        s["server_state"],
        "disconnected (enforcing last-known-good revision 1)"
    );

    // Server back with a newer revision applied before the node reconnects: it resyncs.
    let server = Server::start(&dir, port)?;
    let out = server.apply(
        &dir.write("p2.yaml", &policy(DENIED, ALLOWED, 0)?)?,
        &["--no-wait"],
    )?;
    ensure!(out.status.success(), "apply: {}", text(&out));
    assert!(text(&out).contains("revision 2: applied"), "{}", text(&out));
    wait_for(30, "the node to resync to revision 2", || {
        let s = node.status()?;
        Ok((s["policy_revision"] == 2 && s["server_state"] == "connected").then_some(()))
    })
    .with_context(|| agent2.log_text())?;
    assert_eq!(node.probe("s3", &[&d, &a])?, ["ok", "EPERM"]);
    let n = server.node(&node.name)?.context("node in status")?;
    assert_eq!(n["acked_revision"], 2);
    Ok(())
}

/// Runs without root: simulated nodes load nothing into the kernel.
#[test]
fn a_hundred_simulated_nodes_ack_each_revision() -> anyhow::Result<()> {
    const NODES: usize = 100;
    let dir = Dir::new("sim")?;
    let server = Server::start(&dir, free_port()?)?;
    let sim = Command::new(bin("corral-simnode")?)
        .args(["--server", &server.url, "--nodes", &NODES.to_string()])
        .args(["--prefix", "sim"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn corral-simnode")?;
    // SIGTERM by pid, then SIGKILL; reaped either way.
    struct Sim(Child);
    impl Drop for Sim {
        fn drop(&mut self) {
            let _ = stop_child(&mut self.0);
        }
    }
    let _sim = Sim(sim);
    wait_for(30, "100 connected nodes", || {
        let s = server.status()?;
        let n = s["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["connected"] == true).count());
        Ok((n == NODES).then_some(()))
    })?;
    for (rev, (allow, deny)) in [(1u64, (ALLOWED, DENIED)), (2, (DENIED, ALLOWED))] {
        let file = dir.write(&format!("p{rev}.yaml"), &policy(allow, deny, 0)?)?;
        let t0 = Instant::now();
        let out = server.apply(&file, &[])?;
        let took = t0.elapsed();
        let t = text(&out);
        ensure!(out.status.success(), "apply: {t}");
        let acks = t
            .lines()
            .filter(|l| l.starts_with("sim-") && l.contains(&format!(": ACK revision {rev}")))
            .count();
        println!(
            "revision {rev}: {acks} ACKs, apply → all ACKed {took:?}; {}",
            t.lines().last().unwrap_or("")
        );
        assert_eq!(acks, NODES, "{t}");
        assert!(t.contains(&format!("{NODES} ACK, 0 NACK")), "{t}");
        let s = server.status()?;
        let all = s["nodes"].as_array().context("nodes")?;
        assert_eq!(all.len(), NODES);
        assert!(all.iter().all(|n| n["acked_revision"] == rev), "{s}");
    }
    Ok(())
}

#[test]
fn mtls_agent_and_cli_sync_and_enforce_and_strangers_are_refused() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = Dir::new("mtls")?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(());
    };
    // The node's certificate carries its node name; the server checks it.
    let certs = pki(&dir, "pki", &["admin", &node.name])?;
    let server = Server::start_with(&dir, free_port()?, Some(&certs))?;
    let node_tls = tls_args(&certs, &node.name);
    let node_tls: Vec<&str> = node_tls.iter().map(String::as_str).collect();
    let agent = Agent::start(&node, &server.url, &node_tls)?;
    wait_for(10, "the agent to connect over mTLS", || connected(&node))
        .with_context(|| agent.log_text())?;
    let out = server.apply(&dir.write("p1.yaml", &policy(ALLOWED, DENIED, 0)?)?, &[])?;
    let t = text(&out);
    ensure!(out.status.success(), "apply over mTLS: {t}");
    assert!(t.contains(&format!("{}: ACK revision 1", node.name)), "{t}");
    assert_eq!(
        node.probe("s1", &[&udp(DENIED), &udp(ALLOWED)])?,
        ["EPERM", "ok"]
    );

    // A client certificate from another CA, and plaintext, are refused; nothing changes.
    let other = pki(&dir, "other", &["admin"])?;
    let p2 = dir.write("p2.yaml", &policy(DENIED, ALLOWED, 0)?)?;
    let p2s = p2.display().to_string();
    let mut args = vec![
        "policy",
        "apply",
        "-f",
        p2s.as_str(),
        "--server",
        &server.url,
    ];
    // The stranger trusts the real server (its CA) but presents a foreign client certificate.
    let mut stranger: Vec<String> = tls_args(&other, "admin")[..4].to_vec();
    stranger.extend([
        "--tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
    ]);
    args.extend(stranger.iter().map(String::as_str));
    let out = cli(&args)?;
    println!("foreign client certificate: {}", text(&out));
    assert!(
        !out.status.success(),
        "a foreign client certificate is refused"
    );
    let plain = server.url.replace("https://", "http://");
    let out = cli(&["policy", "apply", "-f", &p2s, "--server", &plain])?;
    assert!(!out.status.success(), "plaintext to the mTLS server fails");
    assert_eq!(server.status()?["revision"], 1);

    // A valid certificate issued to another name cannot sync as this node.
    drop(agent);
    let admin_tls = tls_args(&certs, "admin");
    let admin_tls: Vec<&str> = admin_tls.iter().map(String::as_str).collect();
    let impostor = Agent::start(&node, &server.url, &admin_tls)?;
    let log = wait_for(10, "the refusal in the agent's log", || {
        let l = impostor.log_text();
        Ok(l.contains("not issued to node").then_some(l))
    })?;
    println!(
        "impostor refused: {}",
        log.lines().find(|l| l.contains("not issued")).unwrap_or("")
    );
    assert_ne!(node.status()?["server_state"], "connected");
    let n = server.node(&node.name)?.context("node in status")?;
    assert_eq!(n["connected"], false, "{n}");
    Ok(())
}

/// `ApplyRequest{file_name, yaml}` as one gRPC message frame (uncompressed), for `curl`.
fn grpc_apply_frame(yaml: &str) -> Vec<u8> {
    use prost::Message as _;
    let msg = corral_proto::v1::ApplyRequest {
        file_name: "claim.yaml".into(),
        yaml: yaml.into(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

/// `PolicyService/Apply` sent by `curl` (a client the attacker controls, not the CLI) as `uid`,
/// claiming to be `claim` in the `x-corral-user` header; the response headers and trailers.
fn curl_apply_as(
    url: &str,
    uid: u32,
    claim: &str,
    frame: &std::path::Path,
) -> anyhow::Result<String> {
    use std::os::unix::process::CommandExt as _;
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!("x-corral-user: {claim}")])
        .arg("--data-binary")
        .arg(format!("@{}", frame.display()))
        .arg(format!("{url}/corral.v1.PolicyService/Apply"))
        .uid(uid)
        .gid(uid)
        .output()
        .context("run curl")?;
    ensure!(out.status.success(), "curl: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Issue 14, the server's plaintext mode: callers used to be named by the `x-corral-user`
/// header, so any local process (a principal allowed to reach the loopback port included)
/// applied policies as the `--policy-admin` by sending the admin's name. Now the server names
/// a plaintext caller by the uid owning its socket: the claim is ignored.
#[test]
fn a_plaintext_caller_is_the_user_owning_its_socket_not_the_name_it_sends() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    const MALLORY: u32 = 2003;
    let dir = Dir::new("claim")?;
    let server = Server::start_args(&dir, free_port()?, None, &["--policy-admin", "root"])?;
    let yaml = policy(ALLOWED, DENIED, 0)?;
    let frame = dir.write("apply.grpc", "")?;
    std::fs::write(&frame, grpc_apply_frame(&yaml))?;
    std::fs::set_permissions(&frame, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;

    let refused = curl_apply_as(&server.url, MALLORY, "root", &frame)?;
    println!("uid {MALLORY} claiming root: {refused}");
    assert!(
        refused.contains("grpc-status: 7"),
        "PermissionDenied: {refused}"
    );
    assert!(
        refused.contains(&MALLORY.to_string()),
        "names the real caller: {refused}"
    );
    assert_eq!(server.status()?["revision"], 0, "nothing applied");
    let out = server.cli_as(
        MALLORY,
        &[
            "policy",
            "apply",
            "-f",
            &dir.write("p.yaml", &yaml)?.display().to_string(),
        ],
    )?;
    assert!(
        !out.status.success(),
        "the CLI as uid {MALLORY}: {}",
        text(&out)
    );
    assert_eq!(server.status()?["revision"], 0, "nothing applied");

    // The same bytes from root (the admin) apply: the request itself is well formed, and a
    // claim to be someone else does not lose root its own name either.
    let applied = curl_apply_as(&server.url, 0, "mallory", &frame)?;
    assert!(applied.contains("grpc-status: 0"), "applied: {applied}");
    assert_eq!(server.status()?["revision"], 1);
    Ok(())
}
