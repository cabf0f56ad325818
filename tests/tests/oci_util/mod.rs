//! Containers through a real OCI runtime (`runc`, from Debian), shared by the test binaries
//! that run them: bundles (an empty root with the host's libraries and the test binaries
//! bind mounted read-only, or busybox as the container's own files), the createRuntime hook
//! as `corral install-oci-hook` installs it, the cgroup layout of pods.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, ensure};
use corral_tests::{e2e::bin, privileged, probe_bin};
use serde_json::{Value, json};

use super::agent_util::{ALLOWED, DENIED, Spec, policy};

/// `runc`, or a skip (a failure under CI=true: `.ci/run` installs it). runc rather than crun:
/// crun refuses the hybrid cgroup layout (v1 controllers plus a v2 hierarchy holding a
/// controller) that the CI machines have.
pub fn runtime() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("runc"))
            .find(|c| c.is_file())
    });
    if found.is_none() {
        corral_tests::skip(
            "runc",
            "no OCI runtime `runc` on PATH (apt-get install runc)",
        );
    }
    found
}

/// One container: its bundle and the runtime's state directory.
pub struct Container<'a> {
    crun: &'a Path,
    state: PathBuf,
    pub bundle: PathBuf,
    pub id: String,
}

impl Container<'_> {
    /// The `runc run` command: creates (hooks included) and starts the container.
    pub fn command(&self) -> Command {
        let mut c = Command::new(self.crun);
        c.arg("--root")
            .arg(&self.state)
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&self.id);
        c
    }

    /// `runc run`, waiting for the container.
    pub fn run(&self) -> anyhow::Result<Output> {
        self.command().output().context("run the OCI runtime")
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.crun)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "-f", &self.id])
            .output();
    }
}

/// Options of one bundle.
pub struct Opts<'a> {
    pub annotations: &'a [(&'a str, &'a str)],
    /// `Some(extra hook args)`: the createRuntime hook is configured.
    pub hook: Option<&'a [&'a str]>,
    pub args: Vec<String>,
    /// `Some(volume)`: a root filesystem of its own ([`own_rootfs`]) with the host directory
    /// `volume` bind mounted at `/opt/vol`, instead of the host's binaries.
    pub own_root: Option<&'a Path>,
    /// `Some(uid)`: the container's cgroup is `pod<uid>/<name>`, as the kubelet lays out a
    /// pod's containers.
    pub pod: Option<&'a str>,
    /// `Some(path)`: the container joins the network namespace at `path` (as a pod's
    /// containers join their sandbox's); `None`: the host's network.
    pub netns: Option<&'a Path>,
}

/// The static busybox (`busybox-static`, installed by `.ci/run`), copied in as the
/// container's own binaries, or a skip (a failure under CI=true).
pub fn busybox() -> Option<PathBuf> {
    let p = PathBuf::from("/bin/busybox");
    let ok = Command::new("file")
        .arg("-L")
        .arg(&p)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
        || (p.is_file()
            && !Command::new("ldd")
                .arg(&p)
                .output()
                .is_ok_and(|o| o.status.success()));
    if !ok {
        corral_tests::skip(
            "busybox-static",
            "no static /bin/busybox (apt-get install busybox-static)",
        );
        return None;
    }
    Some(p)
}

/// The container's own files: busybox copied (a new inode each) as `/bin/sh`, `/bin/echo`,
/// `/bin/uname` and `/bin/cat`, and into `volume` as `pwd`. None of them is a file the host
/// reaches by the same path.
pub fn own_rootfs(rootfs: &Path, volume: &Path) -> anyhow::Result<()> {
    let bb = busybox().context("busybox")?;
    for d in ["bin", "proc", "dev", "opt/vol"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    for name in ["sh", "echo", "uname", "cat"] {
        std::fs::copy(&bb, rootfs.join("bin").join(name))?;
    }
    std::fs::create_dir_all(volume)?;
    std::fs::copy(&bb, volume.join("pwd"))?;
    Ok(())
}

/// Writes a bundle under `spec.dir/<name>`: an empty root with /proc, the host's library
/// directories and the test binaries' directory bind mounted read-only.
pub fn bundle<'a>(
    spec: &Spec,
    crun: &'a Path,
    name: &str,
    o: &Opts<'_>,
) -> anyhow::Result<Container<'a>> {
    let dir = spec.dir.join(name);
    let rootfs = dir.join("rootfs");
    let bindir = probe_bin()?.parent().context("binary dir")?.to_path_buf();
    let mut mounts = vec![json!({"destination": "/proc", "type": "proc", "source": "proc"})];
    let mut binds: Vec<PathBuf> = vec![bindir];
    if let Some(volume) = o.own_root {
        own_rootfs(&rootfs, volume)?;
        binds.clear();
        mounts.push(json!({
            "destination": "/opt/vol", "type": "bind", "source": volume,
            "options": ["rbind", "ro", "nosuid", "nodev"],
        }));
    }
    for lib in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
        if o.own_root.is_some() {
            break;
        }
        // Only real directories (on merged-/usr systems /lib is a symlink: bind /usr/lib and
        // recreate the link inside).
        let p = Path::new(lib);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => binds.push(p.to_path_buf()),
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(p)?;
                let inside = rootfs.join(lib.trim_start_matches('/'));
                std::fs::create_dir_all(inside.parent().context("parent")?)?;
                std::os::unix::fs::symlink(target, inside)?;
            }
            _ => {}
        }
    }
    for b in &binds {
        std::fs::create_dir_all(rootfs.join(b.strip_prefix("/")?))?;
        mounts.push(json!({
            "destination": b, "type": "bind", "source": b,
            "options": ["rbind", "ro", "nosuid", "nodev"],
        }));
    }
    std::fs::create_dir_all(rootfs.join("proc"))?;
    let annotations: serde_json::Map<String, Value> = o
        .annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": o.args,
            "env": ["PATH=/bin:/usr/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": name,
        "mounts": mounts,
        "annotations": annotations,
        "linux": {
            "cgroupsPath": match o.pod {
                Some(uid) => format!("{}/pod{uid}/{name}", cgroup_parent(spec)?),
                None => format!("{}/{name}", cgroup_parent(spec)?),
            },
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
        },
    });
    if let Some(ns) = o.netns
        && let Some(list) = config["linux"]["namespaces"].as_array_mut()
    {
        list.push(json!({"type": "network", "path": ns}));
    }
    if let Some(extra) = o.hook {
        // The hook as `corral install-oci-hook` put it on the "node" (see `setup`), run as
        // CRI-O would from its hooks.d config: that path, those args.
        let node = spec.dir.join("node");
        let cfg: Value = serde_json::from_slice(&std::fs::read(
            node.join("etc/containers/oci/hooks.d/corral.json"),
        )?)?;
        let path = cfg["hook"]["path"].as_str().context("hook path")?;
        let mut args: Vec<String> = cfg["hook"]["args"]
            .as_array()
            .context("hook args")?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        config["hooks"] = json!({
            "createRuntime": [{
                "path": node.join(path.trim_start_matches('/')),
                "args": args,
                "timeout": 20,
            }],
        });
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(Container {
        crun,
        state: spec.dir.join("crun-state"),
        bundle: dir,
        id: format!("corral-{name}-{}", std::process::id()),
    })
}

/// The containers' cgroup parent, relative to the cgroup v2 root (next to the agent's
/// principals, removed with them).
pub fn cgroup_parent(spec: &Spec) -> anyhow::Result<String> {
    let root = corral_agent::paths::cgroup2_root()?;
    Ok(format!(
        "/{}",
        spec.cgroups
            .strip_prefix(&root)?
            .with_file_name(format!(
                "{}-ctr",
                spec.cgroups
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("x")
            ))
            .display()
    ))
}

pub fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn setup(name: &str) -> anyhow::Result<Option<(Spec, PathBuf)>> {
    if !privileged() {
        return Ok(None);
    }
    let Some(crun) = runtime() else {
        return Ok(None);
    };
    let Some(spec) = Spec::new(name)? else {
        return Ok(None);
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    // The hook installed as the DaemonSet's init container installs it, under a test root.
    let out = Command::new(bin("corral")?)
        .arg("install-oci-hook")
        .arg("--root")
        .arg(spec.dir.join("node"))
        .arg("--socket")
        .arg(&spec.socket)
        .output()?;
    ensure!(out.status.success(), "install-oci-hook: {}", text(&out));
    Ok(Some((spec, crun)))
}

pub fn probe_args(ops: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut a = vec![probe_bin()?.display().to_string()];
    a.extend(ops.iter().map(|s| (*s).to_owned()));
    Ok(a)
}
