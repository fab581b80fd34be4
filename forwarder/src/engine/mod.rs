//! # Theory of operation
//!
//! The sans-IO engine (STYLE A1): everything that decides what happens to a frame, with no
//! system call and no clock. The I/O shell (`io`) feeds it and executes what it asks for.
//!
//! ## Inputs (`handle_*`, each with `now`)
//!
//! * [`Engine::handle_frame`]: one Ethernet frame read from the tap.
//! * [`Engine::handle_echo_reply`]: an echo reply a flow's ping socket received.
//! * `handle_tcp_ready`, `handle_udp_datagram`, `handle_udp_error`: readiness and data of
//!   TCP and UDP host sockets (`engine::translate`); `handle_inbound_tcp`,
//!   `handle_inbound_udp`: clients of forwarded ports (`engine::inbound`); `end_batch`: the
//!   ACKs coalesced over a batch of tap frames.
//! * [`Engine::handle_timeout`]: the time [`Engine::poll_timeout`] named has come (also
//!   where TCP connections that yielded with data left get their next turn).
//!
//! ## Outputs: one model
//!
//! * Host sockets are reached in place, during a `handle_*` call, through the [`Host`]
//!   trait the caller passes in — TCP, UDP and echo alike. In place, not as a queue of
//!   operations, because the TCP translation needs each answer (bytes taken, bytes peeked,
//!   connect refused) before its next step, and one model for every protocol means one
//!   fake for the tests. (Echo once used an operation queue; it is gone.)
//! * [`Engine::poll_transmit`]: frames to write to the tap, in order. Buffers come from a
//!   pool; the shell hands them back with [`Engine::recycle`] so steady-state traffic
//!   allocates nothing per frame.
//! * [`Engine::poll_timeout`]: when to call `handle_timeout` next.
//!
//! ## The shell's order, per wakeup
//!
//! 1. Each frame read from the tap: [`Engine::handle_frame`]; after the batch,
//!    [`Engine::end_batch`] (the ACKs coalesced over it).
//! 2. Each ready socket: `handle_tcp_ready`, `handle_udp_datagram` / `handle_udp_error`,
//!    `handle_echo_reply`, `handle_inbound_tcp` / `handle_inbound_udp`; each fast-path
//!    report: [`Engine::handle_kernel_flow`].
//! 3. [`Engine::handle_timeout`] (it runs only what is due, so calling it every wakeup is
//!    cheap, and it gives yielded TCP pushes their turn).
//! 4. [`Engine::poll_transmit`] until `None`, writing each frame and recycling its buffer.
//! 5. [`Engine::poll_timeout`] last, after every input: any input may move a deadline.
//!
//! Steps 1 and 2 may be interleaved as events arrive; 3 to 5 close each wakeup
//! (`io::dataplane`).
//!
//! ## Data flow, namespace → host
//!
//! `wire::parse` → drop with a counted reason, or dispatch by protocol: ARP → `services::arp`;
//! NS/RS → `services::ndp`; UDP to 67 → `services::dhcp`; UDP to 547 → `services::dhcpv6`;
//! echo to forwarder's own addresses → answered here; other echo → the flow table, which
//! opens a ping socket ([`Host::echo_open`]; a failure removes the flow, `host_errors`) and
//! sends on it ([`Host::echo_send`]);
//! IPv4/IPv6 fragments → `engine::reassembly`, then dispatched whole; other TCP and UDP →
//! the flow table, `policy` for new flows, and `flow::tcp` / `flow::udp` (a protocol switched
//! off, `--no-tcp`/`--no-udp`, is dropped as `ignored`). A new flow to forwarder's router
//! link-local address is refused; an unmapped gateway is an ordinary destination (pasta's
//! `--no-map-gw`: the host's real gateway).
//!
//! With `--ebpf`, the first packet of a new flow whose policy target is its destination
//! unmapped (a TCP SYN, a UDP datagram that was not reassembled) is first offered to the
//! kernel's fast path ([`Host::fast_path`]). When the kernel takes it, the flow stays in the
//! table as [`Detail::Kernel`] with no timer and no socket: its packets never reach the
//! engine, a TCP segment of it that does is dropped (`fast_stray`), a UDP datagram of it is
//! sent through the flow's reservation socket, and the shell reports its closing and its
//! end ([`Engine::handle_kernel_flow`]).
//!
//! ## Data flow, host → namespace
//!
//! A ping socket's reply becomes an echo reply frame from the remote address to the guest,
//! with the guest's own echo identifier restored (a ping socket picks its own). TCP host data
//! becomes segments (`flow::tcp`); UDP datagrams become frames, fragmented beyond the MTU;
//! socket errors become ICMP errors.
//!
//! ## Timers
//!
//! Unsolicited router advertisements at start and then at [`RA_SCHEDULE`] offsets, then every
//! [`RA_INTERVAL`]; each flow's one deadline from the table's timer heap (idle, TCP
//! retransmission, connect and window re-check); TCP connections waiting for their turn make
//! the next timeout immediate.
//!
//! ## Limits
//!
//! At most [`frames::MAX_QUEUED`] frames wait for the shell (more are dropped and counted
//! `tx_queue_full`); the flow table is
//! bounded by `--max-flows`; out-of-order TCP data by `flow::tcp::MAX_OOO_TOTAL` in all;
//! reassembly by `engine::reassembly`'s limits.

mod inbound;
pub mod reassembly;
pub mod stats;
mod translate;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::{debug, trace};

use crate::flow::{self, FlowId, Key, Protocol, tcp, udp};
use crate::frames;
use crate::plan::Network;
use crate::policy::Policy;
use crate::services::{Switches, arp, dhcp, dhcpv6, ndp};
use crate::wire::build::{self, BuildError, Payload};
use crate::wire::dhcp::{
    DHCP4_CLIENT_PORT, DHCP4_SERVER_PORT, DHCP6_CLIENT_PORT, DHCP6_SERVER_PORT,
};
use crate::wire::{self, EthernetAddress, Icmpv4Repr, Icmpv6Repr, L3, L4, NdiscRepr};
pub use stats::Stats;

/// The host sockets of the flows (TCP, UDP and echo), as the engine sees them: the engine's
/// one way to reach the host. The I/O shell implements this with real non-blocking
/// sockets; tests implement it in memory.
pub trait Host {
    /// Starts a non-blocking `connect()` of a new TCP socket for `flow` to `target`.
    /// Completion is reported later as a writable event ([`Engine::handle_tcp_ready`]).
    ///
    /// # Errors
    ///
    /// The socket could not be created or the connect failed at once (e.g. `ENETUNREACH`).
    fn tcp_connect(&mut self, flow: FlowId, target: SocketAddr) -> io::Result<()>;
    /// The outcome of `flow`'s connect (`SO_ERROR`).
    ///
    /// # Errors
    ///
    /// The connect failed (`ECONNREFUSED`, `ETIMEDOUT`, …).
    fn tcp_connect_result(&mut self, flow: FlowId) -> io::Result<()>;
    /// `flow`'s connected TCP socket.
    fn tcp_socket(&mut self, flow: FlowId) -> Option<&mut dyn tcp::HostSocket>;
    /// Opens a UDP socket for `flow` connected to `target`.
    ///
    /// # Errors
    ///
    /// The socket could not be created or connected.
    fn udp_open(&mut self, flow: FlowId, target: SocketAddr) -> io::Result<()>;
    /// Sends one datagram on `flow`'s UDP socket.
    ///
    /// # Errors
    ///
    /// The send failed, e.g. with a pending ICMP error (`ECONNREFUSED`).
    fn udp_send(&mut self, flow: FlowId, data: &[u8]) -> io::Result<()>;
    /// Opens a ping socket for echo flow `flow`, connected to `remote`; its replies are
    /// reported with [`Engine::handle_echo_reply`].
    ///
    /// # Errors
    ///
    /// The socket could not be created or registered.
    fn echo_open(&mut self, flow: FlowId, remote: IpAddr) -> io::Result<()>;
    /// Sends an echo request with `seq` and `data` on `flow`'s ping socket (the kernel sets
    /// the identifier).
    ///
    /// # Errors
    ///
    /// The send failed.
    fn echo_send(&mut self, flow: FlowId, seq: u16, data: &[u8]) -> io::Result<()>;
    /// Closes `flow`'s socket; `abort` resets a TCP connection (linger 0).
    fn close(&mut self, flow: FlowId, abort: bool);
    /// Makes the connection just accepted on a forwarded port `flow`'s TCP socket.
    ///
    /// # Errors
    ///
    /// No accepted connection is pending.
    fn tcp_accepted(&mut self, flow: FlowId) -> io::Result<()>;
    /// Makes `flow`'s datagrams go out through forwarded-port socket `listener` to `peer`
    /// (the client whose datagram opened the flow).
    fn udp_reply_via(&mut self, flow: FlowId, listener: usize, peer: SocketAddr);
    /// Offers the first packet of new flow `flow` (a TCP SYN or a first UDP datagram, to a
    /// destination the policy passes unmapped) to the kernel's fast path (`--ebpf`): the
    /// host address and port it leaves from when the kernel carries the flow from this
    /// packet on (the flow stays in the table as [`Detail::Kernel`]). Without a fast path,
    /// `None`.
    fn fast_path(
        &mut self,
        _flow: FlowId,
        _key: &Key,
        _guest_mac: EthernetAddress,
    ) -> Option<SocketAddr> {
        None
    }
}

/// Per-protocol state kept in the flow table.
#[derive(Debug)]
pub enum Detail {
    /// An echo flow (state is all in the common fields).
    Echo,
    /// A UDP flow.
    Udp(udp::Conn),
    /// A TCP flow.
    Tcp(Box<tcp::Conn>),
    /// A TCP or UDP flow the kernel's fast path carries (`--ebpf`), leaving the host from
    /// this address and port. Its packets never reach the engine; its end is reported by
    /// the shell ([`Engine::handle_kernel_flow`]).
    Kernel(SocketAddr),
}

/// What the fast path reports about one of its flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    /// FIN both ways or a RST was seen: the flow waits for its grace period.
    Closing,
    /// Its entries and port are released: the flow is gone.
    Ended,
}

/// Translation settings beyond the address plan.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bound on the flow table.
    pub max_flows: usize,
    /// Outbound policy and mappings.
    pub policy: Policy,
    /// Idle timeout of UDP flows.
    pub udp_idle: Duration,
    /// The key of the initial sequence numbers' hash (RFC 6528). The front end draws it
    /// from the OS; tests fix it, so the same inputs give the same trace.
    pub iss_secret: [u8; 16],
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_flows: flow::DEFAULT_MAX_FLOWS,
            policy: Policy::default(),
            udp_idle: udp::DEFAULT_IDLE,
            iss_secret: [0; 16],
        }
    }
}

/// The engine. One owner, no interior mutability, no I/O.
#[derive(Debug)]
pub struct Engine {
    net: Network,
    services: Switches,
    stats: Stats,
    flows: flow::Table<Detail>,
    policy: Policy,
    udp_idle: Duration,
    guest_mac: Option<EthernetAddress>,
    tx: frames::Queue,
    scratch: Vec<u8>,
    options: Vec<u8>,
    next_ra: Option<Instant>,
    ras_sent: usize,
    acks: Vec<FlowId>,
    pushes: VecDeque<FlowId>,
    reassembly: reassembly::Reassembler,
    /// A reassembled datagram is being handled: it is no single frame the fast path could
    /// re-inject, so its flow stays in userspace.
    reassembled_now: bool,
    ooo_budget: usize,
    tcp_counters: tcp::Counters,
    epoch: Instant,
    iss_secret: [u8; 16],
    iss_counter: u32,
    ip_ident: u32,
}

impl Engine {
    /// A new engine for `net`; the first unsolicited RA is due at `now`.
    #[must_use]
    pub fn new(net: Network, services: Switches, settings: Settings, now: Instant) -> Self {
        let next_ra = (services.ra && net.ipv6.is_some()).then_some(now);
        Self {
            net,
            services,
            stats: Stats::default(),
            flows: flow::Table::new(settings.max_flows),
            policy: settings.policy,
            udp_idle: settings.udp_idle,
            guest_mac: None,
            tx: frames::Queue::default(),
            scratch: Vec::new(),
            options: Vec::new(),
            next_ra,
            ras_sent: 0,
            acks: Vec::new(),
            pushes: VecDeque::new(),
            reassembly: reassembly::Reassembler::default(),
            reassembled_now: false,
            ooo_budget: tcp::MAX_OOO_TOTAL,
            tcp_counters: tcp::Counters::default(),
            epoch: now,
            iss_secret: settings.iss_secret,
            iss_counter: 0,
            ip_ident: 0,
        }
    }

    /// The counters, with the gauges (open flows) filled in.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.flows_open = self.flows.len() as u64;
        s.fast_flows = self
            .flows
            .iter()
            .filter(|(_, f)| matches!(f.ext, Detail::Kernel(_)))
            .count() as u64;
        s.tx_queue_full = self.tx.dropped;
        s.tcp_in_window_dropped = self.tcp_counters.in_window_dropped;
        s.tcp_window_updates = self.tcp_counters.window_updates;
        s.tcp_zero_windows = self.tcp_counters.zero_windows;
        s.frames_out = self.tx.queued;
        s
    }

    /// The flow table (read-only).
    #[must_use]
    pub fn flows(&self) -> &flow::Table<Detail> {
        &self.flows
    }

    /// Replaces the host-local prefixes the policy classifies destinations with.
    pub fn set_local_prefixes(&mut self, local: Vec<crate::policy::Prefix>) {
        self.policy.local = local;
    }

    /// Handles one frame read from the tap.
    pub fn handle_frame(&mut self, now: Instant, bytes: &[u8], host: &mut dyn Host) {
        self.stats.frames_in += 1;
        let frame = match wire::parse(bytes) {
            Ok(frame) => frame,
            Err(reason) => {
                self.stats.count_drop(reason);
                trace!(
                    reason = reason.name(),
                    len = bytes.len(),
                    "dropped frame from namespace"
                );
                return;
            }
        };
        let src_mac = frame.eth.src_addr;
        if src_mac.is_unicast() {
            self.guest_mac = Some(src_mac);
        }
        match frame.l3 {
            L3::Arp(request) => self.handle_arp(src_mac, &request),
            L3::Ipv4 { ip, l4 } => self.handle_ipv4(now, src_mac, &ip, &l4, host),
            L3::Ipv6 { ip, l4 } => self.handle_ipv6(now, src_mac, &ip, &l4, host),
        }
    }

    /// Handles an echo reply received on `flow`'s ping socket.
    pub fn handle_echo_reply(&mut self, now: Instant, flow: FlowId, seq: u16, data: &[u8]) {
        let Some(f) = self.flows.get(flow) else {
            self.stats.stale_host_events += 1;
            return;
        };
        let (guest, remote, ident) = (f.initiator().addr, f.target().addr, f.initiator().port);
        self.flows.touch(flow, now);
        self.stats.echo_replies += 1;
        self.send_echo_reply(remote, guest, ident, seq, data, self.guest_mac);
    }

    /// Runs timers that are due.
    pub fn handle_timeout(&mut self, now: Instant, host: &mut dyn Host) {
        if self.next_ra.is_some_and(|t| t <= now) {
            self.send_router_advert(ndp::ALL_NODES, None);
            self.ras_sent += 1;
            let delay = RA_SCHEDULE
                .get(self.ras_sent)
                .copied()
                .unwrap_or(RA_INTERVAL);
            self.next_ra = Some(now + delay);
        }
        while let Some(flow) = self.flows.pop_due(now) {
            self.flow_timer(now, flow, host);
        }
        self.run_pushes(now, host);
    }

    /// When [`Engine::handle_timeout`] should run next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.pushes.is_empty() {
            // Connections wait for their next turn: no sleeping.
            return Some(self.epoch);
        }
        match (self.next_ra, self.flows.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next frame to write to the tap.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.tx.pop()
    }

    /// Returns a transmitted frame's buffer to the pool.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.tx.recycle(buf);
    }

    fn handle_arp(&mut self, src_mac: EthernetAddress, request: &wire::ArpRepr) {
        if !self.services.arp {
            self.stats.ignored += 1;
            return;
        }
        match arp::handle(&self.net, request) {
            Some(reply) => {
                let our_mac = self.net.our_mac;
                self.transmit(|out| {
                    build::arp(out, our_mac, src_mac, &reply);
                    Ok(())
                });
                self.stats.arp_replies += 1;
            }
            None => self.stats.ignored += 1,
        }
    }

    fn handle_ipv4(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        ip: &wire::Ipv4Repr,
        l4: &L4<'_>,
        host: &mut dyn Host,
    ) {
        match l4 {
            L4::Udp { udp, payload } if udp.dst_port == DHCP4_SERVER_PORT => {
                if self.services.dhcp {
                    self.handle_dhcp(src_mac, payload);
                } else {
                    self.stats.ignored += 1;
                }
            }
            L4::Icmpv4(Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            }) => {
                self.handle_echo(
                    now,
                    src_mac,
                    (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr)),
                    (*ident, *seq_no),
                    data,
                    host,
                );
            }
            L4::Fragment(frag) => {
                let addrs = (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr));
                self.reassemble_then(now, addrs, frag, |e, l4, len| {
                    let ip = wire::Ipv4Repr {
                        payload_len: len,
                        next_header: frag.protocol,
                        ..*ip
                    };
                    e.handle_ipv4(now, src_mac, &ip, l4, host);
                });
            }
            L4::Tcp(_) | L4::Udp { .. } => self.handle_transport(
                now,
                src_mac,
                (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr)),
                l4,
                host,
            ),
            _ => self.stats.ignored += 1,
        }
    }

    fn handle_ipv6(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        ip: &wire::Ipv6Repr,
        l4: &L4<'_>,
        host: &mut dyn Host,
    ) {
        match l4 {
            L4::Icmpv6(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, .. }))
                if self.services.ndp =>
            {
                match ndp::handle_solicit(&self.net, ip.src_addr, *target_addr) {
                    Some(advert) => {
                        let dst_mac = if advert.dst == ndp::ALL_NODES {
                            multicast_mac(advert.dst)
                        } else {
                            src_mac
                        };
                        let (our_mac, src) = (self.net.our_mac, *target_addr);
                        let repr = Icmpv6Repr::Ndisc(advert.repr);
                        self.transmit(|out| {
                            build::ipv6(
                                out,
                                (our_mac, dst_mac),
                                (src, advert.dst),
                                NDP_HOP_LIMIT,
                                &Payload::Icmpv6 { repr, options: &[] },
                            )
                        });
                        self.stats.ndp_adverts += 1;
                    }
                    None => self.stats.ignored += 1,
                }
            }
            L4::Icmpv6(Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { .. })) if self.services.ra => {
                // Answered to all-nodes (RFC 4861 §6.2.6 allows unicast; multicast also
                // refreshes any other listener and needs no neighbour entry).
                self.send_router_advert(ndp::ALL_NODES, None);
            }
            L4::Icmpv6(Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            }) => {
                self.handle_echo(
                    now,
                    src_mac,
                    (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr)),
                    (*ident, *seq_no),
                    data,
                    host,
                );
            }
            L4::Udp { udp, payload } if udp.dst_port == DHCP6_SERVER_PORT => {
                if self.services.dhcpv6 {
                    self.handle_dhcpv6(src_mac, ip.src_addr, payload);
                } else {
                    self.stats.ignored += 1;
                }
            }
            L4::Fragment(frag) => {
                let addrs = (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr));
                self.reassemble_then(now, addrs, frag, |e, l4, len| {
                    let ip = wire::Ipv6Repr {
                        payload_len: len,
                        next_header: frag.protocol,
                        ..*ip
                    };
                    e.handle_ipv6(now, src_mac, &ip, l4, host);
                });
            }
            L4::Tcp(_) | L4::Udp { .. } => self.handle_transport(
                now,
                src_mac,
                (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr)),
                l4,
                host,
            ),
            _ => self.stats.ignored += 1,
        }
    }

    /// Adds a fragment; once its datagram is complete, parses the whole upper-layer
    /// payload and hands it to `then` with its length. Drops are counted.
    fn reassemble_then(
        &mut self,
        now: Instant,
        (src, dst): (IpAddr, IpAddr),
        frag: &wire::Fragment<'_>,
        then: impl FnOnce(&mut Self, &L4<'_>, usize),
    ) {
        self.stats.fragments_in += 1;
        let id = reassembly::Id {
            src,
            dst,
            protocol: frag.protocol,
            ident: frag.ident,
        };
        let whole = match self.reassembly.add(now, id, frag) {
            Ok(Some(whole)) => whole,
            Ok(None) => return,
            Err(why) => {
                trace!(?why, "fragment dropped");
                self.stats.count_drop(wire::DropReason::Fragment);
                return;
            }
        };
        self.stats.reassembled += 1;
        match wire::parse_l4(frag.protocol, &whole, src.into(), dst.into()) {
            Ok(l4) => {
                self.reassembled_now = true;
                then(self, &l4, whole.len());
                self.reassembled_now = false;
            }
            Err(reason) => self.stats.count_drop(reason),
        }
    }

    fn handle_dhcp(&mut self, src_mac: EthernetAddress, payload: &[u8]) {
        let net = &self.net;
        let Some(reply) = wire::dhcp::with_v4(payload, |request| dhcp::handle(net, request)) else {
            self.stats.bad_dhcp += 1;
            return;
        };
        let Some(reply) = reply else {
            self.stats.ignored += 1;
            return;
        };
        let Some(plan) = self.net.ipv4.as_ref() else {
            return;
        };
        let (dst_ip, dst_mac) = match reply.dst {
            dhcp::Destination::Broadcast => {
                (std::net::Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST)
            }
            dhcp::Destination::Unicast(ip) => (
                ip,
                if reply.chaddr.is_unicast() {
                    reply.chaddr
                } else {
                    src_mac
                },
            ),
        };
        let addrs = (IpAddr::V4(plan.gateway), IpAddr::V4(dst_ip));
        let ports = (DHCP4_SERVER_PORT, DHCP4_CLIENT_PORT);
        if self.send_udp(dst_mac, addrs, ports, |net, body| {
            reply.encode(net, body).is_ok()
        }) {
            self.stats.dhcp_replies += 1;
            debug!(kind = ?reply.message_type, xid = reply.xid, "DHCP reply");
        }
    }

    fn handle_dhcpv6(&mut self, src_mac: EthernetAddress, src: std::net::Ipv6Addr, payload: &[u8]) {
        let Some(request) = wire::dhcp::decode_v6(payload) else {
            self.stats.bad_dhcp += 1;
            return;
        };
        let Some(reply) = dhcpv6::handle(&self.net, &request) else {
            self.stats.ignored += 1;
            return;
        };
        let Some(plan) = self.net.ipv6.as_ref() else {
            return;
        };
        let addrs = (IpAddr::V6(plan.router_ll), IpAddr::V6(src));
        let ports = (DHCP6_SERVER_PORT, DHCP6_CLIENT_PORT);
        if self.send_udp(src_mac, addrs, ports, |_, body| {
            wire::dhcp::encode_v6(&reply, body).is_ok()
        }) {
            self.stats.dhcpv6_replies += 1;
            debug!(kind = ?reply.msg_type(), "DHCPv6 reply");
        }
    }

    fn handle_echo(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        (src, dst): (IpAddr, IpAddr),
        (ident, seq): (u16, u16),
        data: &[u8],
        host: &mut dyn Host,
    ) {
        if !self.services.icmp {
            self.stats.ignored += 1;
            return;
        }
        if self.net.is_own(dst) {
            self.stats.echo_local += 1;
            self.send_echo_reply(dst, src, ident, seq, data, Some(src_mac));
            return;
        }
        if self.services.echo_local_only {
            self.stats.echo_local_fallback += 1;
            self.send_echo_reply(dst, src, ident, seq, data, Some(src_mac));
            return;
        }
        let key = Key {
            protocol: Protocol::Icmp,
            guest_addr: src,
            guest_port: ident,
            remote_addr: dst,
            remote_port: 0,
        };
        let flow = match self.flows.lookup(&key) {
            Some(flow) => flow,
            None => match self.flows.insert(now, key, (dst, 0), Detail::Echo) {
                Ok(flow) => {
                    debug!(flow = flow.0, %src, %dst, ident, "new echo flow");
                    if let Err(err) = host.echo_open(flow, dst) {
                        // No socket, so nothing to close: the flow goes, the request is lost.
                        debug!(%dst, %err, "open ping socket");
                        self.flows.remove(flow);
                        self.stats.host_errors += 1;
                        return;
                    }
                    self.flows.set_deadline(flow, Some(now + flow::ICMP_IDLE));
                    flow
                }
                Err(full) => {
                    self.stats.flow_table_full += 1;
                    trace!(%full, "echo refused");
                    return;
                }
            },
        };
        self.stats.echo_forwarded += 1;
        if let Err(err) = host.echo_send(flow, seq, data) {
            // As on a real path: the request goes unanswered and the guest's ping says so.
            debug!(flow = flow.0, %err, "echo send failed");
        }
    }

    fn send_echo_reply(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        ident: u16,
        seq_no: u16,
        data: &[u8],
        dst_mac: Option<EthernetAddress>,
    ) {
        let our_mac = self.net.our_mac;
        let dst_mac = dst_mac.unwrap_or(EthernetAddress::BROADCAST);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let repr = Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                self.transmit(|out| {
                    build::ipv4(
                        out,
                        (our_mac, dst_mac),
                        (s, d),
                        DEFAULT_HOP_LIMIT,
                        &Payload::Icmpv4(repr),
                    )
                });
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let repr = Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                self.transmit(|out| {
                    build::ipv6(
                        out,
                        (our_mac, dst_mac),
                        (s, d),
                        DEFAULT_HOP_LIMIT,
                        &Payload::Icmpv6 { repr, options: &[] },
                    )
                });
            }
            _ => {}
        }
    }

    fn send_router_advert(&mut self, dst: std::net::Ipv6Addr, dst_mac: Option<EthernetAddress>) {
        let Some(repr) = ndp::router_advert(&self.net) else {
            return;
        };
        let Some(plan) = self.net.ipv6.as_ref() else {
            return;
        };
        let mut options = std::mem::take(&mut self.options);
        options.clear();
        build::rdnss_option(
            &mut options,
            u32::try_from(ndp::ROUTER_LIFETIME.as_secs()).unwrap_or(u32::MAX),
            ndp::rdnss(&self.net),
        );
        build::dnssl_option(
            &mut options,
            u32::try_from(ndp::ROUTER_LIFETIME.as_secs()).unwrap_or(u32::MAX),
            &self.net.names.search,
        );
        let (our_mac, src) = (self.net.our_mac, plan.router_ll);
        let dst_mac = dst_mac.unwrap_or_else(|| multicast_mac(dst));
        self.transmit(|out| {
            build::ipv6(
                out,
                (our_mac, dst_mac),
                (src, dst),
                NDP_HOP_LIMIT,
                &Payload::Icmpv6 {
                    repr: Icmpv6Repr::Ndisc(repr),
                    options: &options,
                },
            )
        });
        self.options = options;
        self.stats.router_adverts += 1;
    }

    /// Encodes a UDP payload into the scratch buffer with `encode` and queues it in an IP
    /// frame from `addrs.0` to `addrs.1` (one family). Returns whether `encode` succeeded;
    /// a full queue is counted by [`Engine::transmit`] as `tx_queue_full`.
    fn send_udp(
        &mut self,
        dst_mac: EthernetAddress,
        addrs: (IpAddr, IpAddr),
        (src_port, dst_port): (u16, u16),
        encode: impl FnOnce(&Network, &mut Vec<u8>) -> bool,
    ) -> bool {
        let mut body = std::mem::take(&mut self.scratch);
        let macs = (self.net.our_mac, dst_mac);
        let encoded = encode(&self.net, &mut body);
        if encoded {
            let payload = Payload::Udp {
                src_port,
                dst_port,
                data: &body,
            };
            match addrs {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    self.transmit(|out| {
                        build::ipv4(out, macs, (s, d), DEFAULT_HOP_LIMIT, &payload)
                    });
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    self.transmit(|out| {
                        build::ipv6(out, macs, (s, d), DEFAULT_HOP_LIMIT, &payload)
                    });
                }
                _ => {}
            }
        }
        self.scratch = body;
        encoded
    }

    fn transmit(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> Result<(), BuildError>) {
        let mut buf = self.tx.buffer();
        match fill(&mut buf) {
            Ok(()) => self.tx.push(buf),
            Err(err) => {
                debug!(%err, "could not build frame");
                self.tx.recycle(buf);
            }
        }
    }
}

/// The Ethernet multicast address for an IPv6 multicast address (RFC 2464 §7).
#[must_use]
pub fn multicast_mac(addr: std::net::Ipv6Addr) -> EthernetAddress {
    let o = addr.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// Hop limit of packets forwarder originates.
pub const DEFAULT_HOP_LIMIT: u8 = 64;
/// Hop limit NDP requires (RFC 4861 §7.1.1).
pub const NDP_HOP_LIMIT: u8 = 255;
/// Offsets of the first unsolicited RAs after start: guests that bring the link up a little
/// later still hear one without soliciting.
pub const RA_SCHEDULE: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];
/// Interval of unsolicited RAs after the schedule (RFC 4861 MaxRtrAdvInterval default 600 s).
pub const RA_INTERVAL: Duration = Duration::from_secs(300);

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
