//! `corral policy suggest`: a least-privilege `AgentPolicy` from recorded calls (those that
//! went through: under `mode: audit`, everything the agent did), as YAML that `corral policy
//! check` accepts:
//! - zones from the destinations seen: a DNS name the agent resolved (`hosts: [name]`), the
//!   loopback (`local`), each other address on its own (`/32`, `/128`), each unix socket;
//! - one allow rule per zone and protocol, with the ports seen;
//! - one allow rule per executable seen;
//! - `defaultAction: deny`, `mode: enforce`.
//!
//! Every rule carries a comment: how many calls and sessions it covers, first and last seen
//! (UTC).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use crate::simulate::{Call, Recorded};

/// Calls, sessions and the time span one rule covers.
#[derive(Debug, Default)]
struct Seen {
    calls: usize,
    sessions: BTreeSet<(String, String)>,
    first: u64,
    last: u64,
}

impl Seen {
    fn add(&mut self, r: &Recorded) {
        self.calls += r.calls;
        self.sessions
            .insert((r.identity.clone(), r.session.clone()));
        if self.first == 0 || r.time_unix_nano < self.first {
            self.first = r.time_unix_nano;
        }
        self.last = self.last.max(r.time_unix_nano);
    }

    /// What `other` covers, added.
    fn merge(&mut self, other: Self) {
        self.calls += other.calls;
        self.sessions.extend(other.sessions);
        if self.first == 0 || (other.first != 0 && other.first < self.first) {
            self.first = other.first;
        }
        self.last = self.last.max(other.last);
    }

    fn comment(&self) -> String {
        format!(
            "# {} call{}, {} session{}, first {}, last {}",
            self.calls,
            if self.calls == 1 { "" } else { "s" },
            self.sessions.len(),
            if self.sessions.len() == 1 { "" } else { "s" },
            utc(self.first),
            utc(self.last)
        )
    }
}

/// `2026-12-06T01:02:03Z` from Unix nanoseconds (days to civil date: Howard Hinnant's
/// algorithm).
fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A zone of the suggestion: its YAML body (`{ cidrs: [...] }`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ZoneOf {
    Host(String),
    Local,
    Addr(IpAddr),
    Unix(String),
}

impl ZoneOf {
    fn base_name(&self) -> String {
        let raw = match self {
            Self::Host(h) => h.clone(),
            Self::Local => "local".into(),
            Self::Addr(a) => format!("ip-{a}"),
            Self::Unix(p) => format!("unix-{}", p.rsplit('/').next().unwrap_or(p)),
        };
        let mut n: String = raw
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        n = n.trim_matches('-').to_owned();
        n.truncate(56);
        if n.is_empty() { "zone".into() } else { n }
    }

    fn body(&self) -> String {
        match self {
            Self::Host(h) => format!("{{ hosts: [{}] }}", quote(h)),
            Self::Local => "{ cidrs: [127.0.0.0/8, \"::1/128\"] }".into(),
            Self::Addr(a @ IpAddr::V4(_)) => format!("{{ cidrs: [{a}/32] }}"),
            Self::Addr(a) => format!("{{ cidrs: [\"{a}/128\"] }}"),
            Self::Unix(p) => format!("{{ unix: [{}] }}", quote(p)),
        }
    }
}

/// One suggested connect rule: a zone and a protocol (`None`: a unix socket).
type RuleKey = (ZoneOf, Option<&'static str>);

/// A YAML double-quoted string.
fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04x}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        6 => Some("tcp"),
        17 => Some("udp"),
        1 => Some("icmp"),
        _ => None,
    }
}

/// What to suggest, besides the calls.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `metadata.name`.
    pub name: String,
    /// `spec.identities`.
    pub identities: Vec<String>,
    /// Exec rules by directory (`dir/**`) where two or more binaries of a directory ran.
    pub exec_prefixes: bool,
    /// Chaining rules where every session that reached one zone never reached another one
    /// afterwards (marked as suggestions).
    pub chaining: bool,
}

/// `2026-12-06T01:02:03Z` (or Unix seconds) as Unix nanoseconds.
pub fn parse_utc(s: &str) -> Option<u64> {
    if let Ok(secs) = s.parse::<u64>() {
        return secs.checked_mul(1_000_000_000);
    }
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs).ok()?.checked_mul(1_000_000_000)
}

/// Exec rules: exact paths, or `dir/**` for a directory two or more binaries ran from.
fn exec_rules(exec: BTreeMap<String, Seen>, prefixes: bool) -> Vec<(String, Seen)> {
    if !prefixes {
        return exec.into_iter().map(|(p, s)| (quote(&p), s)).collect();
    }
    let mut by_dir: BTreeMap<String, Vec<(String, Seen)>> = BTreeMap::new();
    for (p, s) in exec {
        let dir = p.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
        by_dir.entry(dir).or_default().push((p, s));
    }
    let mut out = Vec::new();
    for (dir, files) in by_dir {
        if files.len() >= 2 && !dir.is_empty() {
            let mut all = Seen::default();
            for (_, s) in files {
                all.merge(s);
            }
            out.push((quote(&format!("{dir}/**")), all));
        } else {
            out.extend(files.into_iter().map(|(p, s)| (quote(&p), s)));
        }
    }
    out
}

/// A zone no session reached after another: (the zone, sessions that reached the other,
/// sessions that reached it).
type Unreached = (ZoneOf, usize, usize);

/// Chaining suggestions: `after` zone -> the zones no session reached after it (each reached
/// by some session, and `after` reached by two or more), with the session counts.
fn chaining(order: &BTreeMap<(String, String), Vec<ZoneOf>>) -> BTreeMap<ZoneOf, Vec<Unreached>> {
    let mut reached: BTreeMap<&ZoneOf, usize> = BTreeMap::new();
    for zones in order.values() {
        for z in zones.iter().collect::<BTreeSet<_>>() {
            *reached.entry(z).or_default() += 1;
        }
    }
    let mut out: BTreeMap<ZoneOf, Vec<Unreached>> = BTreeMap::new();
    for (&a, &na) in &reached {
        if na < 2 {
            continue;
        }
        for (&b, &nb) in &reached {
            if a == b {
                continue;
            }
            let never_after = order
                .values()
                .all(|zones| match zones.iter().position(|z| z == a) {
                    Some(i) => !zones[i + 1..].contains(b),
                    None => true,
                });
            if never_after {
                out.entry(a.clone()).or_default().push((b.clone(), na, nb));
            }
        }
    }
    out
}

/// The suggested policy from `calls`.
pub fn suggest(calls: &[Recorded], opts: &Options) -> String {
    let (name, identities) = (opts.name.as_str(), opts.identities.as_slice());
    // Per session, the zones its connects reached, in order.
    let mut order: BTreeMap<(String, String), Vec<ZoneOf>> = BTreeMap::new();
    let mut zones: BTreeMap<ZoneOf, ()> = BTreeMap::new();
    // (zone, protocol) -> ports, and what the rule covers.
    let mut connect: BTreeMap<RuleKey, (BTreeSet<u16>, Seen)> = BTreeMap::new();
    let mut exec: BTreeMap<String, Seen> = BTreeMap::new();
    let mut skipped = 0usize;
    for r in calls {
        if !r.went_through {
            skipped += r.calls;
            continue;
        }
        match &r.call {
            Call::Connect(c) => {
                let zone = match (&r.name, c.addr) {
                    (Some(h), _) if !h.is_empty() => ZoneOf::Host(h.trim_end_matches('.').into()),
                    (_, a) if a.is_loopback() => ZoneOf::Local,
                    (_, a) => ZoneOf::Addr(a),
                };
                let Some(proto) = proto_name(c.proto) else {
                    skipped += r.calls;
                    continue;
                };
                zones.insert(zone.clone(), ());
                order
                    .entry((r.identity.clone(), r.session.clone()))
                    .or_default()
                    .push(zone.clone());
                let e = connect.entry((zone, Some(proto))).or_default();
                if proto != "icmp" {
                    e.0.insert(c.port);
                }
                e.1.add(r);
            }
            Call::Unix(p) => {
                let zone = ZoneOf::Unix(p.clone());
                zones.insert(zone.clone(), ());
                order
                    .entry((r.identity.clone(), r.session.clone()))
                    .or_default()
                    .push(zone.clone());
                connect.entry((zone, None)).or_default().1.add(r);
            }
            Call::Exec(p) => exec.entry(p.clone()).or_default().add(r),
        }
    }
    // Unique zone names.
    let mut names: BTreeMap<ZoneOf, String> = BTreeMap::new();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for z in zones.keys() {
        let base = z.base_name();
        let mut n = base.clone();
        let mut i = 2;
        while !taken.insert(n.clone()) {
            n = format!("{base}-{i}");
            i += 1;
        }
        names.insert(z.clone(), n);
    }

    let mut y = String::new();
    let recorded: usize = calls.iter().map(|c| c.calls).sum();
    let _ = writeln!(
        y,
        "# Suggested by `corral policy suggest` from {} recorded call{} ({} not covered: \
         denied when recorded, or not a connect/exec). Review before enforcing.",
        recorded,
        if recorded == 1 { "" } else { "s" },
        skipped
    );
    let _ = writeln!(
        y,
        "apiVersion: corral.dev/v1alpha1\nkind: AgentPolicy\nmetadata:\n  name: {name}\nspec:"
    );
    y.push_str("  identities:\n");
    for id in identities {
        let _ = writeln!(y, "    - {}", quote(id));
    }
    y.push_str("  mode: enforce\n  defaultAction: deny\n");
    if !names.is_empty() {
        y.push_str("  zones:\n");
        for (z, n) in &names {
            let _ = writeln!(y, "    {n}: {}", z.body());
        }
        y.push_str("  connect:\n");
        for ((z, proto), (ports, seen)) in &connect {
            let mut rule = format!("{{ action: allow, zones: [{}]", names[z]);
            if !ports.is_empty() {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                let _ = write!(rule, ", ports: [{}]", list.join(", "));
            }
            if let Some(p) = proto {
                let _ = write!(rule, ", protocols: [{p}]");
            }
            rule.push_str(" }");
            let _ = writeln!(y, "    {}\n    - {rule}", seen.comment());
        }
    }
    if !exec.is_empty() {
        y.push_str("  exec:\n");
        for (path, seen) in exec_rules(exec, opts.exec_prefixes) {
            let _ = writeln!(
                y,
                "    {}\n    - {{ action: allow, paths: [{path}] }}",
                seen.comment()
            );
        }
    }
    if opts.chaining {
        // Only zones the kernel's chaining can track (the first 64 of the policy).
        let index: BTreeMap<&ZoneOf, usize> =
            names.keys().enumerate().map(|(i, z)| (z, i)).collect();
        let trackable = |z: &ZoneOf| index.get(z).is_some_and(|&i| i < 64);
        let rules: Vec<(ZoneOf, Vec<Unreached>)> = chaining(&order)
            .into_iter()
            .filter(|(a, _)| trackable(a))
            .map(|(a, bs)| {
                (
                    a,
                    bs.into_iter()
                        .filter(|(b, _, _)| trackable(b))
                        .collect::<Vec<_>>(),
                )
            })
            .filter(|(_, bs)| !bs.is_empty())
            .collect();
        if !rules.is_empty() {
            y.push_str("  chaining:\n");
        }
        for (a, bs) in rules {
            for (b, na, nb) in &bs {
                let _ = writeln!(
                    y,
                    "    # suggested: none of the {na} sessions that reached {} reached {} \
                     afterwards ({nb} session{} reached it)",
                    names[&a],
                    names[b],
                    if *nb == 1 { "" } else { "s" }
                );
            }
            let deny: Vec<&str> = bs.iter().map(|(b, _, _)| names[b].as_str()).collect();
            let _ = writeln!(
                y,
                "    - {{ after: [{}], deny: [{}] }}",
                names[&a],
                deny.join(", ")
            );
        }
    }
    y
}

#[cfg(test)]
#[path = "suggest_tests.rs"]
mod tests;
