//! `#!` scripts: a script is decided on its own file and on its interpreter, on whichever exec
//! path this kernel offers. On the LSM path `bprm_check_security` runs for both levels; on the
//! tracepoint fallback (this machine) the program finds the script's file among the task's
//! pending deferred `fput`s (see `agent_common::exec`).
//!
//! Each script would create its marker file with a shell builtin (`: > "$1"`), so "never ran"
//! is the marker's absence, with nothing else exec'd.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use corral_agent::ebpf::{
    ExecMode,
    events::{ExecDecision, Reason, Verdict},
    exec::identity,
};
use corral_policy::compiled::Action;
use corral_tests::{TestCgroup, build, privileged};

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod exec_util;

use agent_common::{
    EXEC_F_BY_INTERPRETER, EXEC_F_NO_SCRIPT_IDENTITY, EXEC_F_SCRIPT, EXEC_HOOK_TRACEPOINT,
};
use exec_util::{
    Ended, TempDir, assert_denied, assert_ran, event_for, exec_rule, s, setup, spawn_in,
};

/// Writes an executable `#!interp` script at `rel` that creates the file named by `$1`.
fn script(dir: &TempDir, rel: &str, interp: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.path(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&p, format!("#!{interp}\n: > \"$1\"\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// Runs `path marker` in the test cgroup; returns how it ended and whether the marker exists.
fn run(
    cg: &TestCgroup,
    dir: &TempDir,
    path: &str,
    cwd: Option<&Path>,
    name: &str,
) -> anyhow::Result<(Ended, bool)> {
    let marker = dir.path(&format!("marker-{name}"));
    let got = spawn_in(cg, cwd, path, &[&s(&marker)])?;
    Ok((got, marker.exists()))
}

/// The tracepoint event of a script exec: the script's path, the deciding file's identity,
/// the script flags.
fn assert_script_event(
    mode: ExecMode,
    e: &ExecDecision,
    path: &str,
    file: &Path,
    by_interpreter: bool,
) -> anyhow::Result<()> {
    if mode != ExecMode::Tracepoint || e.hook != EXEC_HOOK_TRACEPOINT {
        return Ok(());
    }
    assert_eq!(e.path, path, "the event names the script as exec'd");
    let (dev, ino, _) = identity(file)?;
    assert_eq!(e.file, Some((dev, ino)), "identity of {}", file.display());
    assert_ne!(e.flags & EXEC_F_SCRIPT, 0, "flags {:#x}", e.flags);
    assert_eq!(
        e.flags & EXEC_F_NO_SCRIPT_IDENTITY,
        0,
        "flags {:#x}",
        e.flags
    );
    assert_eq!(
        e.flags & EXEC_F_BY_INTERPRETER != 0,
        by_interpreter,
        "flags {:#x}",
        e.flags
    );
    Ok(())
}

#[test]
fn denied_script_never_runs_although_its_interpreter_is_allowed() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = TempDir::new("script-deny")?;
    let denied = script(&dir, "denied.sh", "/bin/sh")?;
    let link = dir.path("link.sh");
    std::os::unix::fs::symlink(&denied, &link)?;
    let in_prefix = script(&dir, "denied-dir/sub/tool.sh", "/bin/sh")?;
    let allowed = script(&dir, "allowed.sh", "/bin/sh")?;
    let sh_copy = dir.copy("/bin/sh", "bin/denied-sh")?;
    let by_denied_sh = script(&dir, "via-denied-sh.sh", &s(&sh_copy))?;

    let cg = TestCgroup::new("exec-script-deny")?;
    let policy = build::policy("exec-script-deny").default_allow().build();
    let rules = vec![
        // The interpreter is explicitly allowed: the scripts below are denied on their own.
        exec_rule(0, Action::Allow, &[Path::new("/bin/sh")], &[]),
        exec_rule(1, Action::Deny, &[&denied], &[]),
        exec_rule(2, Action::Deny, &[], &[&dir.path("denied-dir")]),
        exec_rule(3, Action::Allow, &[&allowed, &by_denied_sh], &[]),
        exec_rule(4, Action::Deny, &[&sh_copy], &[]),
    ];
    let mut st = setup(&cg, 31, Some((policy, rules)))?;
    let mode = st.enforcer.exec_mode();
    println!(
        "mode {mode}; script lookup on the tracepoint: {}",
        st.enforcer.maps().exec().script_lookup()
    );

    let cases: [(&str, String, Option<&Path>); 4] = [
        ("denied by exact path", s(&denied), None),
        ("through a symlink", s(&link), None),
        (
            "by relative path",
            "./denied.sh".into(),
            Some(dir.0.as_path()),
        ),
        ("under a denied /dir/** prefix", s(&in_prefix), None),
    ];
    let mut denied_pids = Vec::new();
    for (i, (what, path, cwd)) in cases.iter().enumerate() {
        let (got, ran) = run(&cg, &dir, path, *cwd, &format!("d{i}"))?;
        assert_denied(mode, &got, what);
        assert!(!ran, "{what}: the denied script ran");
        denied_pids.push((*what, got.pid(), path.clone()));
    }

    // Exec'd from an image that was itself exec'd (the previous image's files are released
    // during this exec too): still decided on the script.
    let launcher = dir.copy("/usr/bin/env", "launcher")?;
    let marker = dir.path("marker-launched");
    let got_launched = spawn_in(&cg, None, &s(&launcher), &[&s(&denied), &s(&marker)])?;
    assert_denied(mode, &got_launched, "denied script exec'd by env");
    assert!(!marker.exists(), "the denied script ran when exec'd by env");

    let (got_allowed, ran) = run(&cg, &dir, &s(&allowed), None, "allowed")?;
    assert_ran(&got_allowed, "allowed script");
    assert!(ran, "the allowed script created its marker");

    let (got_interp, ran) = run(&cg, &dir, &s(&by_denied_sh), None, "interp")?;
    assert_denied(mode, &got_interp, "allowed script, denied interpreter");
    assert!(!ran, "a denied interpreter ran an allowed script");

    let events = st.exec_events();
    for (what, pid, path) in &denied_pids {
        let Some(pid) = pid else { continue };
        let e = event_for(&events, *pid)?;
        let rule = if what.contains("prefix") { 2 } else { 1 };
        assert_eq!(
            (
                e.header.verdict,
                e.header.reason,
                e.header.rule,
                e.header.principal
            ),
            (Verdict::Deny, Reason::Rule, Some(rule), 31),
            "{what}"
        );
        let file = if rule == 2 { &in_prefix } else { &denied };
        assert_script_event(mode, &e, path, file, false)?;
    }
    if mode == ExecMode::Tracepoint {
        let pid = got_launched.pid().context("pid")?;
        let e = events
            .iter()
            .find(|e| e.header.pid == pid && e.path == s(&denied))
            .with_context(|| format!("no event for the script exec'd by env: {events:#?}"))?;
        assert_eq!((e.header.verdict, e.header.rule), (Verdict::Deny, Some(1)));
        assert_script_event(mode, e, &s(&denied), &denied, false)?;
        // The launcher itself is a plain binary: no script flags, its own identity.
        let e = events
            .iter()
            .find(|e| e.header.pid == pid && e.path == s(&launcher))
            .with_context(|| format!("no event for the launcher: {events:#?}"))?;
        assert_eq!(e.flags & (EXEC_F_SCRIPT | EXEC_F_BY_INTERPRETER), 0);
        assert_eq!(e.file, Some(identity(&launcher).map(|(d, i, _)| (d, i))?));
    }
    let e = event_for(&events, got_allowed.pid().context("pid")?)?;
    assert_eq!(
        (e.header.verdict, e.header.reason, e.header.rule),
        (Verdict::Allow, Reason::Rule, Some(3)),
        "the allowed script's own rule decides"
    );
    assert_script_event(mode, &e, &s(&allowed), &allowed, false)?;
    if let Some(pid) = got_interp.pid() {
        let e = event_for(&events, pid)?;
        assert_eq!(
            (e.header.verdict, e.header.reason, e.header.rule),
            (Verdict::Deny, Reason::Rule, Some(4)),
            "the interpreter's deny rule decides"
        );
        assert_script_event(mode, &e, &s(&by_denied_sh), &sh_copy, true)?;
    }
    Ok(())
}

#[test]
fn default_deny_runs_a_script_only_when_script_and_interpreter_are_allowed() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = TempDir::new("script-allow")?;
    let allowed = script(&dir, "tools/allowed.sh", "/bin/sh")?;
    let other = script(&dir, "other.sh", "/bin/sh")?;
    let sh_copy = dir.copy("/bin/sh", "bin/sh")?;
    let by_unlisted_sh = script(&dir, "tools/via-copy.sh", &s(&sh_copy))?;

    let cg = TestCgroup::new("exec-script-allow")?;
    let policy = build::policy("exec-script-allow").build();
    let rules = vec![
        exec_rule(0, Action::Allow, &[Path::new("/bin/sh")], &[]),
        exec_rule(1, Action::Allow, &[], &[&dir.path("tools")]),
    ];
    let mut st = setup(&cg, 32, Some((policy, rules)))?;
    let mode = st.enforcer.exec_mode();

    let (got, ran) = run(&cg, &dir, &s(&allowed), None, "allowed")?;
    assert_ran(&got, "script under an allowed prefix, allowed interpreter");
    assert!(ran);

    let (got_other, ran) = run(&cg, &dir, &s(&other), None, "other")?;
    assert_denied(mode, &got_other, "script not allowed, interpreter allowed");
    assert!(!ran, "a script with no allow rule ran under default deny");

    let (got_copy, ran) = run(&cg, &dir, &s(&by_unlisted_sh), None, "copy")?;
    assert_denied(mode, &got_copy, "allowed script, interpreter not allowed");
    assert!(!ran);

    let events = st.exec_events();
    let e = event_for(&events, got.pid().context("pid")?)?;
    assert_eq!(
        (e.header.verdict, e.header.reason, e.header.rule),
        (Verdict::Allow, Reason::Rule, Some(1))
    );
    assert_script_event(mode, &e, &s(&allowed), &allowed, false)?;
    if let Some(pid) = got_other.pid() {
        let e = event_for(&events, pid)?;
        assert_eq!(
            (e.header.verdict, e.header.reason, e.header.rule),
            (Verdict::Deny, Reason::Default, None)
        );
        assert_script_event(mode, &e, &s(&other), &other, false)?;
    }
    if let Some(pid) = got_copy.pid() {
        let e = event_for(&events, pid)?;
        assert_eq!(
            (e.header.verdict, e.header.reason, e.header.rule),
            (Verdict::Deny, Reason::Default, None)
        );
        assert_script_event(mode, &e, &s(&by_unlisted_sh), &sh_copy, true)?;
    }
    Ok(())
}
