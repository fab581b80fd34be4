//! # Theory of operation
//!
//! The address plan: what the guest is told about its link — its one address per family,
//! the prefix, the gateway, forwarder's own router link-local address, the DNS servers, the
//! MTU and the DHCP lease. [`Network`] is resolved once at start-up ([`resolve`], from the
//! host's default-route interface and the command-line overrides) and then never changes
//! while the engine runs; the services answer from it and the engine uses it to tell its own
//! addresses ([`Network::is_own`]) from the world's.
//!
//! Plain values only: no system call, no clock. The host facts [`resolve`] needs are read by
//! `netconf` above this layer and passed in as [`HostInfo`].

mod resolve;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

pub use resolve::{
    HostInfo, IPV6_MIN_MTU, LOCAL_GATEWAY4, LOCAL_GUEST4, LOCAL_PREFIX4, Overrides, PlanError,
    no_overrides, resolve,
};

use crate::wire::EthernetAddress;

/// The address plan the namespace sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The MAC address forwarder uses on the tap (the gateway's MAC as the guest sees it).
    pub our_mac: EthernetAddress,
    /// MTU advertised over DHCP/RA and set with `--config-net`.
    pub mtu: u16,
    /// IPv4 plan; `None` when IPv4 is off.
    pub ipv4: Option<Ipv4Plan>,
    /// IPv6 plan; `None` when IPv6 is off.
    pub ipv6: Option<Ipv6Plan>,
    /// DHCP lease time handed out.
    pub lease: Duration,
    /// The names handed out with the addresses.
    pub names: Names,
}

/// Names the guest is told (pasta's `-S/--dhcp-search`, `-H`, `--fqdn`): the DNS search
/// list (DHCP option 119, DHCPv6 option 24, the RA's DNSSL), the host name (DHCP option
/// 12) and the FQDN (DHCP option 81, DHCPv6 option 39). Each name passed [`dns_name_ok`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// Search domains, in order.
    pub search: Vec<String>,
    /// Host name.
    pub hostname: Option<String>,
    /// Fully qualified domain name.
    pub fqdn: Option<String>,
}

/// Whether `name` can be sent as a DNS name: labels of 1–63 letters, digits, `-` or `_`,
/// at most 253 bytes, an optional final dot.
#[must_use]
pub fn dns_name_ok(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// IPv4 addresses of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Plan {
    /// The one address the guest gets.
    pub guest: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The gateway (answered by forwarder).
    pub gateway: Ipv4Addr,
    /// DNS servers advertised.
    pub dns: Vec<Ipv4Addr>,
}

/// IPv6 addresses of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Plan {
    /// The one address the guest gets over DHCPv6 or `--config-net`.
    pub guest: Ipv6Addr,
    /// Its prefix length (SLAAC only works with 64).
    pub prefix_len: u8,
    /// The gateway used by `--config-net` (answered by forwarder's NDP).
    pub gateway: Ipv6Addr,
    /// forwarder's own link-local address: the source of RAs and DHCPv6 replies, and the
    /// router address the guest learns from RAs.
    pub router_ll: Ipv6Addr,
    /// DNS servers advertised (RDNSS and DHCPv6).
    pub dns: Vec<Ipv6Addr>,
}

impl Ipv4Plan {
    /// The subnet mask for `prefix_len`.
    #[must_use]
    pub fn netmask(&self) -> Ipv4Addr {
        prefix_to_mask4(self.prefix_len)
    }
}

impl Ipv6Plan {
    /// The on-link prefix (the guest address with host bits cleared).
    #[must_use]
    pub fn prefix(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.guest) & prefix_to_mask6(self.prefix_len))
    }
}

impl Network {
    /// Whether `addr` is forwarder's IPv6 router link-local address, which exists only on
    /// the tap (the gateways may be real hosts: see `is_own`).
    #[must_use]
    pub fn is_router_ll(&self, addr: IpAddr) -> bool {
        matches!(addr, IpAddr::V6(a) if self.ipv6.as_ref().is_some_and(|p| a == p.router_ll))
    }

    /// Whether `addr` is one of forwarder's own addresses on the tap: the IPv4 gateway, the
    /// IPv6 gateway or the router link-local address. NDP defends these, and echo requests
    /// to them are answered locally instead of being forwarded.
    #[must_use]
    pub fn is_own(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.ipv4.as_ref().is_some_and(|p| a == p.gateway),
            IpAddr::V6(a) => self
                .ipv6
                .as_ref()
                .is_some_and(|p| a == p.gateway || a == p.router_ll),
        }
    }
}

/// Converts a prefix length (clamped to 32) to a dotted mask.
#[must_use]
pub fn prefix_to_mask4(prefix_len: u8) -> Ipv4Addr {
    let len = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0))
}

/// Converts a prefix length (clamped to 128) to an IPv6 mask as an integer.
#[must_use]
pub fn prefix_to_mask6(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

/// The EUI-64 link-local address of `mac` (RFC 4291 appendix A).
#[must_use]
pub fn link_local(mac: EthernetAddress) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// Whether `a` and `b` share the first `len` bits.
#[must_use]
pub fn same_subnet4(a: Ipv4Addr, b: Ipv4Addr, len: u8) -> bool {
    let mask = u32::from(prefix_to_mask4(len));
    u32::from(a) & mask == u32::from(b) & mask
}

pub fn same_subnet6(a: Ipv6Addr, b: Ipv6Addr, len: u8) -> bool {
    let mask = prefix_to_mask6(len);
    u128::from(a) & mask == u128::from(b) & mask
}

/// forwarder's default MAC on the tap (pasta's, so captures compare easily).
pub const DEFAULT_MAC: EthernetAddress = EthernetAddress([0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55]);
/// Default MTU: the largest 802.3 MTU minus the header, rounded down to 32 bits (pasta's).
pub const DEFAULT_MTU: u16 = 65520;
/// Default DHCP lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The test world's plan, shared by the unit tests of every layer above.
#[cfg(test)]
pub(crate) mod testing {
    use super::{DEFAULT_LEASE, DEFAULT_MAC, Ipv4Plan, Ipv6Plan, Network, link_local};

    pub(crate) fn network() -> Network {
        Network {
            names: super::Names::default(),
            our_mac: DEFAULT_MAC,
            mtu: 65520,
            ipv4: Some(Ipv4Plan {
                guest: "198.51.100.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "198.51.100.1".parse().unwrap(),
                dns: vec!["198.51.100.53".parse().unwrap()],
            }),
            ipv6: Some(Ipv6Plan {
                guest: "2001:db8:1::2".parse().unwrap(),
                prefix_len: 64,
                gateway: "2001:db8:1::1".parse().unwrap(),
                router_ll: link_local(DEFAULT_MAC),
                dns: vec!["2001:db8:1::53".parse().unwrap()],
            }),
            lease: DEFAULT_LEASE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask4(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_to_mask4(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_to_mask4(32), Ipv4Addr::BROADCAST);
        let plan = Ipv6Plan {
            guest: "2001:db8:1::2".parse().unwrap(),
            prefix_len: 64,
            gateway: "2001:db8:1::1".parse().unwrap(),
            router_ll: "fe80::1".parse().unwrap(),
            dns: vec![],
        };
        assert_eq!(plan.prefix(), "2001:db8:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(prefix_to_mask6(0), 0);
        assert_eq!(prefix_to_mask6(128), u128::MAX);
    }

    #[test]
    fn own_addresses_are_the_gateways_and_router_link_local() {
        let net = testing::network();
        let v6 = net.ipv6.clone().unwrap();
        assert!(net.is_own("198.51.100.1".parse().unwrap()));
        assert!(net.is_own(IpAddr::V6(v6.gateway)));
        assert!(net.is_own(IpAddr::V6(v6.router_ll)));
        assert!(!net.is_own(IpAddr::V4(net.ipv4.clone().unwrap().guest)));
        assert!(!net.is_own("203.0.113.1".parse().unwrap()));
        assert!(!net.is_own("2001:db8:2::1".parse().unwrap()));
    }
}
