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
    process::Command,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod agent_util;
#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod oci_util;

use agent_util::{ALLOWED, Agent, DENIED, Spec, corral, events, policy, status};
use oci_util::{Container, Opts, bundle, busybox, lines, probe_args, setup, text};

const ID: &str = "spiffe://e2e.corral/agent/container";

fn udp(port: u16) -> String {
    format!("udp:127.0.0.1:{port}")
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
            netns: None,
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
            netns: None,
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
            netns: None,
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
            netns: None,
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
            netns: None,
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
                netns: None,
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
            netns: None,
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
            netns: None,
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
            netns: None,
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
            netns: None,
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
        "runc run: {}\n{}\nevents: {:#?}",
        text(&out),
        agent.log_text(),
        // What the agent decided meanwhile (an exec or socket refusal would show here).
        events(&spec, &[])
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
    // The replaced files are kept (hard links): a denied identity found in a container's view
    // stays denied for as long as the container lives, even once its file is gone (see
    // `Hold::View` in exec_rules.rs), so a copy that reused the old uname's inode number (ext4
    // hands freed numbers out again at once) would be denied too. CI saw that once.
    let kept = w.container.bundle.join("replaced");
    std::fs::create_dir_all(&kept)?;
    for name in ["uname", "echo"] {
        let before = updates();
        std::fs::hard_link(bin.join(name), kept.join(name))?;
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
