//! Client networks: the one place that says which addresses count as one source.
//!
//! The guard's budgets, the unlock windows and admission's per-address caps all group IPv6
//! clients by prefix, since one customer holds a whole /64 (or more) and can rotate through
//! it: counting each IPv6 address apart would let one host multiply every per-address cap.

use std::net::IpAddr;

use ipnet::IpNet;

/// The network of `ip`: its /`v4` (IPv4) or /`v6` (IPv6) prefix, host bits cleared.
pub fn subnet(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    let prefix = match ip {
        IpAddr::V4(_) => v4,
        IpAddr::V6(_) => v6,
    };
    IpNet::new(ip, prefix).map_or_else(|_| IpNet::from(ip), |n| n.trunc())
}

/// One source for per-address caps: the address itself for IPv4, its /`v6` prefix for
/// IPv6. An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, from a dual-stack socket) counts as
/// the IPv4 address it is.
pub fn source(ip: IpAddr, v6: u8) -> IpNet {
    match ip {
        IpAddr::V4(_) => IpNet::from(ip),
        IpAddr::V6(v) => match v.to_ipv4_mapped() {
            Some(v4) => IpNet::from(IpAddr::V4(v4)),
            None => subnet(ip, 32, v6),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_and_sources() {
        assert_eq!(subnet(ip("192.0.2.77"), 24, 64).to_string(), "192.0.2.0/24");
        assert_eq!(
            subnet(ip("2001:db8:1:2:3:4:5:6"), 24, 64).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(source(ip("192.0.2.77"), 64).to_string(), "192.0.2.77/32");
        assert_eq!(
            source(ip("2001:db8:1:2:3:4:5:6"), 64),
            source(ip("2001:db8:1:2:ffff::1"), 64)
        );
        assert_ne!(
            source(ip("2001:db8:1:2::1"), 64),
            source(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(
            source(ip("::ffff:192.0.2.1"), 64),
            source(ip("192.0.2.1"), 64)
        );
    }
}
