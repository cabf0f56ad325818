//! Exec rule paths re-statted: a denied binary replaced on disk by a new inode (package
//! upgrade, `cp` + rename), a denied path created after the policy was written, and a denied
//! prefix directory replaced, are denied again once the exec maps are refreshed with what the
//! daemon's re-stat task runs every second (`ExecMaps::refresh_all`: `watched`, `resolve`
//! and `refresh` in one call). Before the refresh the new file escapes, which is the gap the
//! re-stat closes; the end-to-end test with the real agent is `e2e_exec_restat`.

use std::path::Path;

use corral_agent::ebpf::exec::identity;
use corral_policy::compiled::Action;
use corral_tests::{TestCgroup, build, privileged};

#[allow(
    dead_code,
    reason = "shared by several test binaries, each using a different subset"
)]
mod exec_util;

use exec_util::{TempDir, assert_denied, assert_ran, exec_rule, s, setup, spawn_in};

/// Replaces `path` with a fresh copy of `src` by rename: a new inode at the same path.
fn replace_by_rename(src: &str, path: &Path) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[test]
fn replaced_and_late_created_rule_paths_are_denied_after_a_restat() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = TempDir::new("restat")?;
    let bin = dir.copy("/usr/bin/touch", "x/bin")?;
    let later = dir.path("x/later");
    let prefix = dir.path("tools");
    let in_prefix = dir.copy("/usr/bin/touch", "tools/touch")?;
    let cg = TestCgroup::new("exec-restat")?;
    let policy = build::policy("exec-restat").default_allow().build();
    let rules = vec![
        exec_rule(0, Action::Deny, &[&bin, &later], &[]),
        exec_rule(1, Action::Deny, &[], &[&prefix]),
    ];
    let mut st = setup(&cg, 41, Some((policy, rules)))?;
    let mode = st.enforcer.exec_mode();
    let exec = |path: &Path, name: &str| {
        let marker = dir.path(&format!("marker-{name}"));
        spawn_in(&cg, None, &s(path), &[&s(&marker)]).map(|got| (got, marker.exists()))
    };

    let (got, ran) = exec(&bin, "original")?;
    assert_denied(mode, &got, "the original denied binary");
    assert!(!ran);
    assert_eq!(
        st.enforcer.maps().exec().refresh_all()?,
        0,
        "nothing changed on disk: no map update"
    );

    // Replace the binary (new inode), create the missing path, replace the prefix directory.
    let (_, old_ino, _) = identity(&bin)?;
    replace_by_rename("/usr/bin/touch", &bin)?;
    assert_ne!(
        identity(&bin)?.1,
        old_ino,
        "rename gave the path a new inode"
    );
    std::fs::copy("/usr/bin/touch", &later)?;
    let staged = dir.path("tools.new");
    std::fs::create_dir_all(&staged)?;
    std::fs::copy("/usr/bin/touch", staged.join("touch"))?;
    std::fs::remove_dir_all(&prefix)?;
    std::fs::rename(&staged, &prefix)?;
    assert_eq!(s(&in_prefix), s(&prefix.join("touch")));

    // The gap: until the identities are re-statted, the new files are not the denied ones.
    let (got, ran) = exec(&bin, "replaced-before")?;
    assert_ran(
        &got,
        "replaced binary before the re-stat (the old identity is denied)",
    );
    assert!(ran);

    // (How many entries change depends on inode reuse: `later` may get the binary's freed
    // inode number, which is already denied by the same rule.)
    let changed = st.enforcer.maps().exec().refresh_all()?;
    assert!(changed > 0, "identities changed on disk");
    for (path, what) in [
        (&bin, "binary replaced by rename"),
        (&later, "path created after the policy was written"),
        (&in_prefix, "file in a replaced prefix directory"),
    ] {
        let (got, ran) = exec(path, &what.replace(' ', "-"))?;
        assert_denied(mode, &got, what);
        assert!(!ran, "{what}: ran after the re-stat");
    }
    assert_eq!(st.enforcer.maps().exec().refresh_all()?, 0, "stable again");

    // A re-applied policy replaces what is watched: the old rules are no longer refreshed.
    st.enforcer.maps().apply(
        &build::set(
            2,
            vec![build::policy("exec-restat").default_allow().build()],
        ),
        |_, _| Some(0),
    )?;
    assert!(st.enforcer.maps().exec().watched().is_empty());
    let (got, ran) = exec(&bin, "after-reapply")?;
    assert_ran(&got, "no exec rules after the re-apply");
    assert!(ran);
    Ok(())
}

#[test]
fn a_denied_binary_moved_or_relinked_away_from_its_rule_path_stays_denied() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let dir = TempDir::new("restat-move")?;
    let moved = dir.copy("/usr/bin/touch", "x/moved")?;
    let linked = dir.copy("/usr/bin/touch", "x/linked")?;
    let cg = TestCgroup::new("exec-restat-move")?;
    let policy = build::policy("exec-restat-move").default_allow().build();
    let rules = vec![exec_rule(0, Action::Deny, &[&moved, &linked], &[])];
    let mut st = setup(&cg, 42, Some((policy, rules)))?;
    let mode = st.enforcer.exec_mode();
    assert_eq!(st.enforcer.maps().exec().held(), 2);

    // Escape attempts: rename the file away; hard-link it elsewhere and remove the rule path.
    let away = dir.path("away");
    std::fs::rename(&moved, &away)?;
    let hard = dir.path("hard");
    std::fs::hard_link(&linked, &hard)?;
    std::fs::remove_file(&linked)?;
    st.enforcer.maps().exec().refresh_all()?;
    for (path, what) in [
        (&away, "renamed away"),
        (&hard, "hard link, rule path removed"),
    ] {
        let marker = dir.path(&format!("marker-{}", what.replace(' ', "-")));
        let got = spawn_in(&cg, None, &s(path), &[&s(&marker)])?;
        assert_denied(mode, &got, what);
        assert!(!marker.exists(), "{what}: escaped the deny");
    }
    // A new file at a rule path is denied too, next to the held old identities.
    let fresh = dir.copy("/usr/bin/touch", "x/moved")?;
    st.enforcer.maps().exec().refresh_all()?;
    let marker = dir.path("marker-fresh");
    let got = spawn_in(&cg, None, &s(&fresh), &[&s(&marker)])?;
    assert_denied(mode, &got, "new file at the rule path");
    assert!(!marker.exists());
    assert_eq!(st.enforcer.maps().exec().held(), 3);
    // Once the last link of a held identity is gone, it is let go.
    std::fs::remove_file(&away)?;
    st.enforcer.maps().exec().refresh_all()?;
    assert_eq!(st.enforcer.maps().exec().held(), 2);
    Ok(())
}
