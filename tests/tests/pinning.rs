//! Pinned enforcement outlives the agent: kill -9 the process that loaded the programs, and a
//! process in an enrolled cgroup is still denied; a new process adopts the pins with no window.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use corral_agent::ebpf::raw;
use corral_tests::{Outcome, TestCgroup, privileged, probe_bin, probe_in};

fn fixture_bin() -> anyhow::Result<PathBuf> {
    Ok(probe_bin()?.with_file_name("corral-enforcer-fixture"))
}

/// Starts the fixture and waits for its `ready` line.
fn start_fixture(pins: &Path, enrol: Option<&Path>) -> anyhow::Result<(Child, String)> {
    let mut c = Command::new(fixture_bin()?);
    c.arg("--pins").arg(pins).stdout(Stdio::piped());
    if let Some(cg) = enrol {
        c.arg("--enrol").arg(cg);
    }
    let mut child = c.spawn().context("spawn fixture")?;
    let out = child.stdout.take().context("fixture stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    anyhow::ensure!(
        line.starts_with("ready"),
        "fixture did not become ready: {line:?}"
    );
    Ok((child, line.trim().to_owned()))
}

fn bpffs_dir() -> Option<PathBuf> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| l.contains(" - bpf "))?
        .split_whitespace()
        .nth(4)?
        .to_owned();
    Some(PathBuf::from(mounted))
}

#[test]
fn kill_9_keeps_enforcing_and_a_new_agent_adopts_without_a_window() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(bpffs) = bpffs_dir() else {
        corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
        return Ok(());
    };
    let pins = bpffs.join(format!("corral-test-{}", std::process::id()));
    let cg = TestCgroup::new("pinning")?;
    let denied = "udp:127.0.0.1:9";

    let (mut a, ready) = start_fixture(&pins, Some(&cg.path))?;
    assert_eq!(ready, "ready adopted=false");
    // The packet programs are linked at the principal's cgroup, each link pinned by its id.
    let id = cg.id()?;
    let packet_pins = || -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(pins.join("links"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("egress") || n.starts_with("ingress"))
            .collect();
        v.sort();
        Ok(v)
    };
    let expected = vec![format!("egress-cg{id}"), format!("ingress-cg{id}")];
    assert_eq!(packet_pins()?, expected);
    assert_eq!(
        probe_in(&cg.path, &[denied])?,
        vec![Outcome::Errno("EPERM".into())]
    );

    // A loop of connects inside the cgroup that runs across the kill and the restart.
    let stop = std::env::temp_dir().join(format!("corral-pinning-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let looper = Command::new(probe_bin()?)
        .arg("--cgroup")
        .arg(&cg.path)
        .arg(format!("until:{}:{denied}", stop.display()))
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(200));

    a.kill()?; // SIGKILL to the process we started
    a.wait()?;
    std::thread::sleep(Duration::from_millis(200));
    // Nobody holds the programs but the pins: still enforced.
    assert_eq!(
        probe_in(&cg.path, &[denied])?,
        vec![Outcome::Errno("EPERM".into())]
    );

    let (mut b, ready) = start_fixture(&pins, None)?;
    assert_eq!(
        ready, "ready adopted=true",
        "the new process must adopt the pinned state"
    );
    assert_eq!(
        packet_pins()?,
        expected,
        "replaced in place, nothing left staged"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        probe_in(&cg.path, &[denied])?,
        vec![Outcome::Errno("EPERM".into())]
    );

    std::fs::write(&stop, b"")?;
    let out = looper.wait_with_output()?;
    let counts = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let _ = std::fs::remove_file(&stop);
    println!("connect loop across kill -9 and adoption: {counts}");
    assert!(
        counts.starts_with("EPERM=") && !counts.contains("ok="),
        "every connect during kill and restart must be denied: {counts}"
    );

    b.kill()?;
    b.wait()?;
    // Uninstall removes the pins and with them the enforcement.
    uninstall(&pins)?;
    assert!(!pins.exists(), "pins removed");
    assert_eq!(
        outcome_after_uninstall(&cg.path, denied)?,
        vec![Outcome::Ok]
    );
    Ok(())
}

/// A map made and pinned at `path` (replacing what is there) with this layout, as another
/// Corral version would have left it.
fn pin_foreign_map(
    path: &Path,
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
) -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    let map = raw::create_map(map_type, key, value, entries).context("BPF_MAP_CREATE")?;
    let _ = std::fs::remove_file(path);
    raw::pin_fd(map.as_fd(), path).context("BPF_OBJ_PIN")?;
    Ok(())
}

/// What the probe in `cg` gets for `op` once enforcement is gone: the kernel frees a link whose
/// last pin was removed from a work queue, so the programs may run for a moment after
/// `--uninstall` returns. Tries for up to 3 s.
fn outcome_after_uninstall(cg: &Path, op: &str) -> anyhow::Result<Vec<Outcome>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let got = probe_in(cg, &[op])?;
        if got == vec![Outcome::Ok] || std::time::Instant::now() > deadline {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fixture --pins PINS --uninstall`: removes the pins and with them the enforcement.
fn uninstall(pins: &Path) -> anyhow::Result<()> {
    let status = Command::new(fixture_bin()?)
        .arg("--pins")
        .arg(pins)
        .arg("--uninstall")
        .status()?;
    anyhow::ensure!(status.success(), "uninstall failed");
    Ok(())
}

/// Pins left by another Corral version: a map of per-CPU or per-socket state with another
/// layout is made afresh and enforcement goes on; a map of principal or policy state with
/// another layout stops the agent with an error naming it and the way out (the old
/// enforcement stays in force meanwhile), never a silent loss.
#[test]
fn pins_of_another_layout_are_rebuilt_or_refused_by_name() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(bpffs) = bpffs_dir() else {
        corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
        return Ok(());
    };
    let pins = bpffs.join(format!("corral-test-layout-{}", std::process::id()));
    let cg = TestCgroup::new("pinning-layout")?;
    let denied = "udp:127.0.0.1:9";
    let eperm = vec![Outcome::eperm()];
    let (mut a, _) = start_fixture(&pins, Some(&cg.path))?;
    a.kill()?;
    a.wait()?;

    // CORRAL_WAKE (per-CPU u64) as a per-CPU array of 16-byte values (BPF_MAP_TYPE_PERCPU_ARRAY = 6).
    pin_foreign_map(&pins.join("maps/CORRAL_WAKE"), 6, 4, 16, 1)?;
    let (mut b, ready) = start_fixture(&pins, None)?;
    assert_eq!(ready, "ready adopted=true");
    assert_eq!(probe_in(&cg.path, &[denied])?, eperm, "still enforced");
    b.kill()?;
    b.wait()?;

    // CORRAL_SEEN (chaining state, u32 -> u64) as a hash of 16-byte values (BPF_MAP_TYPE_HASH = 1).
    pin_foreign_map(&pins.join("maps/CORRAL_SEEN"), 1, 4, 16, 16_384)?;
    let out = Command::new(fixture_bin()?)
        .arg("--pins")
        .arg(&pins)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "must not start: {err}");
    assert!(
        err.contains("pinned map CORRAL_SEEN was made by another Corral version")
            && err.contains("--uninstall"),
        "{err}"
    );
    assert_eq!(
        probe_in(&cg.path, &[denied])?,
        eperm,
        "the old enforcement stays in force"
    );

    uninstall(&pins)?;
    assert_eq!(
        outcome_after_uninstall(&cg.path, denied)?,
        vec![Outcome::Ok]
    );
    Ok(())
}
