//! Reading typed values out of YAML nodes, reporting every mismatch at the node's position
//! with a message that says what to write instead.

use std::{net::IpAddr, time::Duration};

use crate::compiled::Net;

use super::{
    diag::{Pos, Sink, Spanned},
    yaml::{Kind, Node},
};

/// Longest TTL a grant template may allow. Longer access is a policy change, not a grant.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The fields of one YAML mapping, checked against the names the mapping may have.
pub struct Fields<'a> {
    pub pos: Pos,
    entries: Vec<(&'a str, &'a Node, Pos)>,
}

impl<'a> Fields<'a> {
    /// `None` (reported) if `node` is not a mapping. Unknown and repeated keys are reported.
    pub fn of(node: &'a Node, what: &str, allowed: &[&str], sink: &mut Sink) -> Option<Self> {
        let Kind::Map(map) = &node.kind else {
            sink.error(
                node.pos,
                format!(
                    "{what} must be a mapping with fields {}, not {}",
                    list_names(allowed),
                    node.describe()
                ),
            );
            return None;
        };
        let mut entries: Vec<(&'a str, &'a Node, Pos)> = Vec::new();
        for (k, v) in map {
            let Kind::Scalar { text: key, .. } = &k.kind else {
                sink.error(k.pos, format!("{what}: field names must be plain words"));
                continue;
            };
            if let Some((_, _, first)) = entries.iter().find(|(n, _, _)| *n == key) {
                sink.error(
                    k.pos,
                    format!("{what}: field `{key}` is given twice (first at {first}): keep one"),
                );
                continue;
            }
            if !allowed.contains(&key.as_str()) {
                let hint = suggest(key, allowed)
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                sink.error(
                    k.pos,
                    format!(
                        "{what}: unknown field `{key}`: {hint}expected one of {}",
                        list_names(allowed)
                    ),
                );
                continue;
            }
            entries.push((key.as_str(), v, k.pos));
        }
        Some(Self {
            pos: node.pos,
            entries,
        })
    }

    pub fn get(&self, name: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, v, _)| *v)
    }

    /// Like [`Self::get`], but a missing field is reported.
    pub fn require(
        &self,
        name: &str,
        what: &str,
        example: &str,
        sink: &mut Sink,
    ) -> Option<&'a Node> {
        let v = self.get(name);
        if v.is_none() {
            sink.error(
                self.pos,
                format!("{what}: missing field `{name}`: add e.g. `{name}: {example}`"),
            );
        }
        v
    }
}

fn list_names(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The allowed name closest to `got` (by case-insensitive edit distance), if close.
fn suggest<'n>(got: &str, allowed: &[&'n str]) -> Option<&'n str> {
    let got = got.to_ascii_lowercase();
    allowed
        .iter()
        .map(|a| (edit_distance(&got, &a.to_ascii_lowercase()), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A non-empty text value.
pub fn text(node: &Node, what: &str, sink: &mut Sink) -> Option<Spanned<String>> {
    match &node.kind {
        Kind::Scalar { text, .. } if !node.is_null() => Some(Spanned::new(text.clone(), node.pos)),
        _ => {
            sink.error(
                node.pos,
                format!(
                    "{what} must be a single text value, not {}",
                    node.describe()
                ),
            );
            None
        }
    }
}

/// The items of a list (`null` counts as an empty list).
pub fn items<'a>(node: &'a Node, what: &str, example: &str, sink: &mut Sink) -> Option<&'a [Node]> {
    match &node.kind {
        Kind::Seq(items) => Some(items),
        _ if node.is_null() => Some(&[]),
        _ => {
            sink.error(
                node.pos,
                format!(
                    "{what} must be a list, e.g. `[{example}]`, not {}",
                    node.describe()
                ),
            );
            None
        }
    }
}

/// One of `choices`, written exactly.
pub fn choice<T: Copy>(
    node: &Node,
    what: &str,
    choices: &[(&str, T)],
    sink: &mut Sink,
) -> Option<T> {
    let t = text(node, what, sink)?;
    let found = choices.iter().find(|(n, _)| *n == t.value).map(|(_, v)| *v);
    if found.is_none() {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        sink.error(
            node.pos,
            format!(
                "{what} `{}` is not valid: write one of {}",
                t.value,
                list_names(&names)
            ),
        );
    }
    found
}

/// A name: lowercase letters, digits and `-`, starting with a letter or digit, at most 63.
pub fn name(node: &Node, what: &str, sink: &mut Sink) -> Option<Spanned<String>> {
    let t = text(node, what, sink)?;
    let ok = t.value.len() <= 63
        && t.value
            .starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && t.value
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
    if !ok {
        sink.error(
            t.pos,
            format!(
                "{what} `{}` is not valid: use at most 63 lowercase letters, digits, `-` or `_`, \
                 starting with a letter or digit (e.g. `internal-data`)",
                t.value
            ),
        );
        return None;
    }
    Some(t)
}

/// A port number, 1..=65535.
pub fn port(node: &Node, sink: &mut Sink) -> Option<u16> {
    let (msg, ok) = match &node.kind {
        Kind::Scalar { text, plain } => match text.parse::<u64>() {
            Ok(n) if (1..=65535).contains(&n) && *plain => ("", u16::try_from(n).ok()),
            Ok(n) if (1..=65535).contains(&n) => {
                ("is quoted: write the number without quotes", None)
            }
            Ok(_) => ("is out of range: write a number from 1 to 65535", None),
            Err(_) => ("is not a port: write a number from 1 to 65535", None),
        },
        _ => ("is not a port: write a number from 1 to 65535", None),
    };
    if ok.is_none() {
        sink.error(
            node.pos,
            format!(
                "port `{}` {msg} (omit `ports` for any port)",
                scalar_text(node)
            ),
        );
    }
    ok
}

fn scalar_text(node: &Node) -> String {
    match &node.kind {
        Kind::Scalar { text, .. } => text.clone(),
        _ => node.describe().into(),
    }
}

/// `tcp`, `udp` or `icmp` (echo, IPv4 and IPv6), as the IP protocol number; or `vsock` (the
/// address family, [`agent_common::PROTO_VSOCK`]).
pub fn protocol(node: &Node, sink: &mut Sink) -> Option<u8> {
    choice(
        node,
        "protocol",
        &[
            ("tcp", agent_common::PROTO_TCP),
            ("udp", agent_common::PROTO_UDP),
            ("icmp", agent_common::PROTO_ICMP),
            ("vsock", agent_common::PROTO_VSOCK),
        ],
        sink,
    )
}

/// A CIDR with its prefix length written out and no host bits set.
pub fn cidr(node: &Node, sink: &mut Sink) -> Option<Spanned<Net>> {
    let t = text(node, "CIDR", sink)?;
    let Some((addr, bits)) = t.value.split_once('/') else {
        sink.error(
            t.pos,
            format!(
                "CIDR `{}` has no prefix length: write e.g. `{}/32` for one IPv4 host or `/128` for IPv6",
                t.value, t.value
            ),
        );
        return None;
    };
    let addr: Option<IpAddr> = addr.parse().ok();
    let bits: Option<u8> = bits.parse().ok();
    let net = addr
        .zip(bits)
        .and_then(|(a, b)| Net::new(a, b).map(|n| (a, n)));
    let Some((addr, net)) = net else {
        sink.error(
            t.pos,
            format!(
                "`{}` is not a valid CIDR: write an IPv4 or IPv6 address, `/`, and a prefix length \
                 (0-32 for IPv4, 0-128 for IPv6), e.g. `10.20.0.0/16` or `fd00:20::/32`",
                t.value
            ),
        );
        return None;
    };
    if crate::compiled::to_mapped(addr) != net_addr(&net) {
        let shown = match addr {
            IpAddr::V4(_) => format!(
                "{}/{}",
                net_addr(&net)
                    .to_ipv4_mapped()
                    .map_or_else(String::new, |a| a.to_string()),
                net.bits() - 96
            ),
            IpAddr::V6(_) => format!("{}/{}", net_addr(&net), net.bits()),
        };
        sink.error(
            t.pos,
            format!("CIDR `{}` has host bits set: write `{shown}`", t.value),
        );
        return None;
    }
    Some(Spanned::new(net, t.pos))
}

fn net_addr(net: &Net) -> std::net::Ipv6Addr {
    crate::compiled::addr_from_words(&net.kernel_addr())
}

/// A unix socket path: absolute, or an abstract name starting with `@`.
pub fn unix_path(node: &Node, sink: &mut Sink) -> Option<Spanned<String>> {
    let t = text(node, "unix socket", sink)?;
    let ok = (t.value.starts_with('/') || (t.value.starts_with('@') && t.value.len() > 1))
        && t.value.len() <= 107
        && !t.value.contains('\0');
    if !ok {
        sink.error(
            t.pos,
            format!(
                "unix socket `{}` is not valid: write an absolute path such as \
                 `/var/run/docker.sock`, or `@name` for an abstract socket (at most 107 bytes)",
                t.value
            ),
        );
        return None;
    }
    Some(t)
}

/// A host pattern of a zone (see [`crate::hosts`]).
pub fn host(node: &Node, sink: &mut Sink) -> Option<Spanned<crate::hosts::HostPattern>> {
    let t = text(node, "host", sink)?;
    match crate::hosts::HostPattern::parse(&t.value) {
        Ok(p) => Some(Spanned {
            pos: t.pos,
            value: p,
        }),
        Err(e) => {
            sink.error(t.pos, e);
            None
        }
    }
}

/// `true` or `false`.
pub fn boolean(node: &Node, what: &str, sink: &mut Sink) -> Option<bool> {
    choice(node, what, &[("true", true), ("false", false)], sink)
}

/// A duration such as `90s`, `15m`, `1h30m`; above zero and at most [`MAX_TTL`].
pub fn ttl(node: &Node, sink: &mut Sink) -> Option<Duration> {
    let t = text(node, "maxTtl", sink)?;
    match parse_duration(&t.value) {
        Some(d) if d.is_zero() => {
            sink.error(t.pos, "maxTtl must be above zero: write e.g. `15m`");
            None
        }
        Some(d) if d > MAX_TTL => {
            sink.error(
                t.pos,
                format!(
                    "maxTtl `{}` is above the limit of 24h: write at most `24h` \
                     (longer access belongs in the policy itself)",
                    t.value
                ),
            );
            None
        }
        Some(d) => Some(d),
        None => {
            sink.error(
                t.pos,
                format!(
                    "maxTtl `{}` is not a duration: write a number and a unit (`s`, `m`, `h`), \
                     e.g. `90s`, `15m`, `1h30m`",
                    t.value
                ),
            );
            None
        }
    }
}

/// `1h30m` → 5400 s. Units `h`, `m`, `s`, each at most once, in that order.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut last_unit = 0usize;
    if s.is_empty() {
        return None;
    }
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let (rank, secs) = match c {
            'h' => (1, 3600),
            'm' => (2, 60),
            's' => (3, 1),
            _ => return None,
        };
        if num.is_empty() || rank <= last_unit || num.len() > 9 {
            return None;
        }
        last_unit = rank;
        total = total.checked_add(num.parse::<u64>().ok()?.checked_mul(secs)?)?;
        num.clear();
    }
    if !num.is_empty() {
        return None;
    }
    Some(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m1h"), None);
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("defaultaction", &["mode", "defaultAction"]),
            Some("defaultAction")
        );
        assert_eq!(suggest("zonez", &["zones", "connect"]), Some("zones"));
        assert_eq!(suggest("xyzzy", &["zones", "connect"]), None);
    }
}
