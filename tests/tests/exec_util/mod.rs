//! Helpers shared by the exec test files: temp directories of copied binaries, running a
//! program inside a test cgroup through `corral-spawn`, and an enforcer with one principal.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use corral_agent::ebpf::{
    Enforcer, ExecMode,
    events::{Event, EventReader, ExecDecision},
};
use corral_policy::compiled::{Action, CompiledPolicy, ExecRule};
use corral_tests::{TestCgroup, build};

/// A temp directory of the test's own, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("corral-exec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Copies `src` to `rel` (a new inode), executable.
    pub fn copy(&self, src: &str, rel: &str) -> anyhow::Result<PathBuf> {
        let dst = self.path(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(src, &dst).with_context(|| format!("copy {src}"))?;
        Ok(dst)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn exec_rule(index: u32, action: Action, exact: &[&Path], prefixes: &[&Path]) -> ExecRule {
    ExecRule {
        index,
        action,
        exact: exact.iter().map(|p| s(p)).collect(),
        prefixes: prefixes.iter().map(|p| s(p)).collect(),
    }
}

/// How a spawned program ended, as `corral-spawn` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exit { pid: u32, code: i32 },
    Signal { pid: u32, sig: i32 },
    SpawnFailed(String),
}

impl Ended {
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Exit { pid, .. } | Self::Signal { pid, .. } => Some(*pid),
            Self::SpawnFailed(_) => None,
        }
    }
}

pub fn spawn_bin() -> anyhow::Result<PathBuf> {
    Ok(corral_tests::probe_bin()?.with_file_name("corral-spawn"))
}

/// Runs `path args...` inside `cg` (optionally from `cwd`) and reports how it ended.
pub fn spawn_in(
    cg: &TestCgroup,
    cwd: Option<&Path>,
    path: &str,
    args: &[&str],
) -> anyhow::Result<Ended> {
    let mut cmd = Command::new(spawn_bin()?);
    cmd.arg("--cgroup").arg(&cg.path);
    if let Some(cwd) = cwd {
        cmd.arg("--cwd").arg(cwd);
    }
    let out = cmd
        .arg(path)
        .args(args)
        .output()
        .context("run corral-spawn")?;
    anyhow::ensure!(
        out.status.success(),
        "corral-spawn failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k).and_then(|v| v.parse::<i64>().ok()))
    };
    let pid = field("pid=").and_then(|p| u32::try_from(p).ok());
    Ok(match (pid, field("exit="), field("signal=")) {
        (Some(pid), Some(code), _) => Ended::Exit {
            pid,
            code: i32::try_from(code)?,
        },
        (Some(pid), None, Some(sig)) => Ended::Signal {
            pid,
            sig: i32::try_from(sig)?,
        },
        _ => Ended::SpawnFailed(line),
    })
}

/// What a denied exec looks like to the spawner in each mode.
pub fn assert_denied(mode: ExecMode, got: &Ended, what: &str) {
    match mode {
        ExecMode::Tracepoint => assert!(
            matches!(got, Ended::Signal { sig, .. } if *sig == libc::SIGKILL),
            "{what}: expected the new image to be killed by SIGKILL, got {got:?}"
        ),
        ExecMode::Lsm => assert_eq!(
            got,
            &Ended::SpawnFailed("spawn=EPERM".into()),
            "{what}: expected execve to fail with EPERM"
        ),
    }
}

pub fn assert_ran(got: &Ended, what: &str) {
    assert!(
        matches!(got, Ended::Exit { code: 0, .. }),
        "{what}: expected it to run and exit 0, got {got:?}"
    );
}

/// An enforcer with one enrolled principal (`index`) in `cg`, governed by `policy` (with its
/// exec rules) or by no policy at all.
pub struct Setup {
    pub enforcer: Enforcer,
    pub reader: EventReader,
}

pub fn setup(
    cg: &TestCgroup,
    index: u32,
    policy: Option<(CompiledPolicy, Vec<ExecRule>)>,
) -> anyhow::Result<Setup> {
    let mut enforcer = Enforcer::load_and_attach(&cg.root)?;
    let slot = policy.as_ref().map(|_| 0);
    enforcer
        .maps()
        .add_principal(cg.id()?, cg.level(), index, slot)?;
    if let Some((mut p, exec)) = policy {
        p.exec = exec;
        enforcer
            .maps()
            .apply(&build::set(1, vec![p]), |_, _| Some(0))?;
    }
    let reader = EventReader::take(enforcer.maps())?;
    Ok(Setup { enforcer, reader })
}

impl Setup {
    pub fn exec_events(&mut self) -> Vec<ExecDecision> {
        let mut v = Vec::new();
        self.reader.drain_all(&mut v);
        v.into_iter()
            .filter_map(|e| match e {
                Event::Exec(x) => Some(x),
                Event::Connect(_) | Event::Socket(_) => None,
            })
            .collect()
    }
}

/// The tracepoint event for the exec of process `pid` (the exec that happened).
pub fn event_for(events: &[ExecDecision], pid: u32) -> anyhow::Result<ExecDecision> {
    events
        .iter()
        .find(|e| e.header.pid == pid && e.exec_id != 0)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no exec event for pid {pid} in {events:#?}"))
}
