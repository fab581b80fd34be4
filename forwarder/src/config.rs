//! The one validated configuration every front end produces ("parse, don't validate").
//!
//! Front ends (`cli`) turn their arguments into a [`Config`]; below them nothing re-checks
//! an option or knows which face started the process. The address plan ([`Network`]) is
//! resolved once, at start-up, from the host's default-route interface and the overrides
//! (see [`crate::plan`]), and then never changes while the engine runs.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::wire::EthernetAddress;

/// Everything the process needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which namespace to serve.
    pub target: Target,
    /// Name of the tap device in the namespace.
    pub ifname: String,
    /// Configure addresses, routes and MTU in the namespace over rtnetlink.
    pub config_net: bool,
    /// The address plan and what is answered on the tap.
    pub network: Network,
    /// Which built-in services run.
    pub services: Services,
    /// Upper bound on tracked flows.
    pub max_flows: usize,
    /// Write the PID here once the namespace is ready.
    pub pid_file: Option<PathBuf>,
    /// Outbound policy, mappings and flow timeouts.
    pub translation: crate::engine::Settings,
    /// The data plane's own options (outbound binding, test hook).
    pub io: crate::io::Options,
    /// Inbound TCP port forwards (`-t`).
    pub tcp_forwards: Vec<crate::forward::PortMap>,
    /// Inbound UDP port forwards (`-u`).
    pub udp_forwards: Vec<crate::forward::PortMap>,
    /// Namespace → host TCP forwards (`-T`): listen in the namespace, splice to the host's
    /// loopback.
    pub ns_tcp_forwards: Vec<crate::forward::PortMap>,
    /// Namespace → host UDP forwards (`-U`).
    pub ns_udp_forwards: Vec<crate::forward::PortMap>,
    /// `auto` specs, at most one per kind.
    pub auto: Vec<(crate::forward::Kind, crate::forward::Auto)>,
    /// Kinds given `all`: their ports are bound best-effort.
    pub all: Vec<crate::forward::Kind>,
    /// The runtime control API's socket.
    pub api_socket: Option<PathBuf>,
    /// `--ebpf`: try the kernel programs.
    pub ebpf: bool,
    /// `--ebpf-grace`: how long a closed fast-path flow keeps its entries and port.
    pub ebpf_grace: Duration,
    /// `--ebpf-max-flows`: the kernel's share of the flow table.
    pub ebpf_max_flows: usize,
}

/// The namespace forwarder serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Create a new user and network namespace and run this command in it.
    Spawn {
        /// Program and arguments; never empty.
        command: Vec<OsString>,
    },
    /// Attach to an existing network namespace.
    Attach {
        /// The network namespace (a path such as `/run/netns/NAME` or `/proc/PID/ns/net`).
        netns: PathBuf,
        /// The user namespace to join first, if any.
        userns: Option<PathBuf>,
    },
}

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

/// Which built-in services answer on the tap. Each has a `--no-…` switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one switch per service, as on the command line"
)]
pub struct Services {
    /// ARP replies.
    pub arp: bool,
    /// Neighbour advertisements.
    pub ndp: bool,
    /// Router advertisements (solicited and unsolicited).
    pub ra: bool,
    /// DHCPv4 server.
    pub dhcp: bool,
    /// DHCPv6 server.
    pub dhcpv6: bool,
    /// ICMP/ICMPv6 echo.
    pub icmp: bool,
    /// Answer every echo request locally instead of through ping sockets (set at start-up
    /// when `net.ipv4.ping_group_range` forbids ping sockets).
    pub echo_local_only: bool,
}

impl Default for Services {
    fn default() -> Self {
        Self {
            arp: true,
            ndp: true,
            ra: true,
            dhcp: true,
            dhcpv6: true,
            icmp: true,
            echo_local_only: false,
        }
    }
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

/// forwarder's default MAC on the tap (pasta's, so captures compare easily).
pub const DEFAULT_MAC: EthernetAddress = EthernetAddress([0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55]);
/// Default MTU: the largest 802.3 MTU minus the header, rounded down to 32 bits (pasta's).
pub const DEFAULT_MTU: u16 = 65520;
/// Default DHCP lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Default bound on the flow table.
pub const DEFAULT_MAX_FLOWS: usize = 65536;

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
        let net = crate::services::testing::network();
        let v6 = net.ipv6.clone().unwrap();
        assert!(net.is_own("198.51.100.1".parse().unwrap()));
        assert!(net.is_own(IpAddr::V6(v6.gateway)));
        assert!(net.is_own(IpAddr::V6(v6.router_ll)));
        assert!(!net.is_own(IpAddr::V4(net.ipv4.clone().unwrap().guest)));
        assert!(!net.is_own("203.0.113.1".parse().unwrap()));
        assert!(!net.is_own("2001:db8:2::1".parse().unwrap()));
    }
}
