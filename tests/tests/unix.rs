//! Unix-socket destinations: the cgroup `connect_unix`/`sendmsg_unix` programs (kernel 6.7+)
//! in the real kernel deny a real process's connect()/sendto() on an AF_UNIX socket with
//! EPERM by zone, record the path, zone and hook in the event, leave other processes alone,
//! and (pinned) keep enforcing after the process that attached them is gone. Every policy
//! polices unix sockets: one that names none denies them under default deny.

use std::{
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
};

use agent_common::{HOOK_CONNECT_UNIX, HOOK_SENDMSG_UNIX};
use corral_agent::ebpf::{
    Enforcer, PinDir,
    events::{ConnectDecision, EventReader, Reason, Verdict},
};
use corral_policy::compiled::{CompiledSet, UnixDest};
use corral_tests::{Outcome, TestCgroup, build, privileged, probe_in};

const PRINCIPAL: u32 = 11;

/// Whether `enforcer` attached the unix hooks; otherwise prints the skip (a failure under CI).
fn hooks_active(enforcer: &Enforcer) -> bool {
    let hooks = enforcer.sock_addr_hooks();
    if hooks.contains(&"connect_unix") && hooks.contains(&"sendmsg_unix") {
        return true;
    }
    corral_tests::skip(
        "cgroup-unix-hooks",
        &format!(
            "the cgroup unix hooks need kernel 6.7+: {}",
            enforcer.unix_hooks_error().unwrap_or("not attached")
        ),
    );
    false
}

/// Sockets to connect to, in a directory of the test's own; removed on drop.
struct Sockets {
    dir: PathBuf,
    abstract_ok: String,
    abstract_no: String,
    _held: (Vec<UnixListener>, Vec<UnixDatagram>),
}

impl Sockets {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("corral-unix-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let abstract_ok = format!("@corral-unix-{tag}-ok-{}", std::process::id());
        let abstract_no = format!("@corral-unix-{tag}-no-{}", std::process::id());
        let mut listeners = Vec::new();
        for name in ["ok.sock", "no.sock", "nozone.sock"] {
            listeners.push(UnixListener::bind(dir.join(name))?);
        }
        for name in [&abstract_ok, &abstract_no] {
            let addr = SocketAddr::from_abstract_name(&name.as_bytes()[1..])?;
            listeners.push(UnixListener::bind_addr(&addr)?);
        }
        let mut dgrams = Vec::new();
        for name in ["ok.dgram", "no.dgram"] {
            dgrams.push(UnixDatagram::bind(dir.join(name))?);
        }
        Ok(Self {
            dir,
            abstract_ok,
            abstract_no,
            _held: (listeners, dgrams),
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Sockets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Zone `ok` (allowed) and zone `no` (denied) of unix sockets, an unrelated IP zone first (so
/// the unix zones' indices are not 0), default deny.
fn policy(s: &Sockets) -> CompiledSet {
    let mut p = build::policy("unix")
        .zone("ip", &["192.0.2.0/24"])
        .zone("ok", &[])
        .zone("no", &[])
        .allow(&["ok"], &[], &[])
        .deny(&["no"], &[], &[])
        // Names ports: applies to IP calls only, never to a unix socket in zone `no`.
        .allow(&["no"], &[80], &[])
        .build();
    let dest = |zone: u32, path: String| UnixDest { zone, path };
    p.unix = vec![
        dest(1, s.path("ok.sock")),
        dest(1, s.path("ok.dgram")),
        dest(1, s.abstract_ok.clone()),
        dest(2, s.path("no.sock")),
        dest(2, s.path("no.dgram")),
        dest(2, s.abstract_no.clone()),
    ];
    build::set(1, vec![p])
}

fn event_for<'a>(events: &'a [ConnectDecision], path: &str, hook: u8) -> &'a ConnectDecision {
    events
        .iter()
        .find(|c| c.unix_path.as_deref() == Some(path) && c.hook == hook)
        .unwrap_or_else(|| panic!("no event for {path} (hook {hook}) in {events:#?}"))
}

/// A test's sockets, its principal's cgroup, the loaded programs and the test policy applied
/// with that cgroup enrolled; `None` (skipped) where the kernel lacks the unix hooks.
struct Node {
    s: Sockets,
    cg: TestCgroup,
    enforcer: Enforcer,
    set: CompiledSet,
}

fn node(tag: &str, cgroup: &str) -> anyhow::Result<Option<Node>> {
    let s = Sockets::new(tag)?;
    let cg = TestCgroup::new(cgroup)?;
    let mut enforcer = Enforcer::load_and_attach(&cg.root)?;
    if !hooks_active(&enforcer) {
        return Ok(None);
    }
    let set = policy(&s);
    let maps = enforcer.maps();
    maps.add_principal(cg.id()?, cg.level(), PRINCIPAL, Some(0))?;
    maps.apply(&set, |_, _| Some(0))?;
    Ok(Some(Node {
        s,
        cg,
        enforcer,
        set,
    }))
}

#[test]
fn unix_connect_and_sendto_are_decided_by_zone_inside_the_cgroup_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(Node {
        s,
        cg,
        mut enforcer,
        ..
    }) = node("decide", "unix")?
    else {
        return Ok(());
    };
    let mut reader = EventReader::take(enforcer.maps())?;

    let ops = [
        format!("unix:{}", s.path("ok.sock")),
        format!("unix:{}", s.path("no.sock")),
        format!("unix:{}", s.path("nozone.sock")),
        format!("unixdgram:{}", s.path("ok.dgram")),
        format!("unixdgram:{}", s.path("no.dgram")),
        format!("unix:{}", s.abstract_ok),
        format!("unix:{}", s.abstract_no),
        // Junk after the NUL, or no NUL at all: the kernel connects to the path, so the path
        // is what is decided.
        format!("unixjunk:{}", s.path("no.sock")),
        format!("unixnonul:{}", s.path("no.sock")),
        format!("unixjunk:{}", s.path("ok.sock")),
        format!("unixnonul:{}", s.path("ok.sock")),
    ];
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let got = probe_in(&cg.path, &ops)?;
    let eperm = || Outcome::Errno("EPERM".into());
    assert_eq!(
        got,
        vec![
            Outcome::Ok,
            eperm(),
            eperm(),
            Outcome::Ok,
            eperm(),
            Outcome::Ok,
            eperm(),
            eperm(),
            eperm(),
            Outcome::Ok,
            Outcome::Ok,
        ],
        "ops {ops:?}: allowed zone connects/sends, denied zone and no zone (default deny) fail \
         with EPERM"
    );

    // The test process is not enrolled: not policed.
    UnixStream::connect(s.path("no.sock"))?;
    UnixDatagram::unbound()?.send_to(b"x", s.path("no.dgram"))?;

    let events = reader.drain_connects();
    assert!(
        events.iter().all(|c| c.header.principal == PRINCIPAL),
        "un-enrolled calls must not produce events: {events:#?}"
    );
    let policy = Some(agent_common::policy_key(1, 0));
    let e = event_for(&events, &s.path("ok.sock"), HOOK_CONNECT_UNIX);
    assert_eq!(
        (
            e.header.verdict,
            e.header.reason,
            e.zone,
            e.header.rule,
            e.header.policy
        ),
        (Verdict::Allow, Reason::Rule, Some(1), Some(0), policy)
    );
    let e = event_for(&events, &s.path("no.sock"), HOOK_CONNECT_UNIX);
    assert_eq!(
        (e.header.verdict, e.header.reason, e.zone, e.header.rule),
        (Verdict::Deny, Reason::Rule, Some(2), Some(1))
    );
    assert_eq!((e.port, e.proto), (0, 0));
    // The junk and no-NUL variants are recorded with the path the kernel connects to.
    let ok_events = events
        .iter()
        .filter(|c| c.unix_path.as_deref() == Some(s.path("ok.sock").as_str()))
        .filter(|c| c.header.verdict == Verdict::Allow && c.zone == Some(1))
        .count();
    assert_eq!(ok_events, 3, "{events:#?}");
    let e = event_for(&events, &s.path("nozone.sock"), HOOK_CONNECT_UNIX);
    assert_eq!(
        (e.header.verdict, e.header.reason, e.zone, e.header.rule),
        (Verdict::Deny, Reason::Default, None, None)
    );
    let e = event_for(&events, &s.path("ok.dgram"), HOOK_SENDMSG_UNIX);
    assert_eq!((e.header.verdict, e.zone), (Verdict::Allow, Some(1)));
    let e = event_for(&events, &s.path("no.dgram"), HOOK_SENDMSG_UNIX);
    assert_eq!((e.header.verdict, e.zone), (Verdict::Deny, Some(2)));
    let e = event_for(&events, &s.abstract_ok, HOOK_CONNECT_UNIX);
    assert_eq!((e.header.verdict, e.zone), (Verdict::Allow, Some(1)));
    let e = event_for(&events, &s.abstract_no, HOOK_CONNECT_UNIX);
    assert_eq!((e.header.verdict, e.zone), (Verdict::Deny, Some(2)));
    println!(
        "ran: {} unix decisions; hooks {:?}",
        events.len(),
        enforcer.sock_addr_hooks()
    );
    Ok(())
}

#[test]
fn unix_zones_follow_policy_swaps_audit_mode_and_default_deny_covers_unnamed_sockets()
-> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(Node {
        s,
        cg,
        mut enforcer,
        set,
    }) = node("swap", "unix-swap")?
    else {
        return Ok(());
    };
    let mut reader = EventReader::take(enforcer.maps())?;
    let op = format!("unix:{}", s.path("no.sock"));
    assert_eq!(
        probe_in(&cg.path, &[&op])?,
        vec![Outcome::Errno("EPERM".into())]
    );

    // The same zones in audit mode (the other generation): the call goes through.
    let mut audit = set.clone();
    audit.revision = 2;
    audit.policies[0].mode = corral_policy::compiled::Mode::Audit;
    enforcer.maps().apply(&audit, |_, _| Some(0))?;
    assert_eq!(probe_in(&cg.path, &[&op])?, vec![Outcome::Ok]);

    // A policy that names no unix socket still polices them: default deny denies them (with
    // an event), like an IP destination in no zone.
    let mut no_unix = set.clone();
    no_unix.policies[0].unix.clear();
    enforcer.maps().apply(&no_unix, |_, _| Some(0))?;
    let earlier = reader.drain_connects();
    assert_eq!(
        earlier.len(),
        2,
        "the deny and the audit-deny: {earlier:#?}"
    );
    let ip_denied = "udp:192.0.2.1:9";
    assert_eq!(
        probe_in(&cg.path, &[&op, ip_denied])?,
        vec![
            Outcome::Errno("EPERM".into()),
            Outcome::Errno("EPERM".into())
        ]
    );
    let events = reader.drain_connects();
    let e = event_for(&events, &s.path("no.sock"), HOOK_CONNECT_UNIX);
    assert_eq!(
        (e.header.verdict, e.header.reason, e.zone),
        (Verdict::Deny, Reason::Default, None)
    );

    // Enrolled without a policy: unix sockets are denied too (fail closed).
    let none = TestCgroup::new("unix-nopolicy")?;
    enforcer
        .maps()
        .add_principal(none.id()?, none.level(), PRINCIPAL + 1, None)?;
    assert_eq!(
        probe_in(&none.path, &[&op])?,
        vec![Outcome::Errno("EPERM".into())]
    );
    let events = reader.drain_connects();
    let e = event_for(&events, &s.path("no.sock"), HOOK_CONNECT_UNIX);
    assert_eq!(
        (e.header.verdict, e.header.reason),
        (Verdict::Deny, Reason::NoPolicy)
    );
    Ok(())
}

#[test]
fn a_grant_for_a_unix_zone_allows_a_denied_socket_until_it_expires() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(Node {
        s,
        cg,
        mut enforcer,
        ..
    }) = node("grant", "unix-grant")?
    else {
        return Ok(());
    };
    let maps = enforcer.maps();
    let op = format!("unix:{}", s.path("nozone.sock"));
    let no = format!("unix:{}", s.path("no.sock"));
    // A grant for zone `no` (any port, any protocol: what a grant without ports installs)
    // overrides the deny rule, not the default for a socket in no zone.
    let key = agent_common::GrantKey {
        principal: PRINCIPAL,
        zone: 2,
        port: agent_common::ANY_PORT,
        proto: agent_common::ANY_PROTO,
        _pad: 0,
    };
    maps.add_grant(
        key,
        agent_common::GrantValue {
            expires_ns: u64::MAX,
            grant_id: 42,
        },
    )?;
    let mut reader = EventReader::take(enforcer.maps())?;
    let eperm = Outcome::Errno("EPERM".into());
    assert_eq!(
        probe_in(&cg.path, &[&no, &op])?,
        vec![Outcome::Ok, eperm.clone()]
    );
    let events = reader.drain_connects();
    let e = event_for(&events, &s.path("no.sock"), HOOK_CONNECT_UNIX);
    assert_eq!(
        (e.header.verdict, e.header.reason, e.grant_id),
        (Verdict::Allow, Reason::Grant, 42)
    );
    // Expired (CLOCK_BOOTTIME 1 ns): denied again with no other change.
    enforcer.maps().add_grant(
        key,
        agent_common::GrantValue {
            expires_ns: 1,
            grant_id: 42,
        },
    )?;
    assert_eq!(probe_in(&cg.path, &[&no])?, vec![eperm]);
    Ok(())
}

/// The unix hooks run by the cgroup a socket is created in, and are attached at the cgroup v2
/// root: a principal's process that moved itself to the root cgroup (after it was seen as the
/// principal's once) is still decided on every unix socket it opens there.
#[test]
fn a_process_that_left_its_cgroup_is_still_decided_on_unix_sockets() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    // The enforcer is bound: dropping it would detach the programs.
    let Some(Node {
        s,
        cg,
        enforcer: _enforcer,
        ..
    }) = node("left", "unix-left")?
    else {
        return Ok(());
    };
    let ok = format!("unix:{}", s.path("ok.sock"));
    let out = probe_in(
        &cg.path,
        &[
            &ok,
            &format!("movecg:{}", cg.root.display()),
            &format!("unix:{}", s.path("no.sock")),
            &format!("unixdgram:{}", s.path("no.dgram")),
            &format!("unix:{}", s.abstract_no),
            &ok,
        ],
    )?;
    let eperm = || Outcome::Errno("EPERM".into());
    assert_eq!(
        out,
        vec![
            Outcome::Ok,
            Outcome::Ok,
            eperm(),
            eperm(),
            eperm(),
            Outcome::Ok
        ]
    );
    // The same calls from a process that never was the principal's: all through.
    let outside = probe_in(
        &cg.root,
        &[
            &format!("unix:{}", s.path("no.sock")),
            &format!("unixdgram:{}", s.path("no.dgram")),
        ],
    )?;
    assert_eq!(outside, vec![Outcome::Ok, Outcome::Ok]);
    Ok(())
}

fn bpffs_dir() -> Option<PathBuf> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| l.contains(" - bpf "))?
        .split_whitespace()
        .nth(4)?
        .to_owned();
    Some(PathBuf::from(mounted))
}

fn probe_one(cg: &Path, op: &str) -> anyhow::Result<Outcome> {
    probe_in(cg, &[op])?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no outcome for {op}"))
}

#[test]
fn pinned_unix_hooks_outlive_the_agent_are_adopted_and_uninstalled() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let Some(bpffs) = bpffs_dir() else {
        corral_tests::skip("bpffs", "no bpffs mounted (cargo xtask setup mounts it)");
        return Ok(());
    };
    let pins = PinDir::new(bpffs.join(format!("corral-test-unix-{}", std::process::id())));
    let s = Sockets::new("pins")?;
    let cg = TestCgroup::new("unix-pins")?;
    let op = format!("unix:{}", s.path("no.sock"));
    let eperm = Outcome::Errno("EPERM".into());

    /// Removes the pins however the test ends (a panic included).
    struct Uninstall<'a>(&'a PinDir);
    impl Drop for Uninstall<'_> {
        fn drop(&mut self) {
            let _ = self.0.uninstall();
        }
    }
    let _cleanup = Uninstall(&pins);

    (|| -> anyhow::Result<()> {
        let mut first = Enforcer::start(&cg.root, Some(&pins))?;
        if !hooks_active(&first) {
            return Ok(());
        }
        anyhow::ensure!(
            pins.link_path("connect_unix").exists() && pins.link_path("sendmsg_unix").exists(),
            "unix links are not pinned under {}",
            pins.root().display()
        );
        let set = policy(&s);
        let maps = first.maps();
        maps.add_principal(cg.id()?, cg.level(), PRINCIPAL, Some(0))?;
        maps.apply(&set, |_, _| Some(0))?;
        assert_eq!(probe_one(&cg.path, &op)?, eperm);
        // The agent goes away without uninstalling (as after kill -9): still enforced.
        drop(first);
        assert_eq!(probe_one(&cg.path, &op)?, eperm, "after the agent is gone");

        // A new agent adopts the pinned maps and replaces the links.
        let second = Enforcer::start(&cg.root, Some(&pins))?;
        assert!(second.adopted());
        assert!(hooks_active(&second));
        assert_eq!(probe_one(&cg.path, &op)?, eperm, "after adoption");
        drop(second);
        pins.uninstall()?;
        // A link whose last pin goes is released from a kernel work queue: allow it a moment.
        let mut after = probe_one(&cg.path, &op)?;
        for _ in 0..40 {
            if after == Outcome::Ok {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            after = probe_one(&cg.path, &op)?;
        }
        assert_eq!(after, Outcome::Ok, "after uninstall");
        Ok(())
    })()
}

/// An abstract name is compared with its exact length, as the kernel compares it: allowing
/// `@name` does not allow `@name\0`, a different socket.
#[test]
fn an_allowed_abstract_name_does_not_admit_the_same_name_with_a_trailing_nul() -> anyhow::Result<()>
{
    if !privileged() {
        return Ok(());
    }
    let Some(Node {
        s,
        cg,
        mut enforcer,
        ..
    }) = node("absnul", "unix-absnul")?
    else {
        return Ok(());
    };
    let mut reader = EventReader::take(enforcer.maps())?;
    // A listener on `<ok name>\0` (one more byte than the allowed name).
    let name = &s.abstract_ok[1..];
    let mut longer = name.as_bytes().to_vec();
    longer.push(0);
    let _held = UnixListener::bind_addr(&SocketAddr::from_abstract_name(&longer)?)?;
    let allowed = format!("unix:{}", s.abstract_ok);
    let with_nul = format!("unixabsnul:{name}");
    assert_eq!(
        probe_in(&cg.path, &[&allowed, &with_nul])?,
        vec![Outcome::Ok, Outcome::Errno("EPERM".into())],
        "the allowed name connects, the one-byte-longer name is in no zone (default deny)"
    );
    let events = reader.drain_connects();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        events[1].unix_path.as_deref(),
        Some(format!("{}\0", s.abstract_ok).as_str()),
        "recorded with its trailing NUL"
    );
    assert_eq!(
        (events[1].header.verdict, events[1].zone),
        (Verdict::Deny, None)
    );
    // Outside the principal both exist and connect.
    assert_eq!(
        corral_tests::probe_outside(&[&allowed, &with_nul])?,
        vec![Outcome::Ok, Outcome::Ok]
    );
    Ok(())
}
