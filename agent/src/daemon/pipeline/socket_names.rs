//! Names for a containment guard's socket event (`SocketCall`): address family, socket type,
//! protocol and option, as `corral events` prints them.

use agent_common::{HOOK_SETSOCKOPT, HOOK_SOCK_CREATE, HOOK_SOCKET_SYSCALL};

pub fn family(f: u16) -> String {
    match f {
        1 => "unix".into(),
        2 => "ipv4".into(),
        10 => "ipv6".into(),
        16 => "netlink".into(),
        17 => "packet".into(),
        40 => "vsock".into(),
        44 => "xdp".into(),
        n => format!("family {n}"),
    }
}

pub fn sock_type(t: u16) -> String {
    // The kernel's type field may carry SOCK_NONBLOCK/SOCK_CLOEXEC bits above the type.
    match t & 0xf {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        5 => "seqpacket".into(),
        n => format!("type {n}"),
    }
}

pub fn protocol(family: u16, p: u16) -> String {
    match (family, p) {
        (2 | 10, 0) => "ip".into(),
        (2 | 10, 1) => "icmp".into(),
        (2 | 10, 6) => "tcp".into(),
        (2 | 10, 17) => "udp".into(),
        (2 | 10, 58) => "icmpv6".into(),
        (2 | 10, 132) => "sctp".into(),
        (2 | 10, 255) => "raw".into(),
        (_, n) => format!("proto {n}"),
    }
}

pub fn hook(h: u8) -> &'static str {
    match h {
        HOOK_SOCK_CREATE => "sock_create",
        HOOK_SETSOCKOPT => "setsockopt",
        HOOK_SOCKET_SYSCALL => "sys_enter_socket",
        agent_common::HOOK_ROUTE_EGRESS => "egress_route",
        _ => "unknown",
    }
}

pub fn option(level: u32, optname: u32) -> String {
    match (level, optname) {
        (0, 0) => String::new(),
        (0, 4) => "IP_OPTIONS".into(),
        (41, 57) => "IPV6_RTHDR".into(),
        (41, 5) => "IPV6_2292RTHDR".into(),
        (41, 6) => "IPV6_2292PKTOPTIONS".into(),
        (l, o) => format!("level {l} option {o}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refused_sockets_read_as_people_know_them() {
        assert_eq!(
            [family(2), sock_type(3), protocol(2, 1)],
            ["ipv4", "raw", "icmp"]
        );
        assert_eq!(
            [family(10), sock_type(2), protocol(10, 58)],
            ["ipv6", "dgram", "icmpv6"]
        );
        assert_eq!([family(40), family(99)], ["vsock", "family 99"]);
        // SOCK_NONBLOCK | SOCK_DGRAM
        assert_eq!(sock_type(0o4000 | 2), "dgram");
        assert_eq!(option(0, 4), "IP_OPTIONS");
        assert_eq!(option(41, 57), "IPV6_RTHDR");
        assert_eq!(option(0, 0), "");
        assert_eq!(hook(HOOK_SETSOCKOPT), "setsockopt");
    }
}
