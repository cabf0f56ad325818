//! Containers through a real OCI runtime (`runc`, from Debian) with the real agent and the
//! real kernel: the runtime runs `corral-oci-hook` (the `corral` binary under that name) as
//! a createRuntime hook, so an annotated container is enrolled before its init process runs
//! its first instruction.
//!
//! The bundle's root is a directory with the host's libraries and the test binaries bind
//! mounted read-only (nothing downloaded); the container shares the host's network, so its
//! calls to 127.0.0.1 are decided by the node's policy: UDP to port 9 denied, 7 allowed.
//!
//! The binaries are built by `cargo xtask test`; run `cargo build -p corral-agent -p
//! corral-cli -p corral-tests` first when invoking `cargo test -p corral-tests` directly.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, ensure};
use corral_tests::{e2e::bin, privileged, probe_bin};
use serde_json::{Value, json};

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod agent_util;

use agent_util::{ALLOWED, Agent, DENIED, Spec, corral, events, policy, status};

const ID: &str = "spiffe://e2e.corral/agent/container";

fn udp(port: u16) -> String {
    format!("udp:127.0.0.1:{port}")
}

/// `runc`, or a skip (a failure under CI=true: `.ci/run` installs it). runc rather than crun:
/// crun refuses the hybrid cgroup layout (v1 controllers plus a v2 hierarchy holding a
/// controller) that the CI machines have.
fn runtime() -> Option<PathBuf> {
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
struct Container<'a> {
    crun: &'a Path,
    state: PathBuf,
    bundle: PathBuf,
    id: String,
}

impl Container<'_> {
    /// The `runc run` command: creates (hooks included) and starts the container.
    fn command(&self) -> Command {
        let mut c = Command::new(self.crun);
        c.arg("--root")
            .arg(&self.state)
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&self.id);
        c
    }

    /// `runc run`, waiting for the container.
    fn run(&self) -> anyhow::Result<Output> {
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
struct Opts<'a> {
    annotations: &'a [(&'a str, &'a str)],
    /// `Some(extra hook args)`: the createRuntime hook is configured.
    hook: Option<&'a [&'a str]>,
    args: Vec<String>,
    /// `Some(volume)`: a root filesystem of its own ([`own_rootfs`]) with the host directory
    /// `volume` bind mounted at `/opt/vol`, instead of the host's binaries.
    own_root: Option<&'a Path>,
    /// `Some(uid)`: the container's cgroup is `pod<uid>/<name>`, as the kubelet lays out a
    /// pod's containers.
    pod: Option<&'a str>,
}

/// The static busybox (`busybox-static`, installed by `.ci/run`), copied in as the
/// container's own binaries, or a skip (a failure under CI=true).
fn busybox() -> Option<PathBuf> {
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
fn own_rootfs(rootfs: &Path, volume: &Path) -> anyhow::Result<()> {
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
fn bundle<'a>(
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
fn cgroup_parent(spec: &Spec) -> anyhow::Result<String> {
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

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn setup(name: &str) -> anyhow::Result<Option<(Spec, PathBuf)>> {
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

fn probe_args(ops: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut a = vec![probe_bin()?.display().to_string()];
    a.extend(ops.iter().map(|s| (*s).to_owned()));
    Ok(a)
}

#[test]
fn an_annotated_container_is_policed_from_its_first_instruction_and_others_are_untouched()
-> anyhow::Result<()> {
    let Some((spec, crun)) = setup("oci")? else {
        return Ok(());
    };
    let agent = Agent::start(&spec, true, &[])?;
    // The container's init process: its very first call is the denied one.
    let ops = [udp(DENIED), udp(ALLOWED)];
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let c = bundle(
        &spec,
        &crun,
        "annotated",
        &Opts {
            annotations: &[("corral.dev/identity", ID)],
            hook: Some(&[]),
            args: probe_args(&ops)?,
            own_root: None,
            pod: None,
        },
    )?;
    let out = c.run()?;
    ensure!(
        out.status.success(),
        "runc run: {}\n{}",
        text(&out),
        agent.log_text()
    );
    assert_eq!(lines(&out), ["EPERM", "ok"], "{}", text(&out));

    // Enrolled under the container's id as session; counted, and one `container` event.
    let s = status(&spec)?;
    assert_eq!(s["containers_enrolled"], 1, "{s}");
    let evs = corral_tests::e2e::wait_for(5, "the container's events", || {
        let evs = events(&spec, &["--identity", ID])?;
        let denied = evs.iter().any(|e| e["connect"]["port"] == DENIED);
        Ok(denied.then_some(evs))
    })?;
    let enrolled: Vec<&Value> = evs.iter().filter(|e| e["kind"] == "container").collect();
    assert_eq!(enrolled.len(), 1, "{evs:#?}");
    assert_eq!(enrolled[0]["container"]["action"], "enrolled");
    assert_eq!(enrolled[0]["container"]["id"], c.id.as_str());
    assert_eq!(enrolled[0]["principal"]["session"], c.id.as_str());
    assert!(
        evs.iter().any(|e| e["connect"]["port"] == DENIED
            && e["decision"]["verdict"] == "deny"
            && e["principal"]["session"] == c.id.as_str()),
        "the denied call is the container's: {evs:#?}"
    );

    // The same container without the annotation: the hook runs and leaves it alone.
    let plain = bundle(
        &spec,
        &crun,
        "plain",
        &Opts {
            annotations: &[],
            hook: Some(&[]),
            args: probe_args(&ops)?,
            own_root: None,
            pod: None,
        },
    )?;
    let out = plain.run()?;
    ensure!(out.status.success(), "runc run: {}", text(&out));
    assert_eq!(lines(&out), ["ok", "ok"], "{}", text(&out));
    assert_eq!(status(&spec)?["containers_enrolled"], 1);

    // A bad identity annotation: the hook refuses, so the runtime does not start it.
    let bad = bundle(
        &spec,
        &crun,
        "bad",
        &Opts {
            annotations: &[("corral.dev/identity", "not-a-spiffe-id")],
            hook: Some(&[]),
            args: probe_args(&ops)?,
            own_root: None,
            pod: None,
        },
    )?;
    let out = bad.run()?;
    assert!(
        !out.status.success(),
        "a bad identity must not start: {}",
        text(&out)
    );
    assert!(lines(&out).is_empty(), "nothing ran: {}", text(&out));
    drop(agent);
    Ok(())
}

#[test]
fn with_the_agent_down_an_annotated_container_does_not_start_unless_fail_open() -> anyhow::Result<()>
{
    let Some((spec, crun)) = setup("oci-down")? else {
        return Ok(());
    };
    // No agent has ever run: the socket does not exist.
    let ops = [udp(DENIED)];
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let closed = bundle(
        &spec,
        &crun,
        "closed",
        &Opts {
            annotations: &[("corral.dev/identity", ID)],
            hook: Some(&[]),
            args: probe_args(&ops)?,
            own_root: None,
            pod: None,
        },
    )?;
    let out = closed.run()?;
    assert!(!out.status.success(), "fail closed: {}", text(&out));
    assert!(
        lines(&out).is_empty(),
        "the container never ran: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the corral agent"),
        "{}",
        text(&out)
    );

    let open = bundle(
        &spec,
        &crun,
        "open",
        &Opts {
            annotations: &[("corral.dev/identity", ID)],
            hook: Some(&["--fail-open"]),
            args: probe_args(&ops)?,
            own_root: None,
            pod: None,
        },
    )?;
    let out = open.run()?;
    ensure!(
        out.status.success(),
        "--fail-open starts it: {}",
        text(&out)
    );
    assert_eq!(lines(&out), ["ok"], "unpoliced: {}", text(&out));
    // (runc shows a hook's stderr only when the hook fails.)

    // When the agent runs, it reports the unpoliced start: counter and event.
    let _agent = Agent::start(&spec, true, &[])?;
    let s = agent_util_wait(&spec)?;
    assert_eq!(s["containers_failed_open"], 1, "{s}");
    let evs = events(&spec, &[])?;
    let failed: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "container" && e["container"]["action"] == "failed-open")
        .collect();
    assert_eq!(failed.len(), 1, "{evs:#?}");
    assert_eq!(failed[0]["container"]["id"], open.id.as_str());
    assert_eq!(failed[0]["principal"]["identity"], ID);
    let line = corral(&spec, &["events"])?;
    assert!(
        String::from_utf8_lossy(&line.stdout).contains("failed-open"),
        "{}",
        String::from_utf8_lossy(&line.stdout)
    );
    Ok(())
}

/// Status once the agent has picked up the fail-open records (it looks every second).
fn agent_util_wait(spec: &Spec) -> anyhow::Result<Value> {
    corral_tests::e2e::wait_for(5, "the fail-open record to be reported", || {
        let s = status(spec)?;
        Ok((s["containers_failed_open"] != 0).then_some(s))
    })
}

/// A fifo at `path` (returned).
fn mkfifo(path: &Path) -> anyhow::Result<PathBuf> {
    ensure!(
        Command::new("mkfifo").arg(path).status()?.success(),
        "mkfifo {}",
        path.display()
    );
    Ok(path.to_path_buf())
}

/// [`setup`] for the tests of containers with their own files: busybox present, and the
/// agent's policy [`container_exec_policy`].
fn setup_own_files(name: &str) -> anyhow::Result<Option<(Spec, PathBuf)>> {
    let Some((spec, crun)) = setup(name)? else {
        return Ok(None);
    };
    if busybox().is_none() {
        return Ok(None);
    }
    spec.write_policy(&container_exec_policy()?)?;
    Ok(Some((spec, crun)))
}

/// An opted-in container of its own files (identity [`ID`]) that prints `ready`, then waits
/// until [`Waiting::finish`] writes the fifo `/opt/vol/go`, then runs `then`.
struct Waiting<'a> {
    container: Container<'a>,
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    fifo: PathBuf,
}

impl<'a> Waiting<'a> {
    fn start(spec: &Spec, crun: &'a Path, name: &str, then: &str) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        let volume = spec.dir.join("volume");
        let container = bundle(
            spec,
            crun,
            name,
            &Opts {
                annotations: &[("corral.dev/identity", ID)],
                hook: Some(&[]),
                args: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("/bin/echo ready; read x < /opt/vol/go; {then}"),
                ],
                own_root: Some(&volume),
                pod: None,
            },
        )?;
        let fifo = mkfifo(&volume.join("go"))?;
        let mut child = container
            .command()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("runc run")?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut err)?;
            anyhow::bail!("first line {line:?}, {}: {err}", child.wait()?);
        }
        Ok(Self {
            container,
            child,
            out,
            fifo,
        })
    }

    /// Lets it go on; its remaining output lines and exit status.
    fn finish(mut self) -> anyhow::Result<(Vec<String>, std::process::ExitStatus)> {
        use std::io::{BufRead as _, Write as _};
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.fifo)?
            .write_all(b"go\n")?;
        let rest = (&mut self.out).lines().collect::<Result<Vec<_>, _>>()?;
        Ok((rest, self.child.wait()?))
    }
}

/// The container's policy: exec rules naming paths that, on the host, are other files (or none).
fn container_exec_policy() -> anyhow::Result<String> {
    Ok(format!(
        "{}---
apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: container
spec:
  identities:
    - {ID}
  mode: enforce
  defaultAction: deny
  exec:
    - {{ action: allow, paths: [/bin/sh, /bin/echo, \"/opt/**\"] }}
    - {{ action: deny,  paths: [/bin/uname] }}
",
        policy(ALLOWED, DENIED)?
    ))
}

#[test]
fn exec_rules_are_decided_on_the_containers_own_files() -> anyhow::Result<()> {
    let Some((spec, crun)) = setup_own_files("oci-exec")? else {
        return Ok(());
    };
    let agent = Agent::start(&spec, true, &[])?;
    // Allowed: the container's /bin/sh (its entrypoint) and /bin/echo, and /opt/vol/pwd
    // through the prefix /opt/** across the volume mounted below it. Denied: /bin/uname by
    // its rule, /bin/cat by the default. Each is a copy of busybox of the container's own: on
    // the host these paths are other files, so only rules resolved in the container match.
    let script = "/bin/echo allowed-ran; /bin/uname; echo uname=$?; /bin/cat /dev/null; \
                  echo cat=$?; /opt/vol/pwd; echo pwd=$?";
    let c = bundle(
        &spec,
        &crun,
        "exec",
        &Opts {
            annotations: &[("corral.dev/identity", ID)],
            hook: Some(&[]),
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            own_root: Some(&spec.dir.join("volume")),
            pod: None,
        },
    )?;
    let out = c.run()?;
    ensure!(
        out.status.success(),
        "runc run: {}\n{}",
        text(&out),
        agent.log_text()
    );
    assert_eq!(
        lines(&out),
        ["allowed-ran", "uname=137", "cat=137", "/", "pwd=0"],
        "{}",
        text(&out)
    );
    // The kills are the policy's, on the container's paths.
    let evs = corral_tests::e2e::wait_for(5, "the container's exec events", || {
        let evs = events(&spec, &["--identity", ID])?;
        let n = evs
            .iter()
            .filter(|e| e["decision"]["verdict"] == "deny" && !e["exec"].is_null())
            .count();
        Ok((n >= 2).then_some(evs))
    })?;
    let denied: Vec<&str> = evs
        .iter()
        .filter(|e| e["decision"]["verdict"] == "deny" && !e["exec"].is_null())
        .filter_map(|e| e["exec"]["path"].as_str())
        .collect();
    assert!(
        denied.iter().any(|p| p.ends_with("uname")) && denied.iter().any(|p| p.ends_with("cat")),
        "{evs:#?}"
    );

    // The same bundle without the hook (enrolled by no one): nothing is decided for it.
    let plain = bundle(
        &spec,
        &crun,
        "exec-plain",
        &Opts {
            annotations: &[],
            hook: None,
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            own_root: Some(&spec.dir.join("volume")),
            pod: None,
        },
    )?;
    let out = plain.run()?;
    ensure!(out.status.success(), "runc run: {}", text(&out));
    assert_eq!(
        lines(&out),
        ["allowed-ran", "Linux", "uname=0", "cat=0", "/", "pwd=0"],
        "{}",
        text(&out)
    );
    drop(agent);
    Ok(())
}

#[test]
fn a_restarted_agent_still_resolves_a_running_containers_rules_in_its_files() -> anyhow::Result<()>
{
    let Some((spec, crun)) = setup_own_files("oci-exec-restart")? else {
        return Ok(());
    };
    let mut first = Agent::start(&spec, false, &[])?;
    let w = Waiting::start(
        &spec,
        &crun,
        "restart",
        "/bin/echo after-restart; /bin/uname; echo uname=$?",
    )
    .with_context(|| first.log_text())?;

    // A new agent (the pins and the principal stay): it must know the container's files.
    ensure!(first.stop()?, "the first agent stops cleanly");
    let second = Agent::start(&spec, true, &[])?;
    let (rest, st) = w.finish()?;
    assert_eq!(
        rest,
        ["after-restart", "uname=137"],
        "{st}\n{}",
        second.log_text()
    );
    Ok(())
}

#[test]
fn a_container_that_did_not_opt_in_joins_its_enrolled_pod_and_its_files_count() -> anyhow::Result<()>
{
    let Some((spec, crun)) = setup_own_files("oci-join")? else {
        return Ok(());
    };
    let agent = Agent::start(&spec, true, &[])?;
    let uid = format!("{}-5e1f", std::process::id());
    let volume = spec.dir.join("volume");
    // The pod's sandbox carries the identity (and the pod uid, as CRI runtimes pass it): its
    // hook enrols the pod's cgroup. It waits on a fifo, as a pause container would sleep.
    let sandbox = bundle(
        &spec,
        &crun,
        "sandbox",
        &Opts {
            annotations: &[
                ("corral.dev/identity", ID),
                ("io.kubernetes.cri.sandbox-uid", &uid),
            ],
            hook: Some(&[]),
            args: vec!["/bin/sh".into(), "-c".into(), "read x < /opt/vol/go".into()],
            own_root: Some(&volume),
            pod: Some(&uid),
        },
    )?;
    let fifo = mkfifo(&volume.join("go"))?;
    let mut pause = sandbox
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("runc run the sandbox")?;
    corral_tests::e2e::wait_for(10, "the sandbox to be enrolled", || {
        Ok((status(&spec)?["containers_enrolled"] == 1).then_some(()))
    })?;
    // The app container has no annotation: its hook asks, and it joins the pod's principal.
    let script = "/bin/echo allowed-ran; /bin/uname; echo uname=$?";
    let app = bundle(
        &spec,
        &crun,
        "app",
        &Opts {
            annotations: &[],
            hook: Some(&[]),
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            own_root: Some(&volume),
            pod: Some(&uid),
        },
    )?;
    let out = app.run()?;
    // Release the sandbox.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"x\n"))?;
    let _ = pause.wait();
    ensure!(
        out.status.success(),
        "runc run: {}\n{}",
        text(&out),
        agent.log_text()
    );
    assert_eq!(lines(&out), ["allowed-ran", "uname=137"], "{}", text(&out));
    let evs = events(&spec, &["--identity", ID])?;
    let joined: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "container" && e["container"]["action"] == "joined")
        .collect();
    assert_eq!(joined.len(), 1, "{evs:#?}");
    assert_eq!(joined[0]["container"]["id"], app.id.as_str());
    assert_eq!(joined[0]["principal"]["session"], uid.as_str());
    Ok(())
}

#[test]
fn a_container_file_replaced_while_it_runs_is_followed() -> anyhow::Result<()> {
    let Some((spec, crun)) = setup_own_files("oci-exec-restat")? else {
        return Ok(());
    };
    let agent = Agent::start(&spec, true, &[])?;
    let w = Waiting::start(
        &spec,
        &crun,
        "restat",
        "/bin/uname; echo uname=$?; /bin/echo echo-ok",
    )
    .with_context(|| agent.log_text())?;

    // Both rule paths now lead to new files (new inodes, as a package upgrade renames them in):
    // the denied one must stay denied, the allowed one allowed, by the re-stat in the
    // container's view.
    // One at a time, each followed by the re-stat pass that installs it (the next "updated"
    // line after a rename is that rename's: nothing else changes meanwhile).
    let updates = || agent.log_text().matches("exec maps updated").count();
    let bin = w.container.bundle.join("rootfs/bin");
    for name in ["uname", "echo"] {
        let before = updates();
        let tmp = bin.join(format!("{name}.new"));
        std::fs::copy("/bin/busybox", &tmp)?;
        std::fs::rename(&tmp, bin.join(name))?;
        corral_tests::e2e::wait_for(10, "the re-stat to follow the new file", || {
            Ok((updates() > before).then_some(()))
        })?;
    }
    let (rest, st) = w.finish()?;
    assert_eq!(rest, ["uname=137", "echo-ok"], "{st}\n{}", agent.log_text());
    Ok(())
}
