//! # Theory of operation
//!
//! The built-in services the namespace talks to on its link: ARP, NDP (neighbour and router
//! advertisements), DHCPv4, DHCPv6 and local ICMP echo. They are what lets an unconfigured
//! namespace run its ordinary clients (`udhcpc`, `dhclient`, `dhcpcd`, the kernel's SLAAC)
//! against forwarder.
//!
//! ## Shape (STYLE A3)
//!
//! Each service is a function: a parsed request and the [`Network`](crate::plan::Network)
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
//! * Echo: requests to forwarder's own addresses ([`Network::is_own`](crate::plan::Network::is_own):
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

/// Which built-in services answer on the tap. Each has a `--no-…` switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one switch per service, as on the command line"
)]
pub struct Switches {
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
    /// Translate the namespace's TCP; off (pasta's `--no-tcp`), its segments are dropped
    /// and counted as `ignored`.
    pub tcp: bool,
    /// Translate the namespace's UDP; off (`--no-udp`), as for `tcp`.
    pub udp: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Self {
            arp: true,
            ndp: true,
            ra: true,
            dhcp: true,
            dhcpv6: true,
            icmp: true,
            echo_local_only: false,
            tcp: true,
            udp: true,
        }
    }
}

/// The most IA_NA options answered in one DHCPv6 message.
pub const MAX_IA: usize = 4;
/// The most DNS servers advertised per family.
pub const MAX_DNS: usize = 3;
