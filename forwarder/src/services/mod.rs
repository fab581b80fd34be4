//! # Theory of operation
//!
//! The built-in services the namespace talks to on its link: ARP, NDP (neighbour and router
//! advertisements), DHCPv4, DHCPv6 and local ICMP echo. They are what lets an unconfigured
//! namespace run its ordinary clients (`udhcpc`, `dhclient`, `dhcpcd`, the kernel's SLAAC)
//! against forwarder.
//!
//! ## Shape (STYLE A3)
//!
//! Each service is a function: a parsed request and the [`Network`](crate::config::Network)
//! plan in, zero or one reply representation out. No service touches a socket, a clock or
//! the flow table; the engine decides which frames reach which service, emits the replies
//! with [`crate::wire::build`], and counts what it answered and what it ignored.
//!
//! ## What is answered
//!
//! * ARP: requests for any IPv4 address except the guest's own (so the guest can reach any
//!   on-link address through forwarder, and its duplicate-address probes stay unanswered);
//!   never announcements (sender = target).
//! * NDP: solicitations for any target except the guest's address; duplicate-address
//!   probes (source `::`) only for forwarder's own addresses. Router solicitations get a
//!   router advertisement; unsolicited ones are sent at start and periodically by the engine.
//! * DHCPv4: one lease, the plan's guest address; DISCOVER → OFFER, REQUEST → ACK or NAK,
//!   INFORM → ACK without lease (RFC 2131 §4.3).
//! * DHCPv6: stateless (Information-request) and one address (IA_NA), with rapid commit
//!   (RFC 8415 §18.3).
//! * Echo: requests to forwarder's own addresses ([`Network::is_own`](crate::config::Network::is_own):
//!   the gateways, the router link-local) are answered by the engine itself; others are
//!   forwarded by the flow table through ping sockets — unless ping sockets are forbidden
//!   (`net.ipv4.ping_group_range`), in which case every request is answered locally and
//!   counted as `echo_local_fallback` (`docs/services.md`: such a reply proves only that
//!   forwarder is alive).
//!
//! ## Limits
//!
//! Replies are bounded by the request (DHCPv6 answers at most [`MAX_IA`] IA_NAs; RDNSS and
//! DHCP DNS lists at most 3 servers), so no request makes a service build an unbounded reply.

pub mod arp;
pub mod dhcp;
pub mod dhcpv6;
pub mod ndp;

/// The most IA_NA options answered in one DHCPv6 message.
pub const MAX_IA: usize = 4;
/// The most DNS servers advertised per family.
pub const MAX_DNS: usize = 3;

/// The test world's plan, shared by the service tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::config::{DEFAULT_LEASE, DEFAULT_MAC, Ipv4Plan, Ipv6Plan, Network};

    pub(crate) fn network() -> Network {
        Network {
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
                router_ll: crate::plan::link_local(DEFAULT_MAC),
                dns: vec!["2001:db8:1::53".parse().unwrap()],
            }),
            lease: DEFAULT_LEASE,
        }
    }
}
