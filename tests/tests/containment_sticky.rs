//! Containment: attribution is sticky. A process of a principal (root here) that moves itself
//! to the cgroup v2 root is still the principal's, and so is a child it forks that moves out
//! before it makes any hooked call, and so is a thread left running after its thread-group
//! leader exited. Exited processes leave no attribution behind (pids are reused). The
//! un-enrolled fast path (a per-CPU memory of cgroups in no principal, a mark per sticky pid)
//! opens none of these ways out.

use agent_common::{HOOK_SOCK_CREATE, PROTO_TCP};
use corral_agent::{
    cgroup,
    ebpf::{
        Enforcer,
        events::{Event, EventReader, Reason, Verdict},
    },
};
use corral_tests::{
    Listener, Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_in, probe_outside,
};

/// Loopback TCP to `port` denied: a principal's connect must fail wherever it goes.
fn deny_loopback(port: u16) -> corral_policy::compiled::CompiledSet {
    set(
        1,
        vec![
            policy("deny-loopback")
                .zone("local", &["127.0.0.0/8"])
                .deny(&["local"], &[port], &[PROTO_TCP])
                .allow_all_exec()
                .build(),
        ],
    )
}

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
    e.maps().apply(&deny_loopback(l.port), |_, _| Some(0))?;
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
    // Inside, the connect is denied; outside every principal's cgroup the socket itself is
    // refused (it would run no packet program: see agent-ebpf/src/scope.rs).
    let mut all = Vec::new();
    reader.drain_all(&mut all);
    let mut headers = Vec::new();
    for ev in &all {
        match ev {
            Event::Connect(c) => headers.push(("connect", c.header.clone())),
            Event::Socket(s) if s.hook == HOOK_SOCK_CREATE => {
                headers.push(("socket", s.header.clone()))
            }
            _ => {}
        }
    }
    assert_eq!(
        headers.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        ["connect", "socket", "socket"],
        "{all:#?}"
    );
    for (_, h) in &headers {
        assert_eq!(
            (h.verdict, h.principal, h.cgroup_id),
            (Verdict::Deny, 21, cg.id()?),
            "attributed to the principal's cgroup: {h:?}"
        );
    }
    assert_eq!(headers[1].1.reason, Reason::Containment);
    // The child is a different process from the parent.
    assert_ne!(headers[1].1.pid, headers[2].1.pid);

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
    e.maps().apply(&deny_loopback(l.port), |_, _| Some(0))?;
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

/// Runs this test's thread, and the processes it starts, on CPU 0 only: the un-enrolled
/// cache is per CPU, so what one probe left there is what the next one finds.
fn pin_to_cpu0() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity(0 = this thread) only
    // read and write the set passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        anyhow::ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The un-enrolled fast path remembers, per CPU, the cgroups it found in no principal. A
/// principal's process that moves into a remembered cgroup is still the principal's (its
/// sticky mark), and a remembered cgroup that gets a principal above it, or becomes one, is
/// policed from the next call (the principals' generation).
#[test]
fn a_cgroup_remembered_as_unenrolled_gives_no_way_out() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    pin_to_cpu0()?;
    let l = Listener::tcp("127.0.0.1:0")?;
    let tcp = format!("tcp:127.0.0.1:{}", l.port);
    let p = TestCgroup::new("unenr-principal")?;
    let outer = TestCgroup::new("unenr-outer")?;
    let inner = outer.path.join("inner");
    cgroup::create(&inner)?;
    let alone = TestCgroup::new("unenr-alone")?;
    let mut e = Enforcer::load_and_attach(&p.root)?;
    e.maps().add_principal(p.id()?, p.level(), 31, Some(0))?;
    e.maps().apply(&deny_loopback(l.port), |_, _| Some(0))?;
    // Un-enrolled, and remembered as such (the second call is answered from the cache).
    assert_eq!(probe_in(&inner, &[&tcp, &tcp])?, [Outcome::Ok, Outcome::Ok]);
    assert_eq!(probe_in(&alone.path, &[&tcp])?, [Outcome::Ok]);

    let into_inner = format!("movecg:{}", inner.display());
    assert_eq!(
        probe_in(&p.path, &[&tcp, &into_inner, &tcp])?,
        [Outcome::eperm(), Outcome::Ok, Outcome::eperm()],
        "a principal's process moved into a remembered cgroup"
    );
    assert_eq!(
        probe_in(&p.path, &[&format!("forkout:{}={tcp}", inner.display())])?,
        [Outcome::eperm()],
        "its child moved into a remembered cgroup before any call"
    );

    // A principal above the remembered cgroup, and the remembered cgroup itself enrolled.
    e.maps()
        .add_principal(outer.id()?, outer.level(), 32, Some(0))?;
    assert_eq!(
        probe_in(&inner, &[&tcp])?,
        [Outcome::eperm()],
        "an ancestor became a principal"
    );
    e.maps()
        .add_principal(alone.id()?, alone.level(), 33, Some(0))?;
    assert_eq!(
        probe_in(&alone.path, &[&tcp])?,
        [Outcome::eperm()],
        "the cgroup itself became a principal"
    );
    Ok(())
}
