//! YAML documents → [`PolicyDoc`]s: shape, field names and every single value are checked here,
//! all problems reported (not only the first).

use crate::{
    compiled::{Action, Approval, Mode},
    identity::IdentityPattern,
};

use super::{
    ast::{ChainDef, ConnectDef, ExecDef, ExecPath, GrantDef, PolicyDoc, ZoneDef},
    diag::{Sink, Spanned},
    fields::{self, Fields},
    yaml::{Kind, Node},
};

pub const API_VERSION: &str = "corral.dev/v1alpha1";
pub const KIND: &str = "AgentPolicy";

/// Every non-empty document of a file as a policy (invalid ones reported and left out).
pub fn documents(nodes: &[Node], sink: &mut Sink) -> Vec<PolicyDoc> {
    nodes
        .iter()
        .filter(|n| !n.is_null())
        .filter_map(|n| document(n, sink))
        .collect()
}

fn document(node: &Node, sink: &mut Sink) -> Option<PolicyDoc> {
    let f = Fields::of(
        node,
        "policy document",
        &["apiVersion", "kind", "metadata", "spec"],
        sink,
    )?;
    if let Some(v) = f.require("apiVersion", "policy document", API_VERSION, sink)
        && let Some(t) = fields::text(v, "apiVersion", sink)
        && t.value != API_VERSION
    {
        sink.error(
            t.pos,
            format!(
                "apiVersion `{}` is not supported: write `{API_VERSION}`",
                t.value
            ),
        );
    }
    if let Some(v) = f.require("kind", "policy document", KIND, sink)
        && let Some(t) = fields::text(v, "kind", sink)
        && t.value != KIND
    {
        sink.error(
            t.pos,
            format!("kind `{}` is not supported: write `{KIND}`", t.value),
        );
    }
    let name = f
        .require("metadata", "policy document", "{ name: my-policy }", sink)
        .and_then(|m| Fields::of(m, "metadata", &["name"], sink))
        .and_then(|m| {
            m.require("name", "metadata", "my-policy", sink)
                .and_then(|n| fields::name(n, "policy name", sink))
        });
    let spec_node = f.require("spec", "policy document", "{ identities: [...] }", sink)?;
    let spec = Fields::of(
        spec_node,
        "spec",
        &[
            "identities",
            "mode",
            "defaultAction",
            "zones",
            "connect",
            "exec",
            "chaining",
            "grants",
            "dns",
        ],
        sink,
    )?;
    let dns_allow_unlisted = spec
        .get("dns")
        .and_then(|n| Fields::of(n, "dns", &["allowUnlisted"], sink))
        .and_then(|d| {
            d.get("allowUnlisted")
                .map(|n| fields::boolean(n, "allowUnlisted", sink))
        })
        .flatten()
        .unwrap_or(false);
    let identities = spec
        .require("identities", "spec", "[spiffe://example.org/agent/*]", sink)
        .map(|n| identities(n, sink))
        .unwrap_or_default();
    let mode = spec
        .get("mode")
        .map(|n| {
            fields::choice(
                n,
                "mode",
                &[("enforce", Mode::Enforce), ("audit", Mode::Audit)],
                sink,
            )
        })
        .unwrap_or(Some(Mode::Enforce));
    let default_action = spec
        .get("defaultAction")
        .map(|n| fields::choice(n, "defaultAction", ACTIONS, sink))
        .unwrap_or(Some(Action::Deny));
    let zones = spec
        .get("zones")
        .map(|n| zones(n, sink))
        .unwrap_or_default();
    let connect = list_of(
        spec.get("connect"),
        "connect",
        "{ action: allow, zones: [local] }",
        sink,
        connect_rule,
    );
    let exec = list_of(
        spec.get("exec"),
        "exec",
        "{ action: allow, paths: [/usr/bin/git] }",
        sink,
        exec_rule,
    );
    let chaining = list_of(
        spec.get("chaining"),
        "chaining",
        "{ after: [a], deny: [b] }",
        sink,
        chain_rule,
    );
    let grants = list_of(
        spec.get("grants"),
        "grants",
        "{ name: g, zones: [a], maxTtl: 15m }",
        sink,
        grant,
    );
    Some(PolicyDoc {
        pos: node.pos,
        name: name?,
        identities,
        mode: mode?,
        default_action: default_action?,
        zones,
        connect,
        exec,
        chaining,
        grants,
        dns_allow_unlisted,
    })
}

const ACTIONS: &[(&str, Action)] = &[("allow", Action::Allow), ("deny", Action::Deny)];

fn list_of<T>(
    node: Option<&Node>,
    what: &str,
    example: &str,
    sink: &mut Sink,
    item: fn(&Node, &mut Sink) -> Option<T>,
) -> Vec<T> {
    let Some(node) = node else {
        return Vec::new();
    };
    fields::items(node, what, example, sink)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| item(n, sink))
        .collect()
}

fn identities(node: &Node, sink: &mut Sink) -> Vec<Spanned<IdentityPattern>> {
    let Some(items) = fields::items(node, "identities", "spiffe://example.org/agent/*", sink)
    else {
        return Vec::new();
    };
    if items.is_empty() {
        sink.error(
            node.pos,
            "identities is empty: list at least one SPIFFE ID pattern, e.g. \
             `[spiffe://example.org/agent/*]`",
        );
    }
    items
        .iter()
        .filter_map(|n| {
            let t = fields::text(n, "identity", sink)?;
            match IdentityPattern::parse(&t.value) {
                Ok(p) => Some(Spanned::new(p, t.pos)),
                Err(e) => {
                    sink.error(
                        t.pos,
                        format!("{e}; e.g. `spiffe://example.org/agent/research/*`"),
                    );
                    None
                }
            }
        })
        .collect()
}

fn zones(node: &Node, sink: &mut Sink) -> Vec<ZoneDef> {
    let Kind::Map(entries) = &node.kind else {
        if !node.is_null() {
            sink.error(
                node.pos,
                format!(
                    "zones must be a mapping from zone name to `{{ cidrs: [...] }}`, not {}",
                    node.describe()
                ),
            );
        }
        return Vec::new();
    };
    let mut out: Vec<ZoneDef> = Vec::new();
    for (k, v) in entries {
        let Some(name) = fields::name(k, "zone name", sink) else {
            continue;
        };
        if let Some(first) = out.iter().find(|z| z.name.value == name.value) {
            sink.error(
                name.pos,
                format!(
                    "zone `{}` is defined twice (first at {}): merge the two or rename one",
                    name.value, first.name.pos
                ),
            );
            continue;
        }
        let Some(f) = Fields::of(
            v,
            &format!("zone `{}`", name.value),
            &["cidrs", "unix", "hosts"],
            sink,
        ) else {
            continue;
        };
        let nets: Vec<_> = f
            .get("cidrs")
            .and_then(|n| fields::items(n, "cidrs", "10.0.0.0/8", sink))
            .unwrap_or_default()
            .iter()
            .filter_map(|n| fields::cidr(n, sink))
            .collect();
        let unix: Vec<_> = f
            .get("unix")
            .and_then(|n| fields::items(n, "unix", "/var/run/docker.sock", sink))
            .unwrap_or_default()
            .iter()
            .filter_map(|n| fields::unix_path(n, sink))
            .collect();
        let hosts: Vec<_> = f
            .get("hosts")
            .and_then(|n| fields::items(n, "hosts", "api.github.com", sink))
            .unwrap_or_default()
            .iter()
            .filter_map(|n| fields::host(n, sink))
            .collect();
        let written = |k: &str| {
            f.get(k)
                .and_then(|n| match &n.kind {
                    Kind::Seq(s) => Some(!s.is_empty()),
                    _ => None,
                })
                .unwrap_or(false)
        };
        if !written("cidrs") && !written("unix") && !written("hosts") {
            sink.error(
                v.pos,
                format!(
                    "zone `{}` has no destinations: add `cidrs: [10.0.0.0/8]`, \
                     `hosts: [api.github.com]` or `unix: [/path/to.sock]`",
                    name.value
                ),
            );
        }
        out.push(ZoneDef {
            name,
            nets,
            unix,
            hosts,
        });
    }
    out
}

fn zone_refs(node: Option<&Node>, what: &str, sink: &mut Sink) -> Vec<Spanned<String>> {
    let Some(node) = node else {
        return Vec::new();
    };
    let refs: Vec<_> = fields::items(node, what, "zone-name", sink)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| fields::text(n, "zone name", sink))
        .collect();
    if node.is_null() || matches!(&node.kind, Kind::Seq(s) if s.is_empty()) {
        sink.error(
            node.pos,
            format!("{what} is empty: list at least one zone name"),
        );
    }
    refs
}

fn ports_protocols(f: &Fields<'_>, sink: &mut Sink) -> (Vec<u16>, Vec<u8>) {
    let ports: Vec<u16> = f
        .get("ports")
        .and_then(|n| fields::items(n, "ports", "443", sink))
        .unwrap_or_default()
        .iter()
        .filter_map(|n| fields::port(n, sink))
        .collect();
    let protocols = f
        .get("protocols")
        .and_then(|n| fields::items(n, "protocols", "tcp", sink))
        .unwrap_or_default()
        .iter()
        .filter_map(|n| fields::protocol(n, sink))
        .collect::<Vec<u8>>();
    if !ports.is_empty()
        && protocols.contains(&agent_common::PROTO_ICMP)
        && let Some(n) = f.get("protocols")
    {
        sink.error(
            n.pos,
            "icmp has no ports: give it a rule of its own without `ports`",
        );
    }
    (ports, protocols)
}

/// A rule naming `vsock` must be `{ action: allow, protocols: [vsock] }`: the kernel has no
/// connect hook for AF_VSOCK, so Corral decides the family whole (no zones, no ports, no
/// other protocol), and a principal gets it only from an allow rule.
fn vsock_rule(
    f: &Fields<'_>,
    action: Option<Action>,
    ports: &[u16],
    protocols: &[u8],
    sink: &mut Sink,
) {
    const WRITE: &str = "write `{ action: allow, protocols: [vsock] }` as a rule of its own";
    if let Some(n) = f.get("zones") {
        sink.error(
            n.pos,
            format!(
                "vsock has no zones: the kernel has no connect hook for AF_VSOCK, so a rule \
                 naming it allows the family whole; {WRITE}"
            ),
        );
    }
    if let Some(n) = f.get("ports").filter(|_| !ports.is_empty()) {
        sink.error(n.pos, format!("vsock has no ports here: {WRITE}"));
    }
    if let Some(n) = f.get("protocols").filter(|_| protocols.len() > 1) {
        sink.error(
            n.pos,
            format!("vsock cannot share a rule with other protocols: {WRITE}"),
        );
    }
    if action == Some(Action::Deny)
        && let Some(n) = f.get("action")
    {
        sink.error(
            n.pos,
            "a deny rule naming vsock changes nothing: principals get no vsock socket unless \
             an allow rule names it",
        );
    }
}

fn connect_rule(node: &Node, sink: &mut Sink) -> Option<ConnectDef> {
    let f = Fields::of(
        node,
        "connect rule",
        &["action", "zones", "ports", "protocols"],
        sink,
    )?;
    let action = f
        .require("action", "connect rule", "allow", sink)
        .and_then(|n| fields::choice(n, "action", ACTIONS, sink));
    let (ports, protocols) = ports_protocols(&f, sink);
    let zones = if protocols.contains(&agent_common::PROTO_VSOCK) {
        vsock_rule(&f, action, &ports, &protocols, sink);
        Vec::new()
    } else {
        let zone_node = f.require("zones", "connect rule", "[zone-name]", sink);
        zone_refs(zone_node, "zones", sink)
    };
    Some(ConnectDef {
        pos: node.pos,
        action: action?,
        zones,
        ports,
        protocols,
    })
}

fn exec_rule(node: &Node, sink: &mut Sink) -> Option<ExecDef> {
    let f = Fields::of(node, "exec rule", &["action", "paths"], sink)?;
    let action = f
        .require("action", "exec rule", "allow", sink)
        .and_then(|n| fields::choice(n, "action", ACTIONS, sink));
    let paths_node = f.require("paths", "exec rule", "[/usr/bin/git]", sink)?;
    let items = fields::items(paths_node, "paths", "/usr/bin/git", sink)?;
    if items.is_empty() {
        sink.error(
            paths_node.pos,
            "paths is empty: list at least one path, e.g. `[/usr/bin/git]`",
        );
    }
    let paths = items.iter().filter_map(|n| exec_path(n, sink)).collect();
    Some(ExecDef {
        pos: node.pos,
        action: action?,
        paths,
    })
}

fn exec_path(node: &Node, sink: &mut Sink) -> Option<Spanned<ExecPath>> {
    let t = fields::text(node, "exec path", sink)?;
    let (body, prefix) = match t.value.strip_suffix("/**") {
        Some(b) => (b, true),
        None => (t.value.as_str(), false),
    };
    let valid_dir = |b: &str| {
        b.starts_with('/')
            && b.split('/')
                .skip(1)
                .all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains('*'))
    };
    // `/**` alone (empty body) is every path.
    let ok = !t.value.contains('\0')
        && t.value.len() < 4096
        && if body.is_empty() {
            prefix
        } else {
            valid_dir(body)
        };
    if !ok {
        sink.error(
            t.pos,
            format!(
                "exec path `{}` is not valid: write an absolute path without `.`, `..`, `//` or \
                 wildcards, e.g. `/usr/bin/git`, or a directory followed by `/**`, e.g. `/opt/agent/**`",
                t.value
            ),
        );
        return None;
    }
    let path = if prefix {
        ExecPath::Prefix(format!("{body}/"))
    } else {
        ExecPath::Exact(body.to_owned())
    };
    Some(Spanned::new(path, t.pos))
}

fn chain_rule(node: &Node, sink: &mut Sink) -> Option<ChainDef> {
    let f = Fields::of(node, "chaining rule", &["after", "deny"], sink)?;
    let after = f.require("after", "chaining rule", "[internal-data]", sink);
    let after = zone_refs(after, "after", sink);
    let deny = f.require("deny", "chaining rule", "[internet]", sink);
    let deny = zone_refs(deny, "deny", sink);
    Some(ChainDef {
        pos: node.pos,
        after,
        deny,
    })
}

fn grant(node: &Node, sink: &mut Sink) -> Option<GrantDef> {
    let f = Fields::of(
        node,
        "grant",
        &["name", "zones", "ports", "protocols", "maxTtl", "approval"],
        sink,
    )?;
    let name = f
        .require("name", "grant", "crm-write", sink)
        .and_then(|n| fields::name(n, "grant name", sink));
    let zones = zone_refs(
        f.require("zones", "grant", "[zone-name]", sink),
        "zones",
        sink,
    );
    let (ports, protocols) = ports_protocols(&f, sink);
    let max_ttl = f
        .require("maxTtl", "grant", "15m", sink)
        .and_then(|n| fields::ttl(n, sink));
    let approval = f
        .get("approval")
        .map(|n| {
            fields::choice(
                n,
                "approval",
                &[("required", Approval::Required), ("auto", Approval::Auto)],
                sink,
            )
        })
        .unwrap_or(Some(Approval::Required));
    Some(GrantDef {
        pos: node.pos,
        name: name?,
        zones,
        ports,
        protocols,
        max_ttl: max_ttl?,
        approval: approval?,
    })
}
