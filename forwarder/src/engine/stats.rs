//! Counters: every frame in, every reply out, every drop with its reason.
//!
//! Bad input is never an error or a warning (STYLE "Errors"): it is a counter here and, at
//! most, a `debug!` line. The counters are plain integers owned by the engine's single
//! owner; the I/O shell publishes snapshots of them (log line on SIGUSR1 and at exit).

use crate::wire::DropReason;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The engine's counters.
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct Stats {
            $($(#[doc = $doc])* pub $name: u64,)*
            /// Frames dropped by the packet layer, indexed like [`DropReason::ALL`].
            pub dropped: [u64; DropReason::ALL.len()],
        }

        impl Stats {
            /// Every counter with its name, drops as `drop_<reason>`.
            pub fn iter(&self) -> impl Iterator<Item = (String, u64)> + '_ {
                [$((stringify!($name).to_string(), self.$name),)*]
                    .into_iter()
                    .chain(DropReason::ALL.iter().zip(self.dropped.iter()).map(|(r, n)| (format!("drop_{}", r.name()), *n)))
            }
        }
    };
}

counters! {
    /// Frames read from the tap.
    frames_in,
    /// Frames written to the tap.
    frames_out,
    /// ARP requests answered.
    arp_replies,
    /// Neighbour solicitations answered.
    ndp_adverts,
    /// Router advertisements sent (solicited and unsolicited).
    router_adverts,
    /// DHCPv4 replies sent.
    dhcp_replies,
    /// DHCPv6 replies sent.
    dhcpv6_replies,
    /// Echo requests answered locally (to forwarder's own addresses).
    echo_local,
    /// Echo requests answered locally because ping sockets are forbidden.
    echo_local_fallback,
    /// Echo requests forwarded through ping sockets.
    echo_forwarded,
    /// Echo replies from the host relayed to the guest.
    echo_replies,
    /// Well-formed frames no service or flow handles (MLD, IGMP, ARP replies…).
    ignored,
    /// Flows in the table when the snapshot was taken (a gauge).
    flows_open,
    /// TCP flows created (SYNs accepted by the policy).
    tcp_flows,
    /// TCP flows whose host connect succeeded.
    tcp_connected,
    /// TCP flows whose host connect failed (refused, unreachable, timed out).
    tcp_connect_failed,
    /// TCP SYNs refused by policy (answered with RST).
    tcp_denied,
    /// TCP segments for no flow (answered with RST).
    tcp_no_flow,
    /// TCP flows ended by a reset either way.
    tcp_resets,
    /// Guest TCP segments with bytes inside the advertised window that were dropped (must
    /// stay 0: `flow::tcp`, "Flow control").
    tcp_in_window_dropped,
    /// TCP window updates sent to the guest as host sockets drained.
    tcp_window_updates,
    /// Times a TCP window advertised to the guest closed to zero.
    tcp_zero_windows,
    /// TCP host sockets that reported an error (reset by the remote).
    tcp_host_resets,
    /// Inbound TCP connections on forwarded ports relayed to the guest.
    inbound_tcp,
    /// Inbound UDP flows on forwarded ports.
    inbound_udp,
    /// Inbound connections refused (family off, duplicate flow).
    inbound_refused,
    /// UDP flows created.
    udp_flows,
    /// UDP datagrams from the guest sent to the host.
    udp_out,
    /// UDP datagrams from the host relayed to the guest.
    udp_in,
    /// UDP datagrams refused by policy.
    udp_denied,
    /// ICMP errors sent to the guest.
    icmp_errors_sent,
    /// IP fragments received from the guest.
    fragments_in,
    /// Datagrams reassembled from the guest's fragments.
    reassembled,
    /// IP fragments sent to the guest.
    fragments_out,
    /// DHCP/DHCPv6 payloads that did not decode.
    bad_dhcp,
    /// New flows refused because the table was full.
    flow_table_full,
    /// Host events for flows that no longer exist.
    stale_host_events,
    /// Host-side failures on a flow (socket could not be opened, send failed).
    host_errors,
    /// TCP flows handed to the kernel's fast path at their SYN (`--ebpf`).
    fast_tcp_flows,
    /// UDP flows handed to the kernel's fast path at their first datagram.
    fast_udp_flows,
    /// Fast-path flows carried by the kernel now (a gauge, filled by the data plane).
    fast_flows,
    /// First packets the fast path left in userspace: host-local destination.
    fast_declined_local,
    /// First packets the fast path left in userspace: its table or maps full.
    fast_declined_full,
    /// First packets the fast path left in userspace: reserving a port failed.
    fast_failed,
    /// Fast-path flows ended after their close and the grace period.
    fast_closed,
    /// Fast-path flows ended idle (or whose entries vanished).
    fast_expired,
    /// FIN/RST events read from the programs' ring buffer.
    fast_events,
    /// Segments of kernel-carried TCP flows that reached userspace (not parsed by the
    /// programs, e.g. IPv4 options): dropped.
    fast_stray,
    /// Frames dropped because the transmit queue was full.
    tx_queue_full,
}

impl Stats {
    /// Counts a packet-layer drop.
    pub fn count_drop(&mut self, reason: DropReason) {
        if let Some(slot) = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.dropped.get_mut(i))
        {
            *slot += 1;
        }
    }

    /// The counter for one drop reason.
    #[must_use]
    pub fn drops(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.dropped.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// One `name=value` line of every non-zero counter, for logs.
    #[must_use]
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .iter()
            .filter(|(_, v)| *v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if parts.is_empty() {
            "all counters zero".to_string()
        } else {
            parts.join(" ")
        }
    }
}
