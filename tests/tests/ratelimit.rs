//! In-kernel rate limiting of allow events, per principal, against the real kernel: suppressed
//! allow events are counted and carried on the principal's next event, so
//! delivered + suppressed + kernel drops == generated still holds; deny events are never
//! limited.

use corral_agent::ebpf::{
    Enforcer,
    events::{EventReader, KernelEvent, Verdict},
};
use corral_tests::{
    TestCgroup,
    build::{policy, set},
    privileged, probe_in,
};

/// `repeat` prints `ok=<n> <ERR>=<n>...`; the count for `key`.
fn count(line: &corral_tests::Outcome, key: &str) -> u64 {
    let corral_tests::Outcome::Errno(s) = line else {
        return 0;
    };
    s.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn allow_events_are_rate_limited_and_every_one_is_accounted() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("ratelimit")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 5, Some(0))?;
    e.maps().apply(
        &set(
            1,
            vec![
                policy("rl")
                    .zone("local", &["127.0.0.0/8"])
                    .deny(&["local"], &[7], &[])
                    .default_allow()
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    // 50 allow events per second, bursts of 5.
    e.maps().set_allow_rate(50, 5)?;
    let mut reader = EventReader::take(e.maps())?;

    let allowed_calls: u64 = 20_000;
    let denied_calls: u64 = 3_000;
    let t0 = std::time::Instant::now();
    let out = probe_in(
        &cg.path,
        &[
            &format!("repeat:{allowed_calls}:udp:127.0.0.1:9"),
            &format!("repeat:{denied_calls}:udp:127.0.0.1:7"),
        ],
    )?;
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(count(&out[0], "ok"), allowed_calls, "{out:?}");
    assert_eq!(count(&out[1], "EPERM"), denied_calls, "{out:?}");

    let mut events = Vec::new();
    reader.drain(&mut events);
    let drops = e.maps().kernel_drops()?;
    let (mut allow, mut deny, mut suppressed) = (0u64, 0u64, 0u64);
    for ev in &events {
        let KernelEvent::Connect(c) = ev;
        suppressed += u64::from(c.header.suppressed);
        match c.header.verdict {
            Verdict::Allow => allow += 1,
            Verdict::Deny => deny += 1,
            Verdict::AuditDeny => {}
        }
    }
    let pending = e.maps().suppressed_pending();
    println!(
        "{allowed_calls} allowed calls in {secs:.3} s: {allow} allow events delivered, \
         {suppressed} suppressed (carried), {pending} pending, {drops} dropped in kernel; \
         {deny} of {denied_calls} deny events"
    );
    assert_eq!(deny, denied_calls, "deny events are never rate-limited");
    assert_eq!(drops, 0, "nothing here overflows the ring");
    assert!(
        allow * 10 < allowed_calls,
        "rate-limited: far fewer allow events ({allow}) than calls ({allowed_calls})"
    );
    // Burst, plus the rate over the time the calls took (generous slack for timing).
    let bound = 5 + (50.0 * (secs + 1.0)) as u64;
    assert!(allow <= bound, "{allow} allow events > bound {bound}");
    assert_eq!(
        pending, 0,
        "the deny events that followed carried every suppressed count"
    );
    assert_eq!(
        allow + suppressed + drops,
        allowed_calls,
        "delivered + suppressed + kernel drops == generated"
    );
    let seqs: Vec<u64> = events.iter().map(KernelEvent::seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    // Rate 0 lifts the limit: every allow event is delivered again.
    e.maps().set_allow_rate(0, 0)?;
    let out = probe_in(&cg.path, &["repeat:500:udp:127.0.0.1:9"])?;
    assert_eq!(count(&out[0], "ok"), 500);
    let mut events = Vec::new();
    reader.drain(&mut events);
    assert_eq!(events.len(), 500);
    assert!(events.iter().all(|ev| {
        let KernelEvent::Connect(c) = ev;
        c.header.suppressed == 0 && c.header.verdict == Verdict::Allow
    }));
    Ok(())
}
