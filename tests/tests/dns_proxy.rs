//! Zones by host name, end to end: the real `corral-agent` with its DNS proxy, a real resolver
//! (`dnsmasq`, started here with made-up names), real clients in real principals (`corral
//! run`), the real kernel programs. A principal's DNS to any resolver address goes to the
//! proxy; names outside its zones are REFUSED and never reach the resolver; an answer opens
//! its addresses for that principal only, until the TTL (with the floor) passes, before the
//! client reads it.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, ensure};
use corral_tests::{
    dnsmasq::{Dnsmasq, Record},
    e2e::{bin, wait_for},
    fleet::{Agent, Dir, Node, stop_child, text},
    privileged,
};
use serde_json::Value;

const ID: &str = "spiffe://e2e.corral/agent/dns";
/// No resolver listens here: an answer "from" it proves the redirect (and the source the
/// client reads, restored by recvmsg4).
const ELSEWHERE: &str = "192.0.2.53:53";
/// The same for IPv6.
const ELSEWHERE6: &str = "[2001:db8::53]:53";

/// Listeners on 127.0.0.2..=7 at one port: the addresses the made-up names resolve to.
struct Targets {
    port: u16,
    _l: Vec<TcpListener>,
}

impl Targets {
    fn new() -> anyhow::Result<Self> {
        let first = TcpListener::bind("127.0.0.2:0")?;
        let port = first.local_addr()?.port();
        let mut l = vec![first];
        for i in 3..=7 {
            l.push(TcpListener::bind(format!("127.0.0.{i}:{port}"))?);
        }
        Ok(Self { port, _l: l })
    }
}

fn records() -> Vec<Record<'static>> {
    vec![
        Record::Address("api.corral.test", "127.0.0.2"),
        Record::Address("cdn.corral.test", "127.0.0.3"),
        Record::Host("target.corral.test", "127.0.0.4"),
        Record::Cname("alias.corral.test", "target.corral.test"),
        Record::Address("deep.corral.test", "127.0.0.5"),
        Record::Address("other.corral.test", "127.0.0.6"),
        Record::Address("audit.corral.test", "127.0.0.7"),
    ]
}

fn policy(dir: &Dir, port: u16, mode: &str) -> anyhow::Result<std::path::PathBuf> {
    let bindir = corral_tests::harness::bin_dir()?.display().to_string();
    dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata:
  name: e2e-dns
spec:
  identities:
    - spiffe://e2e.corral/agent/**
  mode: {mode}
  defaultAction: deny
  zones:
    api:  {{ hosts: [api.corral.test, alias.corral.test] }}
    cdn:  {{ hosts: [\"*.cdn.corral.test\"] }}
    deep: {{ hosts: [\"**.deep.corral.test\"] }}
    race: {{ hosts: [\"**.race.corral.test\"] }}
  connect:
    - {{ action: allow, zones: [api, cdn, deep, race], ports: [{port}], protocols: [tcp] }}
  exec:
    - {{ action: allow, paths: [\"{bindir}/**\", \"/usr/bin/**\", \"/bin/**\"] }}
"
        ),
    )
}

/// A node with the agent (proxy forwarding to `dns`, TTL floor `floor` s) and its policy.
struct Setup {
    node: Node,
    dns_port: u16,
    agent: Agent,
    _dir: Dir,
}

fn setup(
    name: &str,
    dns: &Dnsmasq,
    port: u16,
    floor: u64,
    mode: &str,
) -> anyhow::Result<Option<Setup>> {
    setup_with(name, dns, port, floor, mode, &[])
}

/// [`setup`] with more agent arguments.
fn setup_with(
    name: &str,
    dns: &Dnsmasq,
    port: u16,
    floor: u64,
    mode: &str,
    extra: &[&str],
) -> anyhow::Result<Option<Setup>> {
    let dir = Dir::new(name)?;
    let Some(node) = Node::new(&dir, "n1")? else {
        return Ok(None);
    };
    let policy = policy(&dir, port, mode)?;
    let upstream = dns.addr.to_string();
    let port_num = corral_tests::fleet::free_port()?;
    let dns_port = port_num.to_string();
    let floor = floor.to_string();
    let mut args = vec![
        "--dns-upstream",
        &upstream,
        "--dns-port",
        &dns_port,
        "--dns-ttl-floor-secs",
        &floor,
    ];
    args.extend_from_slice(extra);
    let agent = Agent::standalone(&node, &policy, &args)?;
    Ok(Some(Setup {
        node,
        dns_port: port_num,
        agent,
        _dir: dir,
    }))
}

impl Setup {
    fn probe(&self, session: &str, ops: &[String]) -> anyhow::Result<Vec<String>> {
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        self.node.probe_as(ID, session, &ops)
    }

    /// Keeps principal (`ID`, `session`) enrolled while the guard lives (the sweep removes
    /// principals with no process).
    fn hold(&self, session: &str) -> anyhow::Result<Held> {
        let child = Command::new(bin("corral")?)
            .args(["run", "--socket"])
            .arg(&self.node.socket)
            .args(["--identity", ID, "--session", session, "--", "sleep", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let h = Held(child);
        wait_for(10, "the held principal", || {
            let s = self.node.status()?;
            let n = s["principals"]
                .as_array()
                .map_or(0, |p| p.iter().filter(|p| p["session"] == session).count());
            Ok((n > 0).then_some(()))
        })?;
        Ok(h)
    }

    fn events(&self) -> anyhow::Result<Vec<Value>> {
        let out = self.node.local(&["events", "--json", "--identity", ID])?;
        ensure!(out.status.success(), "corral events: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("event line {l}")))
            .collect()
    }
}

struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.0);
    }
}

fn dns(kind: &str, name: &str, server: &str) -> String {
    format!("{kind}:{name}@{server}")
}

#[test]
fn allowed_names_resolve_and_connect_and_others_are_refused_unasked() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let t = Targets::new()?;
    let dir = Dir::new("dns-resolver")?;
    let resolver = Dnsmasq::start(&dir, &records(), 60)?;
    let Some(s) = setup("dns-allowed", &resolver, t.port, 30, "enforce")? else {
        return Ok(());
    };
    let p = t.port;
    let out = s.probe(
        "s1",
        &[
            // UDP unconnected, UDP connected, TCP: answered, from the address asked.
            dns("dns", "api.corral.test", ELSEWHERE),
            dns("dnsc", "api.corral.test", ELSEWHERE),
            dns("dnstcp", "api.corral.test", ELSEWHERE),
            // Unlisted: REFUSED.
            dns("dns", "other.corral.test", ELSEWHERE),
            dns("dnstcp", "other.corral.test", ELSEWHERE),
            // Its address, never learned: denied like any other.
            format!("tcp:127.0.0.6:{p}"),
            // Learned: open.
            format!("tcp:127.0.0.2:{p}"),
            // CNAME chain: alias (in `api`) -> target.
            dns("dns", "alias.corral.test", ELSEWHERE),
            format!("tcp:127.0.0.4:{p}"),
            // `*.` is one label, never the bare suffix nor two labels.
            dns("dns", "a.cdn.corral.test", ELSEWHERE),
            dns("dns", "cdn.corral.test", ELSEWHERE),
            dns("dns", "a.b.cdn.corral.test", ELSEWHERE),
            format!("tcp:127.0.0.3:{p}"),
            // `**.` is any depth below, never the bare suffix.
            dns("dns", "x.deep.corral.test", ELSEWHERE),
            dns("dns", "a.b.deep.corral.test", ELSEWHERE),
            dns("dns", "deep.corral.test", ELSEWHERE),
            format!("tcp:127.0.0.5:{p}"),
            // The resolver itself, off port 53: an ordinary destination, in no zone.
            dns("dns", "api.corral.test", &resolver.addr.to_string()),
            // Names are case-insensitive.
            dns("dns", "API.Corral.TEST", ELSEWHERE),
            // An IPv6 resolver: connected UDP and TCP are redirected (IPv4-mapped), and the
            // reply and the peer name the resolver asked; an unconnected send cannot be.
            dns("dnsc", "api.corral.test", ELSEWHERE6),
            dns("dnstcp", "api.corral.test", ELSEWHERE6),
            dns("dns", "api.corral.test", ELSEWHERE6),
            // An IPv4 resolver asked from an IPv6 socket (IPv4-mapped).
            dns("dns", "api.corral.test", "[::ffff:192.0.2.53]:53"),
        ],
    )?;
    let from = format!("from {ELSEWHERE}");
    let ok = |a: &str| format!("NOERROR {a} {from}");
    let refused = format!("REFUSED - {from}");
    assert_eq!(
        out,
        [
            ok("127.0.0.2"),
            ok("127.0.0.2"),
            ok("127.0.0.2"),
            refused.clone(),
            refused.clone(),
            "EPERM".into(),
            "ok".into(),
            ok("127.0.0.4"),
            "ok".into(),
            ok("127.0.0.3"),
            refused.clone(),
            refused.clone(),
            "ok".into(),
            ok("127.0.0.5"),
            ok("127.0.0.5"),
            refused.clone(),
            "ok".into(),
            "EPERM".into(),
            ok("127.0.0.2"),
            format!("NOERROR 127.0.0.2 from {ELSEWHERE6}"),
            format!("NOERROR 127.0.0.2 from {ELSEWHERE6}"),
            "EPERM".into(),
            "NOERROR 127.0.0.2 from [::ffff:192.0.2.53]:53".into(),
        ],
        "agent log:\n{}",
        s.agent.log_text()
    );
    // Refused names never reach the resolver; allowed ones do.
    assert_eq!(
        resolver.queries_for("other.corral.test"),
        0,
        "{}",
        resolver.log_text()
    );
    assert_eq!(
        resolver.queries_for("cdn.corral.test"),
        0,
        "{}",
        resolver.log_text()
    );
    assert!(
        resolver.queries_for("api.corral.test") >= 3,
        "{}",
        resolver.log_text()
    );

    // `dns` events: the refusal and the answer with its chain and zone.
    // (Kernel events come through the ring buffer, DNS events from the proxy: wait for both.)
    let evs = wait_for(5, "the dns and connect events", || {
        let evs = s.events()?;
        let dns = evs.iter().any(|e| e["dns"]["name"] == "alias.corral.test");
        let last = evs
            .iter()
            .any(|e| e["connect"]["destination"] == "127.0.0.5");
        Ok((dns && last).then_some(evs))
    })?;
    let dns_evs: Vec<&Value> = evs.iter().filter(|e| e["kind"] == "dns").collect();
    assert!(
        dns_evs
            .iter()
            .any(|e| e["dns"]["name"] == "other.corral.test"
                && e["dns"]["rcode"] == "REFUSED"
                && e["decision"]["verdict"] == "deny"),
        "{dns_evs:#?}"
    );
    assert!(
        dns_evs
            .iter()
            .any(|e| e["dns"]["name"] == "alias.corral.test"
                && e["dns"]["zone"] == "api"
                && e["dns"]["answers"][0] == "127.0.0.4"
                && e["dns"]["chain"][1] == "target.corral.test"
                && e["decision"]["verdict"] == "allow"),
        "{dns_evs:#?}"
    );
    // A connect to an address a name opened carries the name.
    assert!(
        evs.iter()
            .any(|e| e["connect"]["destination"] == "127.0.0.4"
                && e["connect"]["name"] == "alias.corral.test"
                && e["connect"]["zone"] == "api"
                && e["decision"]["verdict"] == "allow"),
        "{evs:#?}"
    );
    assert!(
        evs.iter()
            .any(|e| e["connect"]["destination"] == "127.0.0.6"
                && e["connect"]["name"] == ""
                && e["decision"]["verdict"] == "deny"),
        "{evs:#?}"
    );
    // `explain` by name, through the agent: it resolves at the proxy's upstream and decides
    // each address as a DNS answer would open it.
    let explain = |to: &str| -> anyhow::Result<String> {
        let out = Command::new(bin("corral")?)
            .args(["policy", "explain", "--socket"])
            .arg(&s.node.socket)
            .args(["--identity", ID, "--connect", to])
            .output()?;
        ensure!(out.status.success(), "explain {to}: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let x = explain(&format!("alias.corral.test:{p}"))?;
    assert!(
        x.contains("verdict:  allow")
            && x.contains("zone:     api")
            && x.contains("name:     alias.corral.test (pattern alias.corral.test)")
            && x.contains("127.0.0.4"),
        "{x}"
    );
    let x = explain(&format!("other.corral.test:{p}"))?;
    assert!(x.contains("verdict:  deny") && x.contains("REFUSED"), "{x}");
    let x = explain(&format!("a.cdn.corral.test:{}", p + 1))?;
    assert!(
        x.contains("verdict:  deny")
            && x.contains("name:     a.cdn.corral.test (pattern *.cdn.corral.test)"),
        "another port: {x}"
    );
    // Counted in status: 16 queries (3 over IPv6), 5 refused, the addresses opened and open now (4).
    let st = s.node.status()?;
    let d = &st["dns"];
    assert_eq!(d["upstream"], resolver.addr.to_string(), "{st}");
    assert_eq!(
        (d["queries"].as_u64(), d["refused"].as_u64()),
        (Some(16), Some(5)),
        "{st}"
    );
    assert!(
        d["learned"].as_u64() >= Some(4) && d["learned_now"].as_u64() == Some(4),
        "{st}"
    );
    assert_eq!(d["failures"], 0, "{st}");
    Ok(())
}

#[test]
fn an_answer_opens_its_addresses_for_the_resolving_principal_only() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let t = Targets::new()?;
    let dir = Dir::new("dns-resolver")?;
    let resolver = Dnsmasq::start(&dir, &records(), 60)?;
    let Some(s) = setup("dns-isolation", &resolver, t.port, 30, "enforce")? else {
        return Ok(());
    };
    let (_h1, _h2) = (s.hold("s1")?, s.hold("s2")?);
    let p = t.port;
    let api = format!("tcp:127.0.0.2:{p}");
    assert_eq!(
        s.probe(
            "s1",
            &[dns("dns", "api.corral.test", ELSEWHERE), api.clone()]
        )?,
        [format!("NOERROR 127.0.0.2 from {ELSEWHERE}"), "ok".into()]
    );
    // Another session of the same identity is another principal: nothing opened for it.
    assert_eq!(s.probe("s2", std::slice::from_ref(&api))?, ["EPERM"]);
    // The first still has it, in a new process.
    assert_eq!(s.probe("s1", std::slice::from_ref(&api))?, ["ok"]);
    // The second resolves for itself: then it is open for it too.
    assert_eq!(
        s.probe("s2", &[dns("dnstcp", "api.corral.test", ELSEWHERE), api])?,
        [format!("NOERROR 127.0.0.2 from {ELSEWHERE}"), "ok".into()]
    );
    // No principal reaches a proxy address directly, its own or another's (each principal's
    // is 127.64.0.0/10 plus its index: the first ones here).
    let direct: Vec<String> = (1..=3)
        .flat_map(|i| {
            let proxy = format!("127.64.0.{i}:{}", s.dns_port);
            [
                dns("dns", "api.corral.test", &proxy),
                dns("dnstcp", "api.corral.test", &proxy),
            ]
        })
        .collect();
    assert_eq!(s.probe("s2", &direct)?, ["EPERM"; 6]);
    assert_eq!(s.probe("s1", &direct)?, ["EPERM"; 6]);
    Ok(())
}

#[test]
fn an_answer_expires_after_its_ttl_with_the_floor() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let t = Targets::new()?;
    let dir = Dir::new("dns-resolver")?;
    let resolver = Dnsmasq::start(&dir, &records(), 1)?;
    let Some(s) = setup("dns-ttl", &resolver, t.port, 2, "enforce")? else {
        return Ok(());
    };
    let api = format!("tcp:127.0.0.2:{}", t.port);
    let out = s.probe(
        "s1",
        &[
            dns("dns", "api.corral.test", ELSEWHERE),
            api.clone(),
            "sleep:3500".into(),
            api,
        ],
    )?;
    assert_eq!(
        out,
        [
            format!("NOERROR 127.0.0.2 from {ELSEWHERE}"),
            "ok".into(),
            "ok".into(),
            "EPERM".into()
        ],
        "open for max(TTL 1 s, floor 2 s), then closed to new connects"
    );
    Ok(())
}

#[test]
fn the_connect_right_after_the_answer_is_never_denied() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    // Every round asks a name whose address nothing opened before: the connect right after
    // the answer passes only if the address was in the kernel map when the client read it.
    const ROUNDS: u8 = 60;
    let port = Targets::new()?.port;
    let mut listeners = Vec::new();
    let mut names = Vec::new();
    for i in 1..=ROUNDS {
        listeners.push(TcpListener::bind(format!("127.0.1.{i}:{port}"))?);
        names.push((format!("r{i}.race.corral.test"), format!("127.0.1.{i}")));
    }
    let mut recs = records();
    recs.extend(names.iter().map(|(n, a)| Record::Host(n, a)));
    let dir = Dir::new("dns-resolver")?;
    let resolver = Dnsmasq::start(&dir, &recs, 60)?;
    let Some(s) = setup("dns-race", &resolver, port, 30, "enforce")? else {
        return Ok(());
    };
    let before: Vec<String> = names
        .iter()
        .take(3)
        .map(|(_, a)| format!("tcp:{a}:{port}"))
        .collect();
    assert_eq!(
        s.probe("s1", &before)?,
        ["EPERM"; 3],
        "not open before it is asked"
    );
    let ops: Vec<String> = names
        .iter()
        .map(|(n, _)| format!("dnsconn:{port}:{n}@{ELSEWHERE}"))
        .collect();
    let out = s.probe("s1", &ops)?;
    assert_eq!(
        out,
        vec!["ok"; usize::from(ROUNDS)],
        "{}",
        s.agent.log_text()
    );
    Ok(())
}

#[test]
fn in_audit_mode_unlisted_names_are_answered_and_recorded() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let t = Targets::new()?;
    let dir = Dir::new("dns-resolver")?;
    let resolver = Dnsmasq::start(&dir, &records(), 60)?;
    let Some(s) = setup("dns-audit", &resolver, t.port, 30, "audit")? else {
        return Ok(());
    };
    let out = s.probe("s1", &[dns("dns", "audit.corral.test", ELSEWHERE)])?;
    assert_eq!(out, [format!("NOERROR 127.0.0.7 from {ELSEWHERE}")]);
    let evs = wait_for(5, "the audited dns event", || {
        let evs = s.events()?;
        Ok(evs
            .into_iter()
            .find(|e| e["dns"]["name"] == "audit.corral.test"))
    })?;
    assert_eq!(evs["decision"]["verdict"], "audit-deny", "{evs:#}");
    // What enforce mode refuses in the kernel is recorded and let through: the principal's
    // own proxy address asked directly (the proxy answers), and an unconnected send to an
    // IPv6 resolver (nothing listens at [::1]:53 here: no answer comes, but it was sent).
    let own = format!("127.64.0.1:{}", s.dns_port);
    let out = s.probe(
        "s1",
        &[
            dns("dnsc", "audit.corral.test", &own),
            dns("dns", "audit.corral.test", "[::1]:53"),
        ],
    )?;
    assert_eq!(out[0], format!("NOERROR 127.0.0.7 from {own}"));
    assert_ne!(out[1], "EPERM");
    let evs = wait_for(5, "the audited containment refusals", || {
        let evs: Vec<Value> = s
            .events()?
            .into_iter()
            .filter(|e| e["decision"]["reason"] == "containment")
            .collect();
        let port = |p: u16| evs.iter().any(|e| e["connect"]["port"] == p);
        Ok((port(53) && port(s.dns_port)).then_some(evs))
    })?;
    assert!(
        evs.iter().all(|e| e["decision"]["verdict"] == "audit-deny"),
        "{evs:#?}"
    );
    Ok(())
}

#[test]
fn a_principal_at_its_cap_opens_nothing_more_and_others_are_unaffected() -> anyhow::Result<()> {
    if !privileged() {
        return Ok(());
    }
    let t = Targets::new()?;
    let dir = Dir::new("dns-resolver")?;
    let resolver = Dnsmasq::start(&dir, &records(), 60)?;
    let Some(s) = setup_with(
        "dns-cap",
        &resolver,
        t.port,
        30,
        "enforce",
        &["--dns-max-learned", "2"],
    )?
    else {
        return Ok(());
    };
    let p = t.port;
    let conn = |name: &str| format!("dnsconn:{p}:{name}@{ELSEWHERE}");
    // s1 opens two addresses; the third answer is still answered, but opens nothing.
    let _held = s.hold("s1")?;
    assert_eq!(
        s.probe(
            "s1",
            &[
                conn("api.corral.test"),
                conn("a.cdn.corral.test"),
                conn("x.deep.corral.test"),
                // Asked again: an address it has is renewed, not counted twice.
                conn("api.corral.test"),
            ]
        )?,
        ["ok", "ok", "EPERM", "ok"],
        "{}",
        s.agent.log_text()
    );
    // Another principal has a cap of its own.
    assert_eq!(
        s.probe("s2", &[conn("x.deep.corral.test"), conn("api.corral.test")])?,
        ["ok", "ok"]
    );
    let st = s.node.status()?;
    assert_eq!(st["dns"]["capped"], 1, "{st}");
    Ok(())
}
