//! Containment end to end: the real `corral-agent` and `corral run` start commands (as root)
//! with no capabilities, `no_new_privs` and the seccomp filter, and the opt-outs (`--user`,
//! `--cap`, `--no-seccomp`) do what they say and show in `corral status` and in the
//! principal's events.
//!
//! Uses the agent harness of `e2e_agent.rs` (`agent_util`); run `cargo build -p corral-agent
//! -p corral-cli` first when invoking `cargo test -p corral-tests` directly.

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use corral_agent::paths;
use corral_tests::{
    e2e::{Reaped, bin, wait_for},
    privileged,
};

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod agent_util;

use agent_util::{ALLOWED, Agent, DENIED, Spec, corral, events, policy, status};

const ID: &str = "spiffe://e2e.corral/agent/contained";

/// `corral run --identity ID --session S FLAGS... -- CMD...`.
fn run(spec: &Spec, session: &str, flags: &[&str], cmd: &[&str]) -> anyhow::Result<Output> {
    let mut args = vec!["run", "--identity", ID, "--session", session];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(cmd);
    corral(spec, &args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `/proc/self/status` of CMD run with `flags`: the `Name:\tvalue` lines.
fn self_status(
    spec: &Spec,
    session: &str,
    flags: &[&str],
) -> anyhow::Result<Vec<(String, String)>> {
    let out = run(spec, session, flags, &["cat", "/proc/self/status"])?;
    ensure!(
        out.status.success(),
        "corral run {flags:?} cat /proc/self/status: {}: {}",
        out.status,
        text(&out.stderr)
    );
    Ok(text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

fn field<'a>(s: &'a [(String, String)], name: &str) -> &'a str {
    s.iter()
        .find(|(k, _)| k == name)
        .map_or("<missing>", |(_, v)| v.as_str())
}

const NO_CAPS: &str = "0000000000000000";
/// CAP_NET_BIND_SERVICE (10) alone.
const NET_BIND_SERVICE: &str = "0000000000000400";

fn agent(name: &str) -> anyhow::Result<Option<(Spec, Agent)>> {
    if !privileged() {
        return Ok(None);
    }
    let Some(spec) = Spec::new(name)? else {
        return Ok(None);
    };
    spec.write_policy(&policy(ALLOWED, DENIED)?)?;
    let agent = Agent::start(&spec, true, &[])?;
    Ok(Some((spec, agent)))
}

#[test]
fn run_starts_commands_without_capabilities_with_no_new_privs_and_seccomp() -> anyhow::Result<()> {
    let Some((spec, _agent)) = agent("contain-default")? else {
        return Ok(());
    };
    let s = self_status(&spec, "c-default", &[])?;
    for caps in ["CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"] {
        assert_eq!(field(&s, caps), NO_CAPS, "{caps}: {s:?}");
    }
    assert_eq!(field(&s, "NoNewPrivs"), "1");
    assert_eq!(field(&s, "Seccomp"), "2", "a seccomp filter");
    assert!(field(&s, "Uid").starts_with("0\t"), "still root: {s:?}");

    // Ordinary commands work.
    let out = run(&spec, "c-default", &[], &["bash", "-c", "echo ok"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ok\n");

    // Root's files are still root's: moving itself to the cgroup v2 root is a file write.
    let procs = paths::cgroup2_root()?.join("cgroup.procs");
    let script = format!("echo $$ > {} && echo moved", procs.display());
    let out = run(&spec, "c-default", &[], &["sh", "-c", &script])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "moved\n");

    // ptrace fails with EPERM (PTRACE_TRACEME needs no privilege) and clone3 with ENOSYS
    // (clone3 with no arguments is EINVAL otherwise); io_uring_setup with EPERM (io_uring
    // creates sockets past the socket() guard); not with --no-seccomp. x86_64 numbers.
    if cfg!(target_arch = "x86_64") && std::path::Path::new("/usr/bin/perl").exists() {
        let calls = r#"$r = syscall(101, 0, 0, 0, 0); print "ptrace $r $!\n";
                       $r = syscall(435, 0, 0); print "clone3 $r $!\n";
                       $p = "\0" x 120; $r = syscall(425, 1, $p);
                       print "io_uring " . ($r >= 0 ? "ok" : "$r $!") . "\n";"#;
        let out = run(&spec, "c-default", &[], &["perl", "-e", calls])?;
        assert_eq!(
            text(&out.stdout),
            "ptrace -1 Operation not permitted\nclone3 -1 Function not implemented\n\
             io_uring -1 Operation not permitted\n",
            "{}",
            text(&out.stderr)
        );
        let out = run(
            &spec,
            "c-default",
            &["--no-seccomp"],
            &["perl", "-e", calls],
        )?;
        assert_eq!(
            text(&out.stdout),
            "ptrace 0 \nclone3 -1 Invalid argument\nio_uring ok\n",
            "{}",
            text(&out.stderr)
        );
    }

    // New user and mount namespaces are refused (as root: unshare -U needs no capability).
    if which_unshare().is_some() {
        for flag in ["-U", "-m"] {
            let out = run(&spec, "c-default", &[], &["unshare", flag, "true"])?;
            assert!(!out.status.success(), "unshare {flag} must fail");
            assert!(
                text(&out.stderr).contains("Operation not permitted"),
                "unshare {flag}: {}",
                text(&out.stderr)
            );
        }
        // Outside corral run the same call works (where user namespaces are on): the filter is
        // what refuses it.
        let out = Command::new("unshare").args(["-U", "true"]).output()?;
        if !out.status.success() {
            println!(
                "note: unshare -U fails here outside corral run too: {}",
                text(&out.stderr)
            );
        }
    } else {
        println!("no unshare (util-linux) here: namespace checks not run");
    }
    Ok(())
}

fn which_unshare() -> Option<std::path::PathBuf> {
    ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

#[test]
fn opt_outs_do_what_they_say() -> anyhow::Result<()> {
    let Some((spec, _agent)) = agent("contain-optout")? else {
        return Ok(());
    };
    let s = self_status(&spec, "c-noseccomp", &["--no-seccomp"])?;
    assert_eq!(field(&s, "Seccomp"), "0");
    assert_eq!(field(&s, "NoNewPrivs"), "1", "no_new_privs either way");
    assert_eq!(field(&s, "CapEff"), NO_CAPS);

    let s = self_status(&spec, "c-cap", &["--cap", "net_bind_service"])?;
    for caps in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(field(&s, caps), NET_BIND_SERVICE, "{caps}: {s:?}");
    }
    assert_eq!(field(&s, "Seccomp"), "2");

    let s = self_status(&spec, "c-user", &["--user", "nobody"])?;
    assert_eq!(field(&s, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(field(&s, "CapEff"), NO_CAPS);
    assert_eq!(field(&s, "CapAmb"), NO_CAPS);

    // A capability kept across --user (keepcaps, then ambient).
    let s = self_status(
        &spec,
        "c-user-cap",
        &["--user", "65534", "--cap", "CAP_NET_BIND_SERVICE"],
    )?;
    assert_eq!(field(&s, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(field(&s, "CapEff"), NET_BIND_SERVICE);
    assert_eq!(field(&s, "CapAmb"), NET_BIND_SERVICE);
    assert_eq!(field(&s, "CapBnd"), NET_BIND_SERVICE);
    Ok(())
}

#[test]
fn opt_outs_show_in_status_while_the_principal_runs() -> anyhow::Result<()> {
    let Some((spec, _agent)) = agent("contain-status")? else {
        return Ok(());
    };
    let child = Command::new(bin("corral")?)
        .arg("run")
        .arg("--socket")
        .arg(&spec.socket)
        .args([
            "--identity",
            ID,
            "--session",
            "c-status",
            "--user",
            "nobody",
        ])
        .args([
            "--cap",
            "net_bind_service",
            "--no-seccomp",
            "--",
            "sleep",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut sleeper = Reaped(Some(child));
    let p = wait_for(5, "the principal in status", || {
        let s = status(&spec)?;
        Ok(s["principals"].as_array().and_then(|ps| {
            ps.iter()
                .find(|p| p["session"] == "c-status" && p["processes"].as_u64() >= Some(1))
                .cloned()
        }))
    })?;
    assert_eq!(p["identity"], ID);
    assert_eq!(
        p["containment_opt_outs"],
        serde_json::json!(["user=65534", "cap=net_bind_service", "no-seccomp"])
    );
    let human = corral(&spec, &["status"])?;
    assert!(
        text(&human.stdout).contains("opt-outs user=65534, cap=net_bind_service, no-seccomp"),
        "{}",
        text(&human.stdout)
    );
    let out = sleeper
        .0
        .take()
        .context("the sleeper")?
        .wait_with_output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A fully contained principal has none.
    let out = run(&spec, "c-plain", &[], &["true"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The principal's events carry its opt-outs too (its exec of `sleep`, at least).
    let evs = wait_for(5, "both principals' exec events", || {
        let evs = events(&spec, &["--identity", ID])?;
        let has = |s: &str| {
            evs.iter()
                .any(|e| e["principal"]["session"] == s && e["exec"].is_object())
        };
        Ok((has("c-status") && has("c-plain")).then_some(evs))
    })?;
    for e in &evs {
        let want = if e["principal"]["session"] == "c-status" {
            serde_json::json!(["user=65534", "cap=net_bind_service", "no-seccomp"])
        } else {
            serde_json::json!([])
        };
        assert_eq!(e["principal"]["opt_outs"], want, "{e}");
    }
    let lines = corral(&spec, &["events", "--identity", ID])?;
    assert!(
        text(&lines.stdout).contains(&format!(
            "{ID} [opt-out user=65534,cap=net_bind_service,no-seccomp]"
        )),
        "{}",
        text(&lines.stdout)
    );
    Ok(())
}

#[test]
fn bad_opt_outs_fail_closed_before_anything_runs() -> anyhow::Result<()> {
    let Some((spec, _agent)) = agent("contain-bad")? else {
        return Ok(());
    };
    let marker = spec.dir.join("ran");
    let touch = format!("touch {}", marker.display());
    for (flags, message) in [
        (
            &["--cap", "net_bind"][..],
            "corral run: --cap net_bind: not a capability",
        ),
        (
            &["--user", "no-such-user-corral"][..],
            "corral run: --user no-such-user-corral: no such user",
        ),
    ] {
        let out = run(&spec, "c-bad", flags, &["sh", "-c", &touch])?;
        assert_eq!(out.status.code(), Some(126), "{flags:?}");
        assert!(
            text(&out.stderr).starts_with(message),
            "{flags:?}: {}",
            text(&out.stderr)
        );
        assert!(!marker.exists(), "{flags:?}: CMD must not run");
    }
    // Nothing was enrolled for them.
    std::thread::sleep(Duration::from_millis(100));
    let s = status(&spec)?;
    assert!(
        !s["principals"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["session"] == "c-bad")),
        "{s}"
    );
    Ok(())
}
