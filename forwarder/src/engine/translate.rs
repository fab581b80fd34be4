//! The engine's side of TCP and UDP translation: finding or creating the flow for a
//! segment or datagram, asking the policy, driving `flow::tcp` and `flow::udp`, and turning
//! their verdicts into table removals and socket closes. The theory of operation is in
//! `flow`, `flow::tcp`, `flow::udp` and `policy`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tracing::{debug, trace};

use super::{DEFAULT_HOP_LIMIT, Detail, Engine, Host};
use crate::flow::tcp::{self, Conn, Cx, Verdict};
use crate::flow::udp::{self, Unreachable};
use crate::flow::{self, FlowId, Interface, Key, Protocol};
use crate::wire::build::{self, Payload};
use crate::wire::{
    EthernetAddress, Icmpv4DstUnreachable, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Repr,
    IpProtocol, Ipv4Repr, Ipv6Repr, TcpControl, TcpRepr,
};

/// A TCP socket stand-in for events on flows whose socket is already gone.
struct NoSocket;

impl tcp::HostSocket for NoSocket {
    fn send(&mut self, _data: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
    fn peek(&mut self, _offset: usize, _bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::NotConnected.into())
    }
    fn discard(&mut self, _n: usize) {}
    fn shutdown_write(&mut self) {}
    fn send_space(&mut self) -> usize {
        0
    }
}

#[expect(
    clippy::redundant_closure_for_method_calls,
    reason = "the closures are higher-ranked over the socket's lifetime; the paths are not"
)]
impl Engine {
    /// Handles readiness of `flow`'s TCP socket.
    pub fn handle_tcp_ready(
        &mut self,
        now: Instant,
        flow: FlowId,
        readable: bool,
        writable: bool,
        error: bool,
        host: &mut dyn Host,
    ) {
        let connecting = match self.flows.get(flow).map(|f| &f.ext) {
            Some(Detail::Tcp(conn)) => conn.state == tcp::TcpState::Connecting,
            _ => {
                self.stats.stale_host_events += 1;
                return;
            }
        };
        if connecting {
            if !(writable || error) {
                return;
            }
            match host.tcp_connect_result(flow) {
                Ok(()) => {
                    self.stats.tcp_connected += 1;
                    self.flows.touch(flow, now);
                    self.with_tcp(now, flow, host, |conn, cx| {
                        conn.on_connected(cx);
                        Verdict::Keep
                    });
                }
                Err(err) => {
                    debug!(flow = flow.0, %err, "connect failed");
                    self.stats.tcp_connect_failed += 1;
                    self.with_tcp(now, flow, host, |conn, cx| conn.on_host_error(cx));
                }
            }
            return;
        }
        if error {
            self.stats.tcp_host_resets += 1;
            self.with_tcp(now, flow, host, |conn, cx| conn.on_host_error(cx));
            return;
        }
        self.with_tcp(now, flow, host, |conn, cx| {
            conn.on_host_ready(cx, readable, writable)
        });
    }

    /// Handles a datagram `flow`'s UDP socket received.
    pub fn handle_udp_datagram(&mut self, now: Instant, flow: FlowId, data: &[u8]) {
        let Some(f) = self.flows.get(flow) else {
            self.stats.stale_host_events += 1;
            return;
        };
        let key = f.key();
        self.flows.touch(flow, now);
        self.stats.udp_in += 1;
        let dst_mac = self.guest_mac.unwrap_or(EthernetAddress::BROADCAST);
        let payload = Payload::Udp {
            src_port: key.remote_port,
            dst_port: key.guest_port,
            data,
        };
        let mtu = usize::from(self.net.mtu);
        let macs = (self.net.our_mac, dst_mac);
        self.ip_ident = self.ip_ident.wrapping_add(1);
        let ident = self.ip_ident;
        let mut whole = self.tx.buffer();
        let built = match (key.remote_addr, key.guest_addr) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                build::ipv4(&mut whole, macs, (s, d), DEFAULT_HOP_LIMIT, &payload)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                build::ipv6(&mut whole, macs, (s, d), DEFAULT_HOP_LIMIT, &payload)
            }
            _ => Err(build::BuildError::WrongFamily),
        };
        if built.is_err() {
            self.tx.recycle(whole);
            return;
        }
        if whole.len() <= mtu + build::ETHERNET_HEADER_LEN {
            self.tx.push(whole);
        } else {
            self.stats.fragments_out += build::fragment(&whole, mtu, ident, &mut self.tx);
            self.tx.recycle(whole);
        }
    }

    /// Handles an error on `flow`'s UDP socket (an ICMP error from the path), a kernel UDP
    /// flow's reservation included.
    pub fn handle_udp_error(&mut self, now: Instant, flow: FlowId, err: &io::Error) {
        let Some(f) = self.flows.get(flow) else {
            self.stats.stale_host_events += 1;
            return;
        };
        let (key, last_len) = match &f.ext {
            Detail::Udp(c) => (f.key(), c.last_len),
            // A kernel flow's reservation: the error about it (an ICMP error the programs
            // did not translate) quotes no length the engine knows.
            Detail::Kernel(_) if f.key().protocol == Protocol::Udp => (f.key(), 0),
            _ => return,
        };
        self.flows.touch(flow, now);
        if let Some(kind) = udp::icmp_for(err) {
            self.send_unreachable(&key, last_len, kind);
        }
    }

    /// Gives each connection that yielded with data left one more turn, in order.
    pub(super) fn run_pushes(&mut self, now: Instant, host: &mut dyn Host) {
        for _ in 0..self.pushes.len() {
            let Some(flow) = self.pushes.pop_front() else {
                return;
            };
            self.with_tcp(now, flow, host, |conn, cx| conn.resume(cx));
        }
    }

    /// Sends the ACKs coalesced over the batch of tap frames just handled.
    pub fn end_batch(&mut self, now: Instant, host: &mut dyn Host) {
        let acks = std::mem::take(&mut self.acks);
        for &flow in &acks {
            let pending = matches!(
                self.flows.get(flow).map(|f| &f.ext),
                Some(Detail::Tcp(c)) if c.has_ack_pending()
            );
            if pending {
                self.with_tcp(now, flow, host, |conn, cx| {
                    conn.flush_ack(cx);
                    Verdict::Keep
                });
            }
        }
        self.acks = acks;
        self.acks.clear();
    }

    /// A TCP segment or UDP datagram from the guest, either family.
    pub(super) fn handle_transport(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        addrs: (IpAddr, IpAddr),
        l4: &crate::wire::L4<'_>,
        host: &mut dyn Host,
    ) {
        match l4 {
            crate::wire::L4::Tcp(_) if !self.services.tcp => self.stats.ignored += 1,
            crate::wire::L4::Udp { .. } if !self.services.udp => self.stats.ignored += 1,
            crate::wire::L4::Tcp(seg) => self.handle_tcp(now, src_mac, addrs, seg, host),
            crate::wire::L4::Udp { udp, payload } => {
                self.handle_udp(now, addrs, (udp.src_port, udp.dst_port), payload, host);
            }
            _ => self.stats.ignored += 1,
        }
    }

    pub(super) fn handle_tcp(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        (src, dst): (IpAddr, IpAddr),
        seg: &TcpRepr<'_>,
        host: &mut dyn Host,
    ) {
        let key = Key {
            protocol: Protocol::Tcp,
            guest_addr: src,
            guest_port: seg.src_port,
            remote_addr: dst,
            remote_port: seg.dst_port,
        };
        if let Some(flow) = self.flows.lookup(&key) {
            if matches!(
                self.flows.get(flow).map(|f| &f.ext),
                Some(Detail::Kernel(_))
            ) {
                // The kernel carries this connection; a segment of it reaching userspace is
                // one the programs do not parse (IP options): there is no translation state
                // to give it, and answering would disturb the connection.
                self.stats.fast_stray += 1;
                return;
            }
            self.flows.touch(flow, now);
            self.with_tcp(now, flow, host, |conn, cx| conn.on_segment(cx, seg));
            if !self.acks.contains(&flow) {
                self.acks.push(flow);
            }
            return;
        }
        let macs = (self.net.our_mac, src_mac);
        if seg.control != TcpControl::Syn || seg.ack_number.is_some() {
            if seg.control != TcpControl::Rst {
                self.stats.tcp_no_flow += 1;
                let (seq, ack) = tcp::rst_for(seg);
                tcp::send_rst(&mut self.tx, macs, &key, seq, ack);
            }
            return;
        }
        let refuse = |engine: &mut Self| {
            let (seq, ack) = tcp::rst_for(seg);
            tcp::send_rst(&mut engine.tx, macs, &key, seq, ack);
        };
        let target = match self.policy.route(Protocol::Tcp, dst, seg.dst_port) {
            Ok(t) => t,
            Err(why) => {
                debug!(%src, %dst, port = seg.dst_port, reason = why.name(), "tcp denied");
                self.stats.tcp_denied += 1;
                refuse(self);
                return;
            }
        };
        if self.net.is_router_ll(target.0) {
            // forwarder's own link-local address, unmapped: nothing listens there. An
            // unmapped gateway (`--no-map-gw`) is an ordinary destination, as in pasta: the
            // host's real gateway when the plan mirrors it.
            self.stats.tcp_denied += 1;
            refuse(self);
            return;
        }
        if target == (dst, seg.dst_port) && self.offer_to_kernel(now, key, target, src_mac, host) {
            self.stats.fast_tcp_flows += 1;
            return;
        }
        let iss = self.iss(now, &key);
        let conn = Conn::new(now, seg, iss, self.net.mtu, dst.is_ipv6());
        let flow = match self
            .flows
            .insert(now, key, target, Detail::Tcp(Box::new(conn)))
        {
            Ok(flow) => flow,
            Err(full) => {
                trace!(%full, "tcp refused");
                self.stats.flow_table_full += 1;
                refuse(self);
                return;
            }
        };
        debug!(flow = flow.0, %src, sport = seg.src_port, %dst, dport = seg.dst_port,
               target = %SocketAddr::from(target), "new tcp flow");
        self.stats.tcp_flows += 1;
        if let Err(err) = host.tcp_connect(flow, SocketAddr::from(target)) {
            debug!(flow = flow.0, %err, "connect failed at once");
            self.stats.tcp_connect_failed += 1;
            self.flows.remove(flow);
            host.close(flow, true);
            refuse(self);
            return;
        }
        self.schedule(flow);
    }

    pub(super) fn handle_udp(
        &mut self,
        now: Instant,
        (src, dst): (IpAddr, IpAddr),
        (sport, dport): (u16, u16),
        payload: &[u8],
        host: &mut dyn Host,
    ) {
        let key = Key {
            protocol: Protocol::Udp,
            guest_addr: src,
            guest_port: sport,
            remote_addr: dst,
            remote_port: dport,
        };
        let last_len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
        let flow = match self.flows.lookup(&key).or_else(|| self.inbound_reply(&key)) {
            Some(flow) => flow,
            None => {
                let target = match self.policy.route(Protocol::Udp, dst, dport) {
                    Ok(t) if !self.net.is_router_ll(t.0) => t,
                    Ok(_) => {
                        self.stats.udp_denied += 1;
                        self.send_unreachable(&key, last_len, Unreachable::Port);
                        return;
                    }
                    Err(why) => {
                        debug!(%src, %dst, port = dport, reason = why.name(), "udp denied");
                        self.stats.udp_denied += 1;
                        self.send_unreachable(&key, last_len, Unreachable::Prohibited);
                        return;
                    }
                };
                if target == (dst, dport)
                    && let Some(mac) = self.guest_mac
                    && self.offer_to_kernel(now, key, target, mac, host)
                {
                    self.stats.fast_udp_flows += 1;
                    return;
                }
                let Ok(flow) =
                    self.flows
                        .insert(now, key, target, Detail::Udp(udp::Conn::default()))
                else {
                    self.stats.flow_table_full += 1;
                    return;
                };
                if let Err(err) = host.udp_open(flow, SocketAddr::from(target)) {
                    debug!(flow = flow.0, %err, "udp socket failed");
                    self.stats.host_errors += 1;
                    self.flows.remove(flow);
                    host.close(flow, false);
                    if let Some(kind) = udp::icmp_for(&err) {
                        self.send_unreachable(&key, last_len, kind);
                    }
                    return;
                }
                debug!(flow = flow.0, %src, sport, %dst, dport, "new udp flow");
                self.stats.udp_flows += 1;
                self.schedule(flow);
                flow
            }
        };
        if let Some(f) = self.flows.get_mut(flow)
            && let Detail::Udp(c) = &mut f.ext
        {
            c.last_len = last_len;
        }
        self.flows.touch(flow, now);
        self.stats.udp_out += 1;
        if let Err(err) = host.udp_send(flow, payload) {
            trace!(flow = flow.0, %err, "udp send failed");
            if let Some(kind) = udp::icmp_for(&err) {
                self.send_unreachable(&key, last_len, kind);
            }
        }
    }

    /// An inbound UDP flow this datagram answers although it leaves from another of the
    /// guest's addresses: a server bound to the wildcard address replies from whatever
    /// address source selection picks (e.g. its SLAAC address rather than the planned one
    /// the client's datagram was sent to).
    fn inbound_reply(&self, key: &Key) -> Option<FlowId> {
        let planned = match key.guest_addr {
            IpAddr::V4(_) => IpAddr::V4(self.net.ipv4.as_ref()?.guest),
            IpAddr::V6(_) => IpAddr::V6(self.net.ipv6.as_ref()?.guest),
        };
        if planned == key.guest_addr {
            return None;
        }
        let flow = self.flows.lookup(&Key {
            guest_addr: planned,
            ..*key
        })?;
        (self.flows.get(flow)?.origin() == Interface::Host).then_some(flow)
    }

    /// Runs one flow's timer.
    pub(super) fn flow_timer(&mut self, now: Instant, flow: FlowId, host: &mut dyn Host) {
        let Some(f) = self.flows.get(flow) else {
            return;
        };
        let last_seen = f.last_seen();
        match &f.ext {
            Detail::Echo => {
                if now.saturating_duration_since(last_seen) >= flow::ICMP_IDLE {
                    debug!(flow = flow.0, "echo flow idle, closing");
                    self.flows.remove(flow);
                    host.close(flow, false);
                } else {
                    self.flows
                        .set_deadline(flow, Some(last_seen + flow::ICMP_IDLE));
                }
            }
            Detail::Udp(_) => {
                if now.saturating_duration_since(last_seen) >= self.udp_idle {
                    debug!(flow = flow.0, "udp flow idle, closing");
                    self.flows.remove(flow);
                    host.close(flow, false);
                } else {
                    self.flows
                        .set_deadline(flow, Some(last_seen + self.udp_idle));
                }
            }
            Detail::Tcp(_) => {
                self.with_tcp(now, flow, host, |conn, cx| conn.on_timer(cx, last_seen));
            }
            // The shell ends kernel flows; they have no engine timer.
            Detail::Kernel(_) => self.flows.set_deadline(flow, None),
        }
    }

    /// Runs `f` on `flow`'s TCP connection with its socket, then applies the verdict and
    /// reschedules the flow's timer.
    pub(super) fn with_tcp(
        &mut self,
        now: Instant,
        flow: FlowId,
        host: &mut dyn Host,
        f: impl for<'a> FnOnce(&mut Conn, &mut Cx<'a, dyn tcp::HostSocket + 'a>) -> Verdict,
    ) {
        let guest_mac = self.guest_mac.unwrap_or(EthernetAddress::BROADCAST);
        let macs = (self.net.our_mac, guest_mac);
        let mtu = self.net.mtu;
        let Some(entry) = self.flows.get_mut(flow) else {
            return;
        };
        let key = entry.key();
        let Detail::Tcp(conn) = &mut entry.ext else {
            return;
        };
        let mut none = NoSocket;
        let sock: &mut (dyn tcp::HostSocket + '_) = match host.tcp_socket(flow) {
            Some(s) => s,
            None => &mut none,
        };
        let mut cx = Cx {
            now,
            key: &key,
            macs,
            mtu,
            out: &mut self.tx,
            sock,
            ooo_budget: &mut self.ooo_budget,
            counters: &mut self.tcp_counters,
        };
        let verdict = f(conn, &mut cx);
        let (connected, closing) = (conn.state != tcp::TcpState::Connecting, conn.is_closing());
        let push = verdict == Verdict::Keep && conn.take_push_request();
        let held = conn.held_bytes();
        if connected {
            entry.activate();
        }
        if closing {
            entry.mark_closing();
        }
        if push {
            self.pushes.push_back(flow);
        }
        match verdict {
            Verdict::Keep => self.schedule(flow),
            Verdict::Close | Verdict::Abort => {
                let abort = verdict == Verdict::Abort;
                debug!(flow = flow.0, abort, "tcp flow done");
                if abort {
                    self.stats.tcp_resets += 1;
                }
                self.ooo_budget += held;
                self.flows.remove(flow);
                host.close(flow, abort);
            }
        }
    }

    /// Sets `flow`'s deadline from its protocol state.
    pub(super) fn schedule(&mut self, flow: FlowId) {
        let Some(f) = self.flows.get(flow) else {
            return;
        };
        let deadline = match &f.ext {
            Detail::Echo => Some(f.last_seen() + flow::ICMP_IDLE),
            Detail::Udp(_) => Some(f.last_seen() + self.udp_idle),
            Detail::Tcp(conn) => conn.deadline(f.last_seen()),
            Detail::Kernel(_) => None,
        };
        self.flows.set_deadline(flow, deadline);
    }

    /// An initial sequence number (RFC 6528 §3): SipHash-2-4 of the connection and a
    /// counter, keyed with [`Settings::iss_secret`] — unpredictable to whoever does not know
    /// the secret, different across reuse of the same ports — plus a 4-µs clock taken from
    /// `now` (time since the engine started), never from the system.
    pub(super) fn iss(&mut self, now: Instant, key: &Key) -> u32 {
        use std::hash::{Hash, Hasher};
        self.iss_counter = self.iss_counter.wrapping_add(1);
        let mut h = siphasher::sip::SipHasher24::new_with_key(&self.iss_secret);
        key.hash(&mut h);
        self.iss_counter.hash(&mut h);
        let ticks = now.saturating_duration_since(self.epoch).as_micros() / 4;
        let clock = u32::try_from(ticks & u128::from(u32::MAX)).unwrap_or(0);
        let hash = u32::try_from(h.finish() & u64::from(u32::MAX)).unwrap_or(0);
        hash.wrapping_add(clock)
    }

    /// Sends an ICMP destination-unreachable to the guest about a datagram of `key`.
    /// Offers new flow `key` to the kernel's fast path; `true` when the kernel carries it
    /// (the flow is in the table as [`Detail::Kernel`]). A reassembled datagram is not one
    /// frame the fast path could re-inject: its flow stays in userspace.
    fn offer_to_kernel(
        &mut self,
        now: Instant,
        key: Key,
        target: (IpAddr, u16),
        mac: EthernetAddress,
        host: &mut dyn Host,
    ) -> bool {
        if self.reassembled_now {
            return false;
        }
        let unset = SocketAddr::from(([0, 0, 0, 0], 0));
        let Ok(flow) = self.flows.insert(now, key, target, Detail::Kernel(unset)) else {
            return false;
        };
        match host.fast_path(flow, &key, mac) {
            Some(addr) => {
                if let Some(f) = self.flows.get_mut(flow) {
                    f.ext = Detail::Kernel(addr);
                    f.activate();
                }
                true
            }
            None => {
                self.flows.remove(flow);
                false
            }
        }
    }

    /// What the fast path reports about kernel flow `flow`: closing, or gone (its entries
    /// and port released).
    pub fn handle_kernel_flow(&mut self, flow: FlowId, event: super::KernelEvent) {
        match (event, self.flows.get_mut(flow)) {
            (super::KernelEvent::Closing, Some(f)) if matches!(f.ext, Detail::Kernel(_)) => {
                f.mark_closing();
            }
            (super::KernelEvent::Ended, Some(f)) if matches!(f.ext, Detail::Kernel(_)) => {
                debug!(flow = flow.0, "kernel flow ended");
                self.flows.remove(flow);
            }
            _ => self.stats.stale_host_events += 1,
        }
    }

    pub(super) fn send_unreachable(&mut self, key: &Key, payload_len: u16, kind: Unreachable) {
        let udp_len = payload_len.saturating_add(8);
        let mut quote = [0u8; 8];
        quote[..2].copy_from_slice(&key.guest_port.to_be_bytes());
        quote[2..4].copy_from_slice(&key.remote_port.to_be_bytes());
        quote[4..6].copy_from_slice(&udp_len.to_be_bytes());
        let our_mac = self.net.our_mac;
        let dst_mac = self.guest_mac.unwrap_or(EthernetAddress::BROADCAST);
        self.stats.icmp_errors_sent += 1;
        match (key.guest_addr, key.remote_addr) {
            (IpAddr::V4(guest), IpAddr::V4(remote)) => {
                let reason = match kind {
                    Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
                    Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
                    Unreachable::Net => Icmpv4DstUnreachable::NetUnreachable,
                    Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
                };
                let repr = Icmpv4Repr::DstUnreachable {
                    reason,
                    header: Ipv4Repr {
                        src_addr: guest,
                        dst_addr: remote,
                        next_header: IpProtocol::Udp,
                        payload_len: usize::from(udp_len),
                        hop_limit: DEFAULT_HOP_LIMIT,
                    },
                    data: &quote,
                };
                self.transmit(|out| {
                    build::ipv4(
                        out,
                        (our_mac, dst_mac),
                        (remote, guest),
                        DEFAULT_HOP_LIMIT,
                        &Payload::Icmpv4(repr),
                    )
                });
            }
            (IpAddr::V6(guest), IpAddr::V6(remote)) => {
                let reason = match kind {
                    Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
                    Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
                    Unreachable::Net => Icmpv6DstUnreachable::NoRoute,
                    Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                };
                let repr = Icmpv6Repr::DstUnreachable {
                    reason,
                    header: Ipv6Repr {
                        src_addr: guest,
                        dst_addr: remote,
                        next_header: IpProtocol::Udp,
                        payload_len: usize::from(udp_len),
                        hop_limit: DEFAULT_HOP_LIMIT,
                    },
                    data: &quote,
                };
                self.transmit(|out| {
                    build::ipv6(
                        out,
                        (our_mac, dst_mac),
                        (remote, guest),
                        DEFAULT_HOP_LIMIT,
                        &Payload::Icmpv6 { repr, options: &[] },
                    )
                });
            }
            _ => {}
        }
    }
}
