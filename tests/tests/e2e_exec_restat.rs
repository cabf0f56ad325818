//! End to end: the real `corral-agent` re-stats its exec rule paths. A binary denied by path
//! is replaced on disk by rename (a new inode, as a package upgrade or `cp` + `mv` does) while
//! the agent runs; `corral run` of the new file is denied within a few seconds, with no policy
//! change and no agent restart.
//!
//! The agent runs under the fleet harness (`corral_tests::fleet`: own socket, state, pins and
//! cgroup directory; SIGTERM by pid; pins removed with `--uninstall`).

use std::{
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use corral_tests::{
    fleet::{Agent, Dir, Node},
    privileged,
};

/// `corral run` of `binary marker` as an enrolled identity: whether the binary ran (it would
/// create `marker`), and the run's output.
fn run_binary(spec: &Node, binary: &Path, marker: &Path) -> anyhow::Result<(bool, Output)> {
    let _ = std::fs::remove_file(marker);
    let out = spec.local(&[
        "run",
        "--identity",
        "spiffe://e2e.corral/restat",
        "--session",
        "s1",
        "--",
        &binary.display().to_string(),
        &marker.display().to_string(),
    ])?;
    Ok((marker.exists(), out))
}

/// The agent's log lines about exec rules: a failure shows these, not the whole log.
fn exec_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("exec") || l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_denied_binary_replaced_on_disk_is_denied_again_within_seconds() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let test = Dir::new("restat")?;
    let Some(spec) = Node::new(&test, "n1")? else {
        return Ok(());
    };
    std::fs::create_dir_all(spec.dir.join("x"))?;
    let binary = spec.dir.join("x/bin");
    std::fs::copy("/usr/bin/touch", &binary)?;
    let policy = spec.dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-restat
spec:
  identities:
    - spiffe://e2e.corral/**
  mode: enforce
  defaultAction: allow
  exec:
    - {{ action: deny, paths: [\"{}\"] }}
",
            binary.display()
        ),
    )?;
    let agent = Agent::standalone(&spec, &policy, &[])?;
    let marker = spec.dir.join("marker");

    let (ran, out) = run_binary(&spec, &binary, &marker)?;
    assert!(
        !ran && !out.status.success(),
        "the denied binary ran: {out:?}"
    );

    // Replace it by rename: a new inode at the same path, the agent untouched.
    let staged = spec.dir.join("x/bin.new");
    std::fs::copy("/usr/bin/touch", &staged)?;
    std::fs::rename(&staged, &binary)?;
    let replaced = Instant::now();

    // Denied again within a few seconds (the re-stat runs every second); the first attempts
    // may still run the new file, which is the window the re-stat bounds.
    let denied_after = loop {
        let (ran, out) = run_binary(&spec, &binary, &marker)?;
        if !ran {
            assert!(!out.status.success(), "not run, yet success: {out:?}");
            break replaced.elapsed();
        }
        // Generous for a noisy 2-core CI machine: the re-stat itself runs every second.
        if replaced.elapsed() > Duration::from_secs(10) {
            anyhow::bail!(
                "the replaced binary still runs 10 s later; the agent's exec lines:\n{}",
                exec_lines(&agent.log_text())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("replaced binary denied {denied_after:?} after the rename");
    // And it stays denied.
    for _ in 0..3 {
        let (ran, out) = run_binary(&spec, &binary, &marker)?;
        assert!(!ran, "the replaced binary ran again: {out:?}");
    }
    assert!(
        agent.log_text().contains("exec rule paths changed on disk"),
        "the agent logs the update; its exec lines:\n{}",
        exec_lines(&agent.log_text())
    );
    Ok(())
}
