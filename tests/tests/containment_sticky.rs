//! Containment: attribution is sticky. A process of a principal (root here) that moves itself
//! to the cgroup v2 root is still the principal's, and so is a child it forks that moves out
//! before it makes any hooked call, and so is a thread left running after its thread-group
//! leader exited. Exited processes leave no attribution behind (pids are reused).

use agent_common::PROTO_TCP;
use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, Verdict},
};
use corral_tests::{
    Listener, Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_in, probe_outside,
};

#[test]
fn leaving_the_cgroup_changes_nothing_for_a_process_or_its_children() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let l = Listener::tcp("127.0.0.1:0")?;
    let cg = TestCgroup::new("contain-sticky")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 21, Some(0))?;
    // Loopback denied (default deny, no rules): the probe's connect must fail wherever it goes.
    e.maps().apply(
        &set(
            1,
            vec![
                policy("sticky")
                    .zone("local", &["127.0.0.0/8"])
                    .deny(&["local"], &[l.port], &[PROTO_TCP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let mut reader = EventReader::take(e.maps())?;
    let root = cg.root.display().to_string();
    let tcp = format!("tcp:127.0.0.1:{}", l.port);
    let got = probe_in(
        &cg.path,
        &[
            &tcp,
            &format!("movecg:{root}"),
            &tcp,
            &format!("forkout:{root}={tcp}"),
        ],
    )?;
    assert_eq!(
        got,
        vec![
            Outcome::eperm(),
            Outcome::Ok,
            Outcome::eperm(),
            Outcome::eperm()
        ],
        "denied inside, after moving to the root cgroup, and in a forked child that moved out"
    );
    let events = reader.drain_connects();
    assert_eq!(events.len(), 3, "{events:#?}");
    for ev in &events {
        assert_eq!(
            (ev.header.verdict, ev.header.principal, ev.header.cgroup_id),
            (Verdict::Deny, 21, cg.id()?),
            "attributed to the principal's cgroup: {ev:?}"
        );
    }
    // The child is a different process from the parent.
    assert_ne!(events[1].header.pid, events[2].header.pid);

    // Both processes have exited: their entries are gone (a reused pid is nobody's).
    assert_eq!(
        e.maps().sticky(),
        vec![],
        "no sticky entry outlives its process"
    );
    // Outside, unaffected.
    assert_eq!(probe_outside(&[&tcp])?, vec![Outcome::Ok]);
    Ok(())
}

/// Issue 14 residual: the sticky entry is keyed by the tgid and used to go when the leader
/// thread exited, so a process whose main thread exits first (`pthread_exit`) could move its
/// remaining thread to the root cgroup and be nobody's. On kernels with `group_dead` in
/// `sched_process_exit` (6.16+) the entry now lives until the whole thread group is dead.
#[test]
fn a_thread_outliving_its_leader_stays_the_principals() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let has_group_dead = std::fs::read_to_string(
        corral_agent::paths::ensure_tracefs()?.join("events/sched/sched_process_exit/format"),
    )?
    .contains(" group_dead;");
    if !has_group_dead {
        println!("SKIP: this kernel's sched_process_exit has no group_dead (before 6.16)");
        return Ok(());
    }
    let l = Listener::tcp("127.0.0.1:0")?;
    let cg = TestCgroup::new("contain-leader")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 22, Some(0))?;
    e.maps().apply(
        &set(
            1,
            vec![
                policy("leader")
                    .zone("local", &["127.0.0.0/8"])
                    .deny(&["local"], &[l.port], &[PROTO_TCP])
                    .allow_all_exec()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let root = cg.root.display().to_string();
    let tcp = format!("tcp:127.0.0.1:{}", l.port);
    let got = probe_in(&cg.path, &[&tcp, &format!("leaderout:{root}={tcp}")])?;
    assert_eq!(
        got,
        vec![Outcome::eperm(), Outcome::eperm()],
        "denied inside, and in the thread that outlived its leader and moved to the root"
    );
    assert_eq!(e.maps().sticky(), vec![], "the dead group left no entry");
    assert_eq!(probe_outside(&[&tcp])?, vec![Outcome::Ok]);
    Ok(())
}
