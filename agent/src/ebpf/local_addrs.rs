//! The node's own addresses, for the `LOCAL_ADDRS` map: a connect to one of them reaches this
//! host as loopback does, so the kernel decides it as loopback (`agent-ebpf/src/connect.rs`).
//! Read with `getifaddrs(3)` at start and refreshed by the daemon every second.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Every address configured on an interface of this network namespace, loopback addresses
/// excepted (they are loopback already).
pub fn node_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if let Some(ip) = address(ifa.ifa_addr)
            && !ip.is_loopback()
        {
            out.insert(ip);
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the head getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The IP address in a `sockaddr` from getifaddrs, if it is one.
fn address(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr from getifaddrs; its family says which layout it has.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let v4 = &*sa.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_node_has_addresses_and_loopback_is_left_out() -> std::io::Result<()> {
        let addrs = super::node_addresses()?;
        assert!(addrs.iter().all(|a| !a.is_loopback()), "{addrs:?}");
        Ok(())
    }
}
