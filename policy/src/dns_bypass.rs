//! The ways around the DNS proxy, closed for policies with zones by host name (unless
//! `spec.dns.allowUnlisted`): a principal that may not ask the proxy for a name could ask
//! someone else. Port 53 to any address is redirected to the proxy in the kernel; this adds
//! rules for what the redirect cannot see:
//! - **Known DNS-over-HTTPS / DNS-over-TLS resolvers** ([`KNOWN_RESOLVERS`]): a zone
//!   `(dns-bypass)` with their addresses and a rule denying it everything. It is the most
//!   specific prefix for those addresses, so `internet: 0.0.0.0/0` does not open them; a zone
//!   that names one of them exactly (`/32`, `/128`) takes it out, and its own rules decide.
//! - **DNS over TLS (853)**: a rule denying port 853 in every zone that no allow rule names
//!   port 853 for explicitly, and, under `defaultAction: allow`, in a zone `(any)` holding
//!   the addresses in no zone (`0.0.0.0/0`, `::/0`, where no zone has them).
//!
//! The added zones and rules are ordinary ones (names in parentheses, which no policy can
//! define), so `explain`, events and the kernel treat them like any other; their source
//! position is the policy's.

use std::net::IpAddr;

use crate::compiled::{Action, CompiledPolicy, ConnectRule, Net, Zone};

/// Name of the zone of known DoH/DoT resolvers.
pub const BYPASS_ZONE: &str = "(dns-bypass)";
/// Name of the zone of addresses in no other zone (only under `defaultAction: allow`).
pub const ANY_ZONE: &str = "(any)";
/// DNS over TLS.
pub const DOT_PORT: u16 = 853;

/// Public resolvers that answer DNS over HTTPS or TLS (their anycast addresses).
pub const KNOWN_RESOLVERS: &[&str] = &[
    // Cloudflare
    "1.1.1.1",
    "1.0.0.1",
    "1.1.1.2",
    "1.0.0.2",
    "1.1.1.3",
    "1.0.0.3",
    "2606:4700:4700::1111",
    "2606:4700:4700::1001",
    // Google
    "8.8.8.8",
    "8.8.4.4",
    "2001:4860:4860::8888",
    "2001:4860:4860::8844",
    // Quad9
    "9.9.9.9",
    "149.112.112.112",
    "9.9.9.10",
    "9.9.9.11",
    "2620:fe::fe",
    "2620:fe::9",
    // OpenDNS
    "208.67.222.222",
    "208.67.220.220",
    "2620:119:35::35",
    "2620:119:53::53",
    // AdGuard
    "94.140.14.14",
    "94.140.15.15",
    "2a10:50c0::ad1:ff",
    "2a10:50c0::ad2:ff",
    // CleanBrowsing
    "185.228.168.9",
    "185.228.169.9",
    // NextDNS
    "45.90.28.0",
    "45.90.30.0",
    // Mullvad
    "194.242.2.2",
    // Control D
    "76.76.2.0",
    "76.76.10.0",
];

fn host_net(ip: IpAddr) -> Option<Net> {
    Net::new(ip, if ip.is_ipv4() { 32 } else { 128 })
}

/// Adds the zones and rules closing the bypasses to `p`, if it has zones by host name and does
/// not allow unlisted names.
pub fn close(p: &mut CompiledPolicy) {
    if !p.has_hosts() || p.dns_allow_unlisted {
        return;
    }
    let named: Vec<Net> = p
        .zones
        .iter()
        .flat_map(|z| z.nets.iter().copied())
        .collect();
    let pos = p.source.policy;
    let next_rule = |p: &CompiledPolicy| u32::try_from(p.connect.len()).unwrap_or(u32::MAX);
    let add_zone = |p: &mut CompiledPolicy, name: &str, nets: Vec<Net>| {
        p.zones.push(Zone {
            name: name.to_owned(),
            nets,
        });
        p.source.zones.push(pos);
        u32::try_from(p.zones.len() - 1).unwrap_or(u32::MAX)
    };
    // Zones where a rule allows 853 by name: DoT there is what the policy says.
    let dot_allowed: Vec<u32> = p
        .connect
        .iter()
        .filter(|r| r.action == Action::Allow && r.ports.contains(&DOT_PORT))
        .flat_map(|r| r.zones.iter().copied())
        .collect();
    let mut dot_zones: Vec<u32> = (0..p.zones.len())
        .filter_map(|i| u32::try_from(i).ok())
        .filter(|i| !dot_allowed.contains(i))
        .collect();

    let resolvers: Vec<Net> = KNOWN_RESOLVERS
        .iter()
        .filter_map(|a| a.parse().ok().and_then(host_net))
        .filter(|n| !named.contains(n))
        .collect();
    if !resolvers.is_empty() {
        let z = add_zone(p, BYPASS_ZONE, resolvers);
        let index = next_rule(p);
        p.connect.push(ConnectRule {
            index,
            action: Action::Deny,
            zones: vec![z],
            ports: Vec::new(),
            protocols: Vec::new(),
        });
        p.source.connect.push(pos);
    }
    if p.default_action == Action::Allow {
        let all: Vec<Net> = ["0.0.0.0", "::"]
            .iter()
            .filter_map(|a| a.parse().ok().and_then(|ip| Net::new(ip, 0)))
            .filter(|n| !named.contains(n))
            .collect();
        if !all.is_empty() {
            dot_zones.push(add_zone(p, ANY_ZONE, all));
        }
    }
    if !dot_zones.is_empty() {
        let index = next_rule(p);
        p.connect.push(ConnectRule {
            index,
            action: Action::Deny,
            zones: dot_zones,
            ports: vec![DOT_PORT],
            protocols: Vec::new(),
        });
        p.source.connect.push(pos);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use agent_common::{PROTO_TCP, PROTO_UDP};

    use crate::{
        compile_str,
        eval::{self, ConnectCall, PrincipalState, Verdict},
    };

    fn verdicts(src: &str, calls: &[(&str, u16, u8)]) -> Vec<Verdict> {
        let set = compile_str("p.yaml", src, 1).expect("compiles");
        let p = &set.policies[0];
        let st = PrincipalState::default();
        calls
            .iter()
            .map(|(a, port, proto)| {
                let addr: IpAddr = a.parse().expect("addr");
                eval::connect(
                    Some(p),
                    &st,
                    &ConnectCall {
                        addr,
                        port: *port,
                        proto: *proto,
                    },
                    0,
                )
                .verdict
            })
            .collect()
    }

    fn policy(default: &str, dns: &str, extra_zones: &str, extra_rules: &str) -> String {
        format!(
            "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: {{ name: p }}
spec:
  identities: [spiffe://e.org/a/*]
  defaultAction: {default}
  {dns}
  zones:
    api: {{ hosts: [api.example.com] }}
    internet: {{ cidrs: [0.0.0.0/0, \"::/0\"] }}
{extra_zones}
  connect:
    - {{ action: allow, zones: [internet], ports: [443, 853] }}
    - {{ action: allow, zones: [internet], ports: [8443] }}
{extra_rules}
"
        )
    }

    #[test]
    fn known_resolvers_and_dot_are_closed_unless_named() {
        use Verdict::{Allow, Deny};
        let tcp = PROTO_TCP;
        // `internet` allows 443 and names 853: a known resolver is still closed, on any port
        // and family; another address on 853 is what the rule says.
        let src = policy("deny", "", "", "");
        assert_eq!(
            verdicts(
                &src,
                &[
                    ("1.1.1.1", 443, tcp),
                    ("8.8.8.8", 853, tcp),
                    ("2606:4700:4700::1111", 443, tcp),
                    ("203.0.113.9", 443, tcp),
                    ("203.0.113.9", 853, tcp),
                ]
            ),
            [Deny, Deny, Deny, Allow, Allow]
        );
        // Named exactly in a zone: that zone's rules decide.
        let src = policy(
            "deny",
            "",
            "    cloudflare: { cidrs: [1.1.1.1/32] }",
            "    - { action: allow, zones: [cloudflare], ports: [443] }",
        );
        assert_eq!(
            verdicts(&src, &[("1.1.1.1", 443, tcp), ("1.0.0.1", 443, tcp)]),
            [Allow, Deny]
        );
    }

    #[test]
    fn dot_is_closed_where_no_rule_names_port_853() {
        use Verdict::{Allow, Deny};
        let (tcp, udp) = (PROTO_TCP, PROTO_UDP);
        // Under default allow, 853 is closed everywhere but where a rule names it.
        let src = "apiVersion: corral.dev/v1alpha1
kind: AgentPolicy
metadata: { name: p }
spec:
  identities: [spiffe://e.org/a/*]
  defaultAction: allow
  zones:
    api: { hosts: [api.example.com] }
    lan: { cidrs: [10.0.0.0/8] }
    dot: { cidrs: [192.0.2.0/24] }
  connect:
    - { action: allow, zones: [dot], ports: [853] }
";
        assert_eq!(
            verdicts(
                src,
                &[
                    ("10.1.1.1", 853, tcp),
                    ("10.1.1.1", 443, tcp),
                    ("203.0.113.9", 853, udp),
                    ("203.0.113.9", 80, tcp),
                    ("192.0.2.1", 853, tcp),
                ]
            ),
            [Deny, Allow, Deny, Allow, Allow]
        );
    }

    #[test]
    fn nothing_is_added_without_hosts_or_with_allow_unlisted() {
        use Verdict::Allow;
        let tcp = PROTO_TCP;
        let src = policy("deny", "dns: { allowUnlisted: true }", "", "");
        assert_eq!(verdicts(&src, &[("1.1.1.1", 443, tcp)]), [Allow]);
        let set = compile_str("p.yaml", &src, 1).expect("compiles");
        assert_eq!(set.policies[0].zones.len(), 2);
        let no_hosts = src.replace(
            "api: { hosts: [api.example.com] }",
            "api: { cidrs: [10.0.0.0/8] }",
        );
        assert_eq!(verdicts(&no_hosts, &[("8.8.8.8", 853, tcp)]), [Allow]);
    }
}
