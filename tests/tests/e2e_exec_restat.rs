//! End to end: the real `corral-agent` re-stats its exec rule paths. A binary denied by path
//! is replaced on disk by rename (a new inode, as a package upgrade or `cp` + `mv` does) while
//! the agent runs; `corral run` of the new file is denied within a few seconds, with no policy
//! change and no agent restart.
//!
//! The harness is the minimum of `e2e_agent.rs` (own socket, state, pins and cgroup
//! directory; SIGTERM by pid; pins removed with `--uninstall`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use corral_agent::{cgroup, ebpf::PinDir, paths};
use corral_tests::{e2e::bin, privileged};

struct Spec {
    dir: PathBuf,
    socket: PathBuf,
    pins: PathBuf,
    cgroups: PathBuf,
}

impl Drop for Spec {
    fn drop(&mut self) {
        if self.pins.exists() {
            let _ = PinDir::new(&self.pins).uninstall();
        }
        let _ = cgroup::remove(&self.cgroups);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent process; SIGTERM by pid on drop (SIGKILL if it does not stop in 15 s).
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn corral(spec: &Spec, args: &[&str]) -> anyhow::Result<Output> {
    let (sub, rest) = args.split_first().context("a subcommand")?;
    Command::new(bin("corral")?)
        .arg(sub)
        .arg("--socket")
        .arg(&spec.socket)
        .args(rest)
        .output()
        .context("run corral")
}

fn start(spec: &Spec, policy: &Path) -> anyhow::Result<Agent> {
    let log = spec.dir.join("agent.log");
    let child = Command::new(bin("corral-agent")?)
        .arg("--policy")
        .arg(policy)
        .arg("--socket")
        .arg(&spec.socket)
        .arg("--pin-dir")
        .arg(&spec.pins)
        .arg("--state-dir")
        .arg(spec.dir.join("state"))
        .arg("--cgroup-dir")
        .arg(&spec.cgroups)
        .arg("--uninstall")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawn corral-agent")?;
    let mut a = Agent {
        child: Some(child),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(ch) = a.child.as_mut()
            && let Some(st) = ch.try_wait()?
        {
            bail!("corral-agent exited with {st}:\n{}", a.log_text());
        }
        if spec.socket.exists() && corral(spec, &["status"])?.status.success() {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!("corral-agent not ready in 30 s:\n{}", a.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `corral run` of `binary marker` as an enrolled identity: whether the binary ran (it would
/// create `marker`), and the run's output.
fn run_binary(spec: &Spec, binary: &Path, marker: &Path) -> anyhow::Result<(bool, Output)> {
    let _ = std::fs::remove_file(marker);
    let out = corral(
        spec,
        &[
            "run",
            "--identity",
            "spiffe://e2e.corral/restat",
            "--session",
            "s1",
            "--",
            &binary.display().to_string(),
            &marker.display().to_string(),
        ],
    )?;
    Ok((marker.exists(), out))
}

#[test]
fn a_denied_binary_replaced_on_disk_is_denied_again_within_seconds() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Ok(bpffs) = paths::find_mount("bpf") else {
        corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
        return Ok(());
    };
    let id = format!("e2e-restat-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("corral-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("x"))?;
    let spec = Spec {
        socket: dir.join("agent.sock"),
        pins: bpffs.join(format!("corral-{id}")),
        cgroups: paths::cgroup2_root()?.join("corral-test").join(&id),
        dir,
    };
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
    let agent = start(&spec, &policy)?;
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
        if replaced.elapsed() > Duration::from_secs(5) {
            bail!(
                "the replaced binary still runs 5 s later:\n{}",
                agent.log_text()
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
        "the agent logs the update:\n{}",
        agent.log_text()
    );
    Ok(())
}
