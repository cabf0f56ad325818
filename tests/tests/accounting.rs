//! Event accounting and atomic policy swap, against the real kernel.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, KernelEvent},
};
use corral_tests::{
    TestCgroup,
    build::{policy, set},
    privileged, probe_bin, probe_in,
};

#[test]
fn flooded_ring_buffer_loses_nothing_silently() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("flood")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 3, Some(0))?;
    e.maps().apply(
        &set(1, vec![policy("flood").default_allow().build()]),
        |_, _| Some(0),
    )?;
    // Each connect is one allow event of ~104 bytes in the ring; 30k of them overflow the
    // 1 MiB ring buffer while nobody reads.
    let generated: u64 = 30_000;
    let got = probe_in(&cg.path, &[&format!("repeat:{generated}:udp:127.0.0.1:9")])?;
    assert_eq!(got.len(), 1);

    let drops = e.maps().kernel_drops()?;
    let mut reader = EventReader::take(e.maps())?;
    let mut events = Vec::new();
    reader.drain(&mut events);
    let seqs: Vec<u64> = events.iter().map(KernelEvent::seq).collect();
    let delivered = seqs.len() as u64;
    println!("generated {generated}, delivered {delivered}, dropped in kernel {drops}");
    assert!(drops > 0, "the test must overflow the ring buffer");
    assert_eq!(
        delivered + drops,
        generated,
        "delivered + counted drops == generated"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers strictly increase"
    );
    assert!(seqs.iter().all(|s| (1..=generated).contains(s)));
    assert_eq!(reader.undecodable, 0);
    Ok(())
}

#[test]
fn policy_swap_is_atomic_under_concurrent_connects() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("swap")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 9, Some(0))?;
    // Two policies with the same meaning but different layouts: the zone index of `local`
    // and the rule indices differ. Any mix of the two (new zones with old rules, or new rules
    // without their zones) denies the allowed port.
    let a = set(
        1,
        vec![
            policy("a")
                .zone("local", &["127.0.0.0/8"])
                .allow(&["local"], &[7001], &[])
                .build(),
        ],
    );
    let b = set(
        2,
        vec![
            policy("b")
                .zone("other", &["10.0.0.0/8"])
                .zone("local", &["127.0.0.0/8"])
                .deny(&["other"], &[], &[])
                .allow(&["local"], &[7001], &[])
                .build(),
        ],
    );
    e.maps().apply(&a, |_, _| Some(0))?;

    let stop = std::env::temp_dir().join(format!("corral-swap-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let spawn = |op: &str| {
        Command::new(probe_bin()?)
            .arg("--cgroup")
            .arg(&cg.path)
            .arg(format!("until:{}:{op}", stop.display()))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(anyhow::Error::from)
    };
    let allowed = spawn("udp:127.0.0.1:7001")?;
    let denied = spawn("udp:127.0.0.1:7002")?;
    std::thread::sleep(Duration::from_millis(50));
    let swaps = 200;
    for i in 0..swaps {
        e.maps()
            .apply(if i % 2 == 0 { &b } else { &a }, |_, _| Some(0))?;
    }
    std::fs::write(&stop, b"")?;
    let allowed = String::from_utf8(allowed.wait_with_output()?.stdout)?;
    let denied = String::from_utf8(denied.wait_with_output()?.stdout)?;
    let _ = std::fs::remove_file(&stop);
    println!(
        "{swaps} swaps; allowed port: {}; denied port: {}",
        allowed.trim(),
        denied.trim()
    );
    assert!(
        allowed.trim().starts_with("ok=") && !allowed.contains("EPERM"),
        "a connect allowed by both policies was denied during a swap: {allowed}"
    );
    assert!(
        denied.trim().starts_with("EPERM=") && !denied.contains("ok="),
        "a connect denied by both policies was allowed during a swap: {denied}"
    );
    Ok(())
}
