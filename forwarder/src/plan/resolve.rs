//! # Theory of operation
//!
//! Resolves the address plan ([`Network`]) once at start-up from two inputs: what the host's
//! default-route interface looks like ([`HostInfo`], read over rtnetlink by `netconf`) and
//! the command-line overrides ([`Overrides`]). A pure function, so every rule below is tested
//! without touching the host.
//!
//! ## Rules, per family
//!
//! 1. Off when `-4`/`-6` selects the other family.
//! 2. Address: `-a` if given (with its `/LEN`, else `-n` for IPv4, else the host's prefix
//!    length when the address is in the host's subnet, else /24 resp. /64), otherwise the
//!    host's address on its default-route interface ("mirror the host": no NAT needed).
//! 3. Gateway: `-g` if given, otherwise the host's default gateway; for an `-a` outside the
//!    host's subnet, the first host address of the guest's subnet (or the second when that
//!    is the guest).
//! 4. No host route and no `-a`: IPv4 falls back to pasta's local mode (guest 169.254.2.1/16,
//!    gateway 169.254.2.2), so forwarder also starts on an offline host; IPv6 is turned off.
//! 5. The router link-local address (RA and DHCPv6 source) is the EUI-64 address of
//!    forwarder's MAC.
//! 6. DNS: `--dns` addresses of the family, otherwise the host's resolvers that the guest
//!    can use directly (loopback resolvers such as systemd-resolved's 127.0.0.53 are skipped:
//!    only `--dns-forward` can make them reachable).
//!
//! Every rejection names the option and the value (e.g. "--gateway 198.51.100.2 is the
//! guest's own address").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::{
    DEFAULT_LEASE, DEFAULT_MAC, DEFAULT_MTU, Ipv4Plan, Ipv6Plan, Network, link_local,
    prefix_to_mask4, prefix_to_mask6, same_subnet4, same_subnet6,
};
use crate::wire::EthernetAddress;

/// What the host's default-route interfaces look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// IPv4 default route: interface address, prefix length, gateway.
    pub v4: Option<(Ipv4Addr, u8, Ipv4Addr)>,
    /// IPv6 default route: global interface address, prefix length, gateway.
    pub v6: Option<(Ipv6Addr, u8, Ipv6Addr)>,
    /// Resolvers from the host's resolv.conf.
    pub resolvers: Vec<IpAddr>,
}

/// Address-plan options from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overrides {
    /// `-a ADDR[/LEN]`, at most one per family.
    pub addresses: Vec<(IpAddr, Option<u8>)>,
    /// `-n`: IPv4 prefix length.
    pub netmask: Option<u8>,
    /// `-g`, at most one per family.
    pub gateways: Vec<IpAddr>,
    /// `--dns`.
    pub dns: Vec<IpAddr>,
    /// `-m`.
    pub mtu: u16,
    /// `-M`.
    pub mac: EthernetAddress,
    /// `-4` (true, false) / `-6` (false, true) / both.
    pub families: (bool, bool),
    /// DHCP lease.
    pub lease: Duration,
}

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// An option's value cannot work.
    #[error("{option} {value}: {why}")]
    Invalid {
        /// The option as typed.
        option: &'static str,
        /// The value.
        value: String,
        /// Why not.
        why: &'static str,
    },
    /// Both families ended up off.
    #[error("no usable IPv4 or IPv6 configuration: give --address and --gateway")]
    NothingToServe,
}

/// Resolves the plan.
///
/// # Errors
///
/// [`PlanError`] naming the offending option.
pub fn resolve(host: &HostInfo, o: &Overrides) -> Result<Network, PlanError> {
    let ipv4 = if o.families.0 {
        Some(resolve_v4(host, o)?)
    } else {
        None
    };
    let ipv6 = if o.families.1 {
        resolve_v6(host, o)?
    } else {
        None
    };
    if ipv4.is_none() && ipv6.is_none() {
        return Err(PlanError::NothingToServe);
    }
    if ipv6.is_some() && o.mtu < IPV6_MIN_MTU {
        return Err(PlanError::Invalid {
            option: "--mtu",
            value: o.mtu.to_string(),
            why: "below IPv6's minimum of 1280 (add -4 to run IPv4 only)",
        });
    }
    Ok(Network {
        our_mac: o.mac,
        mtu: o.mtu,
        ipv4,
        ipv6,
        lease: o.lease,
        names: super::Names::default(),
    })
}

fn resolve_v4(host: &HostInfo, o: &Overrides) -> Result<Ipv4Plan, PlanError> {
    let given = o.addresses.iter().find_map(|(a, len)| match a {
        IpAddr::V4(a) => Some((*a, *len)),
        IpAddr::V6(_) => None,
    });
    let gw_given = o.gateways.iter().find_map(|g| match g {
        IpAddr::V4(g) => Some(*g),
        IpAddr::V6(_) => None,
    });
    let (guest, prefix_len, default_gw) = match (given, host.v4) {
        (Some((addr, len)), host_v4) => {
            let in_host_subnet = host_v4.filter(|(h, hl, _)| same_subnet4(addr, *h, *hl));
            let len = len
                .or(o.netmask)
                .or(in_host_subnet.map(|(_, l, _)| l))
                .unwrap_or(24);
            let gw = in_host_subnet.map_or_else(|| first_host4(addr, len), |(_, _, g)| g);
            (addr, len, gw)
        }
        (None, Some((addr, len, gw))) => (addr, o.netmask.unwrap_or(len), gw),
        (None, None) => (LOCAL_GUEST4, LOCAL_PREFIX4, LOCAL_GATEWAY4),
    };
    if prefix_len == 0 || prefix_len > 30 {
        return Err(invalid(
            "--netmask",
            prefix_len,
            "IPv4 prefix length must be 1-30",
        ));
    }
    if guest.is_unspecified() || guest.is_multicast() || guest.is_broadcast() || guest.is_loopback()
    {
        return Err(invalid("--address", guest, "not a usable unicast address"));
    }
    let gateway = gw_given.unwrap_or(default_gw);
    if gateway == guest {
        return Err(invalid("--gateway", gateway, "is the guest's own address"));
    }
    if gateway.is_unspecified() || gateway.is_multicast() || gateway.is_broadcast() {
        return Err(invalid(
            "--gateway",
            gateway,
            "not a usable unicast address",
        ));
    }
    let dns = pick_dns(o, host, |a| match a {
        IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() => Some(a),
        _ => None,
    });
    Ok(Ipv4Plan {
        guest,
        prefix_len,
        gateway,
        dns,
    })
}

fn resolve_v6(host: &HostInfo, o: &Overrides) -> Result<Option<Ipv6Plan>, PlanError> {
    let given = o.addresses.iter().find_map(|(a, len)| match a {
        IpAddr::V6(a) => Some((*a, *len)),
        IpAddr::V4(_) => None,
    });
    let gw_given = o.gateways.iter().find_map(|g| match g {
        IpAddr::V6(g) => Some(*g),
        IpAddr::V4(_) => None,
    });
    let (guest, prefix_len, default_gw) = match (given, host.v6) {
        (Some((addr, len)), host_v6) => {
            let in_host_subnet = host_v6.filter(|(h, hl, _)| same_subnet6(addr, *h, *hl));
            let len = len.or(in_host_subnet.map(|(_, l, _)| l)).unwrap_or(64);
            let gw = in_host_subnet.map_or_else(|| first_host6(addr, len), |(_, _, g)| g);
            (addr, len, gw)
        }
        (None, Some((addr, len, gw))) => (addr, len, gw),
        (None, None) => return Ok(None),
    };
    if prefix_len == 0 || prefix_len > 126 {
        return Err(invalid(
            "--address",
            format!("{guest}/{prefix_len}"),
            "IPv6 prefix length must be 1-126",
        ));
    }
    if guest.is_unspecified() || guest.is_multicast() || guest.is_loopback() {
        return Err(invalid("--address", guest, "not a usable unicast address"));
    }
    let gateway = gw_given.unwrap_or(default_gw);
    if gateway == guest {
        return Err(invalid("--gateway", gateway, "is the guest's own address"));
    }
    let dns = pick_dns(o, host, |a| match a {
        IpAddr::V6(a) if !a.is_loopback() && !a.is_unspecified() => Some(a),
        _ => None,
    });
    Ok(Some(Ipv6Plan {
        guest,
        prefix_len,
        gateway,
        router_ll: link_local(o.mac),
        dns,
    }))
}

fn pick_dns<T>(o: &Overrides, host: &HostInfo, keep: impl Fn(IpAddr) -> Option<T>) -> Vec<T> {
    let from_cli: Vec<T> = o.dns.iter().copied().filter_map(&keep).collect();
    if o.dns.is_empty() {
        host.resolvers.iter().copied().filter_map(keep).collect()
    } else {
        from_cli
    }
}

fn invalid(option: &'static str, value: impl std::fmt::Display, why: &'static str) -> PlanError {
    PlanError::Invalid {
        option,
        value: value.to_string(),
        why,
    }
}

fn first_host4(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    let net = u32::from(addr) & u32::from(prefix_to_mask4(len));
    let first = Ipv4Addr::from(net.wrapping_add(1));
    if first == addr {
        Ipv4Addr::from(net.wrapping_add(2))
    } else {
        first
    }
}

fn first_host6(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    let net = u128::from(addr) & prefix_to_mask6(len);
    let first = Ipv6Addr::from(net.wrapping_add(1));
    if first == addr {
        Ipv6Addr::from(net.wrapping_add(2))
    } else {
        first
    }
}

/// IPv6's minimum link MTU (RFC 8200 §5).
pub const IPV6_MIN_MTU: u16 = 1280;
/// Local-mode guest address (pasta's, for hosts without an IPv4 default route).
pub const LOCAL_GUEST4: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 1);
/// Local-mode gateway.
pub const LOCAL_GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 2);
/// Local-mode prefix length.
pub const LOCAL_PREFIX4: u8 = 16;

/// Overrides with nothing overridden (defaults of the native face).
#[must_use]
pub fn no_overrides() -> Overrides {
    Overrides {
        addresses: vec![],
        netmask: None,
        gateways: vec![],
        dns: vec![],
        mtu: DEFAULT_MTU,
        mac: DEFAULT_MAC,
        families: (true, true),
        lease: DEFAULT_LEASE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            v4: Some((
                "198.51.100.2".parse().unwrap(),
                24,
                "198.51.100.1".parse().unwrap(),
            )),
            v6: Some((
                "2001:db8:1::2".parse().unwrap(),
                64,
                "2001:db8:1::1".parse().unwrap(),
            )),
            resolvers: vec![
                "127.0.0.53".parse().unwrap(),
                "198.51.100.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn mirrors_the_host_by_default() {
        let net = resolve(&host(), &no_overrides()).unwrap();
        let v4 = net.ipv4.unwrap();
        assert_eq!(
            (v4.guest, v4.prefix_len, v4.gateway),
            (
                "198.51.100.2".parse().unwrap(),
                24,
                "198.51.100.1".parse().unwrap()
            )
        );
        assert_eq!(
            v4.dns,
            vec!["198.51.100.53".parse::<Ipv4Addr>().unwrap()],
            "loopback resolver must be skipped"
        );
        let v6 = net.ipv6.unwrap();
        assert_eq!(v6.guest, "2001:db8:1::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            v6.router_ll,
            "fe80::9855:9aff:fe55:9a55".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(net.mtu, 65520);
    }

    #[test]
    fn overrides_win() {
        let mut o = no_overrides();
        o.addresses = vec![("10.0.2.100".parse().unwrap(), None)];
        o.netmask = Some(24);
        o.gateways = vec!["10.0.2.2".parse().unwrap()];
        o.dns = vec!["10.0.2.3".parse().unwrap()];
        o.families = (true, false);
        let net = resolve(&host(), &o).unwrap();
        let v4 = net.ipv4.unwrap();
        assert_eq!(
            (v4.guest, v4.prefix_len, v4.gateway),
            (
                "10.0.2.100".parse().unwrap(),
                24,
                "10.0.2.2".parse().unwrap()
            )
        );
        assert_eq!(v4.dns, vec!["10.0.2.3".parse::<Ipv4Addr>().unwrap()]);
        assert!(net.ipv6.is_none());
    }

    #[test]
    fn address_outside_host_subnet_gets_first_host_as_gateway() {
        let mut o = no_overrides();
        o.addresses = vec![("10.0.2.1".parse().unwrap(), Some(24))];
        let v4 = resolve(&host(), &o).unwrap().ipv4.unwrap();
        assert_eq!(v4.gateway, "10.0.2.2".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn offline_host_uses_local_mode_v4_and_no_v6() {
        let net = resolve(&HostInfo::default(), &no_overrides()).unwrap();
        assert_eq!(net.ipv4.unwrap().guest, LOCAL_GUEST4);
        assert!(net.ipv6.is_none());
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let mut o = no_overrides();
        o.gateways = vec!["198.51.100.2".parse().unwrap()];
        let err = resolve(&host(), &o).unwrap_err().to_string();
        assert_eq!(err, "--gateway 198.51.100.2: is the guest's own address");
        let mut o = no_overrides();
        o.mtu = 1000;
        assert!(
            resolve(&host(), &o)
                .unwrap_err()
                .to_string()
                .starts_with("--mtu 1000:")
        );
        o.families = (true, false);
        assert!(
            resolve(&host(), &o).is_ok(),
            "small MTU is fine for IPv4 only"
        );
        let mut o = no_overrides();
        o.addresses = vec![("224.0.0.1".parse().unwrap(), None)];
        assert!(
            resolve(&host(), &o)
                .unwrap_err()
                .to_string()
                .starts_with("--address 224.0.0.1:")
        );
    }
}
