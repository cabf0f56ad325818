//! The DNS redirect, as the kernel and the agent share it: principals under a policy with zones
//! by host name send their DNS (UDP and TCP port 53, to any resolver) to the agent's proxy,
//! each principal to a loopback address of its own (`127.64.0.0/10` plus its index), so the
//! proxy knows whose query it answers from the address it was sent to.

/// The proxy's network, host order: `127.64.0.0/10`.
pub const PROXY_NET: u32 = 0x7f40_0000;
/// Mask of [`PROXY_NET`].
pub const PROXY_MASK: u32 = 0xffc0_0000;

/// The proxy address (host order) of principal `index`.
#[inline(always)]
pub const fn proxy_addr(index: u32) -> u32 {
    PROXY_NET | (index & !PROXY_MASK)
}

/// The principal index a proxy address (host order) stands for, if it is one.
#[inline(always)]
pub const fn proxy_index(addr: u32) -> Option<u32> {
    if addr & PROXY_MASK == PROXY_NET {
        Some(addr & !PROXY_MASK)
    } else {
        None
    }
}

/// `DNS_CFG[0]`, written by the agent: the proxy's port (host order), 0 when it runs none (no
/// redirect then: a principal's DNS is decided like any other call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<DnsConfig>() == 8);

/// Per socket (`DNS_ORIG`, socket-local storage): where a redirected query was sent, so a
/// reply read with `recvmsg()` (or the peer `getpeername()` names) is that resolver, not the
/// proxy. Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsOrig {
    /// The resolver's address, IPv6 form (an IPv4 one mapped: `::ffff:a.b.c.d`).
    pub addr: [u32; 4],
    /// The principal's proxy address (IPv4).
    pub proxy: u32,
    pub port: u16,
    pub proxy_port: u16,
}
const _: () = assert!(core::mem::size_of::<DnsOrig>() == 24);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_addresses_round_trip_and_stay_in_their_net() {
        assert_eq!(proxy_addr(0), 0x7f40_0000);
        assert_eq!(proxy_addr(5), 0x7f40_0005);
        assert_eq!(proxy_index(proxy_addr(16_383)), Some(16_383));
        assert_eq!(proxy_index(0x7f00_0001), None);
        assert_eq!(proxy_addr(u32::MAX) & PROXY_MASK, PROXY_NET);
    }
}
