//! A principal's life in the registry, with the real kernel maps and real processes in real
//! cgroups: it is removed (cgroup, kernel entry, session state) once its last process exited,
//! but not while another `corral run` of the same session is about to join it. Before that
//! was kept, a sweep between the second enrolment and its join removed the cgroup, and the
//! second command failed with "cannot join the principal's cgroup".

use std::{process::Command, sync::Arc};

use corral_agent::{
    daemon::{peer::pidfd_open, registry::Registry},
    ebpf::Enforcer,
};
use corral_tests::{TestCgroup, e2e::Reaped, privileged, probe_in};

const ID: &str = "spiffe://e2e.corral/agent/lifecycle";

#[test]
fn a_rejoined_session_keeps_its_cgroup_until_the_new_process_has_come_and_gone()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let base = TestCgroup::new("registry-rejoin")?;
    let mut e = Enforcer::load_and_attach(&base.root)?;
    let state = std::env::temp_dir().join(format!("corral-registry-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let reg = Registry::load(&base.root, &base.path, &state.join("principals.json"))?;

    // A session whose only process ran and exited is swept at once.
    let once = reg.enroll(ID, "once", &[], None, None, e.maps())?;
    probe_in(&once.cgroup, &[])?;
    let swept: Vec<u32> = reg.sweep(e.maps()).iter().map(|r| r.index).collect();
    assert_eq!(swept, [once.index], "an exited principal is removed");
    assert!(!once.cgroup.exists());

    // A session whose first process exited, enrolled again by a live process that has not
    // joined yet: its cgroup stays.
    let first = reg.enroll(ID, "again", &[], None, None, e.maps())?;
    probe_in(&first.cgroup, &[])?;
    let joiner = Reaped(Some(Command::new("sleep").arg("60").spawn()?));
    let pid = joiner.0.as_ref().map_or(0, |c| c.id());
    let pidfd = pidfd_open(i32::try_from(pid)?).map(Arc::new);
    anyhow::ensure!(pidfd.is_some(), "no pidfd for the joiner");
    let second = reg.enroll(ID, "again", &[], pidfd, None, e.maps())?;
    assert_eq!(second.index, first.index, "the same principal");
    assert!(
        reg.sweep(e.maps()).is_empty(),
        "swept while a process was about to join"
    );
    assert!(first.cgroup.exists());

    // It joins: populated, kept.
    std::fs::write(first.cgroup.join("cgroup.procs"), pid.to_string())?;
    assert!(reg.sweep(e.maps()).is_empty(), "swept with a process in it");
    // It exits: removed at the next sweep, with no grace left over.
    drop(joiner);
    let swept: Vec<u32> = reg.sweep(e.maps()).iter().map(|r| r.index).collect();
    assert_eq!(swept, [first.index], "removed once the joiner exited");
    assert!(!first.cgroup.exists());

    // A joiner that exits without joining leaves nothing behind either.
    let third = reg.enroll(ID, "gone", &[], None, None, e.maps())?;
    probe_in(&third.cgroup, &[])?;
    let mut quitter = Command::new("true").spawn()?;
    let pidfd = pidfd_open(i32::try_from(quitter.id())?).map(Arc::new);
    reg.enroll(ID, "gone", &[], pidfd, None, e.maps())?;
    quitter.wait()?;
    let swept: Vec<u32> = reg.sweep(e.maps()).iter().map(|r| r.index).collect();
    assert_eq!(swept, [third.index], "the joiner exited without joining");

    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
