//! When the kernel wakes the event reader, against the real kernel and ring buffer: a deny at
//! once (a burst of denies: once per CPU and millisecond); allow events only once a quarter of the ring is unread (below that the reader drains
//! on its own timer, every 20 ms in the agent), so a principal's allowed calls do not each
//! cost an interrupt.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use corral_agent::ebpf::{
    Enforcer,
    events::{Event, EventReader, Verdict},
};
use corral_tests::{
    Outcome, TestCgroup,
    build::{policy, set},
    privileged, probe_in,
};

/// How long a reader sleeping in poll() on `fd` (timeout `timeout`) takes to return while
/// `produce` runs 100 ms into its sleep.
fn poll_while(
    fd: RawFd,
    timeout: Duration,
    produce: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let sleeper = std::thread::spawn(move || {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let start = Instant::now();
        // SAFETY: one valid pollfd; the ring buffer's fd outlives the thread (joined below).
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        (n, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    produce()?;
    let (n, took) = sleeper
        .join()
        .map_err(|_| anyhow::anyhow!("poll thread panicked"))?;
    anyhow::ensure!(
        n == 1,
        "poll returned {n}: the ring must be readable by then"
    );
    Ok(took)
}

#[test]
fn denies_wake_the_reader_and_allows_wait_for_a_quarter_of_the_ring() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let cg = TestCgroup::new("wakeup")?;
    let mut e = Enforcer::load_and_attach(&cg.root)?;
    e.maps().add_principal(cg.id()?, cg.level(), 4, Some(0))?;
    e.maps().apply(
        &set(
            1,
            vec![
                policy("wakeup")
                    .zone("local", &["127.0.0.0/8"])
                    .allow(&["local"], &[9], &[])
                    .build(),
            ],
        ),
        |_, _| Some(0),
    )?;
    let mut reader = EventReader::take(e.maps())?;
    let fd = reader.ring().as_fd().as_raw_fd();
    let mut events = Vec::new();

    // One allowed connect: its event is in the ring, but nothing wakes the sleeping reader; it
    // sees the event when its own timeout ends.
    let took = poll_while(fd, Duration::from_secs(1), || {
        assert_eq!(probe_in(&cg.path, &["udp:127.0.0.1:9"])?, [Outcome::Ok]);
        Ok(())
    })?;
    println!("allow: the reader returned after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "an allow woke the reader after {took:?}"
    );
    reader.drain_all(&mut events);
    assert_eq!(events.len(), 1);
    assert!(matches!(&events[0], Event::Connect(c) if c.header.verdict == Verdict::Allow));

    // A denied connect wakes it at once (long before its 10 s timeout).
    let one_deny = |what: &str| -> anyhow::Result<()> {
        let took = poll_while(fd, Duration::from_secs(10), || {
            assert_eq!(
                probe_in(&cg.path, &["udp:127.0.0.1:10"])?,
                [Outcome::Errno("EPERM".into())]
            );
            Ok(())
        })?;
        println!("{what}: the reader returned after {took:?}");
        assert!(
            took < Duration::from_secs(5),
            "{what} did not wake the reader ({took:?})"
        );
        Ok(())
    };
    events.clear();
    one_deny("a deny")?;
    reader.drain_all(&mut events);
    assert_eq!(events.len(), 1);
    assert!(matches!(&events[0], Event::Connect(c) if c.header.verdict == Verdict::Deny));

    // A burst of denies: the first wakes the reader, the rest (within 1 ms of it, on that CPU)
    // do not each interrupt it, and none is lost.
    events.clear();
    let took = poll_while(fd, Duration::from_secs(10), || {
        probe_in(&cg.path, &["repeat:2000:udp:127.0.0.1:10"]).map(drop)
    })?;
    println!("2000 denies: the reader returned after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "a burst of denies did not wake the reader"
    );
    std::thread::sleep(Duration::from_millis(50));
    reader.drain_all(&mut events);
    assert_eq!(events.len(), 2000);
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::Connect(c) if c.header.verdict == Verdict::Deny))
    );
    // Later, a single deny wakes it at once again.
    events.clear();
    one_deny("a later deny")?;
    reader.drain_all(&mut events);
    assert_eq!(events.len(), 1);

    // Allowed connects filling a quarter of the 1 MiB ring (~104 bytes each) wake it.
    events.clear();
    let took = poll_while(fd, Duration::from_secs(10), || {
        probe_in(&cg.path, &["repeat:4000:udp:127.0.0.1:9"]).map(drop)
    })?;
    println!("4000 allows: the reader returned after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "a quarter of the ring did not wake the reader ({took:?})"
    );
    reader.drain_all(&mut events);
    assert_eq!(events.len(), 4000);
    assert_eq!(e.maps().kernel_drops()?, 0);
    Ok(())
}
