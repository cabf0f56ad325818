//! Containment: exec identity is the kernel's, and the dynamic loader is no side door.
//!
//! - `ld-linux-x86-64.so.2 PROGRAM` runs PROGRAM while the kernel sees only the loader exec'd:
//!   a loader run directly is allowed only by a rule naming the loader itself, never by a
//!   prefix rule or the default action;
//! - exec rules match files on overlayfs (every container's root) and on btrfs, whose
//!   `stat()` device is not the superblock device the kernel reads.

use std::{path::Path, process::Command};

use corral_agent::ebpf::{events::Reason, loaders};
use corral_policy::compiled::Action;
use corral_tests::{TestCgroup, build, privileged};

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod exec_util;

use exec_util::{TempDir, assert_denied, assert_ran, event_for, exec_rule, s, setup, spawn_in};

/// The loader of `/usr/bin/touch` (the first one the agent finds, resolved).
fn a_loader() -> anyhow::Result<std::path::PathBuf> {
    let paths = loaders::loader_paths();
    let first = paths
        .iter()
        .find(|p| p.to_string_lossy().contains("x86-64") || p.to_string_lossy().contains("aarch64"))
        .or(paths.first())
        .ok_or_else(|| anyhow::anyhow!("no dynamic loader on this node"))?;
    Ok(std::fs::canonicalize(first)?)
}

#[test]
fn a_loader_run_directly_needs_a_rule_naming_it() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let loader = a_loader()?;
    let dir = TempDir::new("loader")?;
    let denied = dir.copy("/usr/bin/touch", "denied-touch")?;
    let cg = TestCgroup::new("exec-loader")?;
    // Default allow, one program denied, the loader's directory allowed by prefix.
    let policy = build::policy("exec-loader").default_allow().build();
    let lib_dir = loader.parent().unwrap_or(Path::new("/"));
    let rules = vec![
        exec_rule(0, Action::Deny, &[&denied], &[]),
        exec_rule(1, Action::Allow, &[], &[lib_dir]),
    ];
    let mut st = setup(&cg, 21, Some((policy, rules)))?;
    let mode = st.enforcer.exec_mode();

    let m1 = dir.path("m-direct");
    assert_denied(
        mode,
        &spawn_in(&cg, None, &s(&denied), &[&s(&m1)])?,
        "the denied program",
    );
    let m2 = dir.path("m-loader");
    let got = spawn_in(&cg, None, &s(&loader), &[&s(&denied), &s(&m2)])?;
    assert_denied(mode, &got, "the denied program run by the loader");
    assert!(!m2.exists(), "the loader ran the denied program");
    let ev = event_for(&st.exec_events(), got.pid().unwrap_or(0))?;
    assert_eq!(ev.header.reason, Reason::Containment);

    // A rule naming the loader itself lets it run (here: an allowed program).
    let cg2 = TestCgroup::new("exec-loader-named")?;
    let policy = build::policy("exec-loader-named").default_allow().build();
    let rules = vec![exec_rule(0, Action::Allow, &[&loader], &[])];
    let _st2 = setup(&cg2, 22, Some((policy, rules)))?;
    let m3 = dir.path("m-named");
    assert_ran(
        &spawn_in(&cg2, None, &s(&loader), &["/usr/bin/touch", &s(&m3)])?,
        "the loader named by a rule",
    );
    assert!(m3.exists());
    Ok(())
}

struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount(args: &[&str], target: &Path) -> anyhow::Result<Mounted> {
    let st = Command::new("mount").args(args).arg(target).status()?;
    anyhow::ensure!(st.success(), "mount {args:?} {}", target.display());
    Ok(Mounted(target.to_owned()))
}

/// Deny one copy of `touch` and allow another, both on the filesystem mounted at `root`:
/// the rules must match there.
fn rules_match_on(fs: &str, root: &Path, index: u32) -> anyhow::Result<()> {
    let denied = root.join("denied-touch");
    let allowed = root.join("allowed-touch");
    std::fs::copy("/usr/bin/touch", &denied)?;
    std::fs::copy("/usr/bin/touch", &allowed)?;
    let cg = TestCgroup::new(&format!("exec-{fs}"))?;
    let policy = build::policy(&format!("exec-{fs}")).build();
    let rules = vec![
        exec_rule(0, Action::Deny, &[&denied], &[]),
        exec_rule(1, Action::Allow, &[&allowed], &[]),
    ];
    let mut st = setup(&cg, index, Some((policy, rules)))?;
    let mode = st.enforcer.exec_mode();
    let marker = root.join("m-allowed");
    let got = spawn_in(&cg, None, &s(&allowed), &[&s(&marker)])?;
    assert_ran(&got, &format!("an allowed file on {fs}"));
    let ev = event_for(&st.exec_events(), got.pid().unwrap_or(0))?;
    assert_eq!(
        ev.header.reason,
        Reason::Rule,
        "decided by the allow rule on {fs}"
    );
    let marker = root.join("m-denied");
    assert_denied(
        mode,
        &spawn_in(&cg, None, &s(&denied), &[&s(&marker)])?,
        &format!("a denied file on {fs}"),
    );
    assert!(!marker.exists());
    Ok(())
}

#[test]
fn exec_rules_match_on_overlayfs() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = TempDir::new("overlay")?;
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(dir.path(d))?;
    }
    // One file from the lower layer (as a container image's), the rest written on top.
    std::fs::copy("/usr/bin/touch", dir.path("lower/denied-touch"))?;
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        s(&dir.path("lower")),
        s(&dir.path("upper")),
        s(&dir.path("work"))
    );
    let merged = dir.path("merged");
    let _m = mount(&["-t", "overlay", "overlay", "-o", &opts], &merged)?;
    rules_match_on("overlayfs", &merged, 23)
}

#[test]
fn exec_rules_match_on_btrfs() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems")?;
    if !filesystems.contains("btrfs") {
        corral_tests::skip("btrfs", "the kernel has no btrfs");
        return Ok(());
    }
    let dir = TempDir::new("btrfs")?;
    let image = dir.path("fs.img");
    std::fs::File::create(&image)?.set_len(256 << 20)?;
    let st = Command::new("mkfs.btrfs").arg("-q").arg(&image).status()?;
    anyhow::ensure!(
        st.success(),
        "mkfs.btrfs (btrfs-progs, installed by .ci/run)"
    );
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt)?;
    let _m = mount(&["-o", "loop", &s(&image)], &mnt)?;
    // The top-level subvolume, and a subvolume inside it (its own anonymous device for stat).
    rules_match_on("btrfs", &mnt, 24)?;
    let sub = mnt.join("sub");
    let st = Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(&sub)
        .status()?;
    anyhow::ensure!(st.success(), "btrfs subvolume create");
    rules_match_on("btrfs-subvolume", &sub, 25)
}
