//! The data plane's loop (see the theory of operation in `io`): wait for readiness, read
//! the tap and the ready sockets into the engine, run its timers, write what it queued. The
//! order of the engine calls per iteration is the one [`Engine`]'s documentation
//! prescribes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, SockType, SockaddrStorage, connect, getsockopt, recv, sockopt};
use tracing::{debug, info, warn};

use super::listen::{ACCEPT_BATCH, ListenSocket};
use super::sockets::{Sock, Sockets, reset};
use super::token::{self, Source};
use super::{Command, FlowRow, MAX_RELAYS, TAP_BATCH, UDP_BATCH, fastpath, splice, udp_splice};
use crate::engine::{Engine, Stats};
use crate::flow::FlowId;
use crate::wire;

pub(super) struct Dataplane {
    pub(super) poll: Poll,
    /// The tap, or `-F`'s socket; `None` with `--splice-only`.
    pub(super) tap: Option<super::link::Port>,
    /// Set when `-F`'s socket closed: the loop then ends (pasta's one-off).
    pub(super) link_closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(super) engine: Engine,
    pub(super) rx: mpsc::Receiver<Command>,
    pub(super) sockets: Sockets,
    pub(super) buf: Vec<u8>,
    pub(super) tap_pending: bool,
    pub(super) drop_every: Option<u32>,
    pub(super) frames_seen: [u64; 2],
    pub(super) frames_dropped: [u64; 2],
    /// The `-U` relays, and how long an idle one lives.
    pub(super) udp_relays: udp_splice::Relays,
    pub(super) udp_idle: Duration,
    /// How `-t` clients from the host's loopback are spliced into the namespace.
    pub(super) lo_splice: Option<super::LoopbackSplice>,
    /// `-p/--pcap`.
    pub(super) capture: Option<super::capture::Capture>,
    /// `--splice-only`: no tap; only host loopback clients of `-t` are served.
    pub(super) splice_only: bool,
}

impl Dataplane {
    pub(super) fn run(mut self) -> Result<Stats> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = if self.tap_pending {
                Some(Duration::ZERO)
            } else {
                let engine = self
                    .engine
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(now));
                match (&self.sockets.fast, engine) {
                    (Some(f), e) if !f.is_empty() => {
                        Some(e.map_or(fastpath::SCAN_INTERVAL, |e| e.min(fastpath::SCAN_INTERVAL)))
                    }
                    (_, e) => e,
                }
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("poll"),
            }
            let now = Instant::now();
            let mut tap_ready = self.tap_pending;
            for event in &events {
                match token::source(event.token()) {
                    Source::Tap => tap_ready = true,
                    Source::FastEvents => {}
                    Source::Waker => {
                        while let Ok(cmd) = self.rx.try_recv() {
                            match cmd {
                                Command::LogStats => {
                                    info!("stats: {}", self.engine.stats().summary());
                                }
                                Command::AddForward(id, listeners) => {
                                    if let Err(err) = self.sockets.add_forward(id, listeners) {
                                        warn!(%err, forward = id, "registering a forward failed");
                                    }
                                }
                                Command::RemoveForward(id) => self.sockets.remove_forward(id),
                                Command::Stats(reply) => {
                                    let _ = reply.send(self.stats());
                                }
                                Command::Flows(reply) => {
                                    let _ = reply.send(self.flow_rows());
                                }
                                Command::SetLocalPrefixes(prefixes) => {
                                    self.engine.set_local_prefixes(prefixes);
                                }
                                Command::LoopbackSplice(splice) => {
                                    self.lo_splice = Some(splice);
                                }
                                Command::Stop => {
                                    if self.drop_every.is_some() {
                                        info!(
                                            dropped_from_tap = self.frames_dropped[0],
                                            dropped_to_tap = self.frames_dropped[1],
                                            "test hook drops"
                                        );
                                    }
                                    return Ok(self.stats());
                                }
                            }
                        }
                    }
                    // A kernel UDP flow's reservation: drained like a UDP flow's socket.
                    Source::Reservation(flow) => self.drain_udp(now, flow),
                    Source::UdpRelay(id) => {
                        self.udp_relays
                            .handle_host(relay_ends(&self.sockets), now, id);
                    }
                    Source::Relay { id, side } => self.relay_event(id, side, event),
                    Source::Listener(key) => self.listener_event(now, key),
                    Source::Flow(flow) => self.socket_event(now, flow, event),
                }
            }
            if tap_ready {
                self.read_tap(now);
                if self.link_closed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(self.stats());
                }
            }
            self.udp_relays
                .expire(relay_ends(&self.sockets), now, self.udp_idle);
            if let Some(f) = &mut self.sockets.fast {
                for (flow, event) in f.poll(now) {
                    self.engine.handle_kernel_flow(flow, event);
                }
            }
            self.engine.handle_timeout(now, &mut self.sockets);
            self.flush();
        }
    }

    /// The engine's counters with the fast path's.
    fn stats(&self) -> Stats {
        let mut s = self.engine.stats();
        if let Some(f) = &self.sockets.fast {
            let c = &f.counters;
            s.fast_declined_local = c.declined_local;
            s.fast_declined_full = c.declined_full;
            s.fast_failed = c.failed;
            s.fast_closed = c.closed;
            s.fast_expired = c.expired;
            s.fast_events = c.events;
        }
        s
    }

    /// Every flow of the engine's table; the kernel's with their host address and port
    /// and the counters of their entries.
    fn flow_rows(&self) -> Vec<FlowRow> {
        self.engine
            .flows()
            .iter()
            .map(|(id, f)| {
                let kernel = match f.ext {
                    crate::engine::Detail::Kernel(host) => Some(host),
                    _ => None,
                };
                FlowRow {
                    id: id.0,
                    protocol: f.key().protocol.name(),
                    guest: SocketAddr::new(f.key().guest_addr, f.key().guest_port),
                    remote: SocketAddr::new(f.key().remote_addr, f.key().remote_port),
                    path: if kernel.is_some() {
                        "kernel"
                    } else {
                        "userspace"
                    },
                    host: kernel,
                    state: f.state().name(),
                    counters: kernel
                        .and(self.sockets.fast.as_ref())
                        .and_then(|fast| fast.counters_of(id)),
                }
            })
            .collect()
    }

    fn socket_event(&mut self, now: Instant, flow: FlowId, event: &mio::event::Event) {
        match self.sockets.map.get(&flow) {
            Some(Sock::Tcp(_)) => self.engine.handle_tcp_ready(
                now,
                flow,
                event.is_readable() || event.is_read_closed(),
                event.is_writable(),
                event.is_error(),
                &mut self.sockets,
            ),
            Some(Sock::Udp(_)) => self.drain_udp(now, flow),
            Some(Sock::Echo { .. }) => self.drain_echo(now, flow),
            Some(Sock::UdpVia { .. }) | None => {}
        }
    }

    /// A forwarded port is readable: accept connections / receive datagrams.
    fn listener_event(&mut self, now: Instant, index: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some((_, l)) = self.sockets.listeners.get(&index) else {
                return;
            };
            let ns_port = l.ns_port;
            let dest = l.dest();
            match &l.socket {
                ListenSocket::Tcp(t) => match t.accept() {
                    Ok((stream, peer))
                        if self.lo_splice.is_some() && dest.addr.is_none() && loopback(peer) =>
                    {
                        self.splice_to_namespace(stream, peer, ns_port);
                    }
                    Ok((stream, peer)) if self.splice_only => {
                        // --splice-only: only loopback clients are forwarded.
                        debug!(%peer, "splice-only: a client not on the host's loopback, refused");
                        reset(&OwnedFd::from(stream));
                    }
                    Ok((stream, peer)) => {
                        let _ = stream.set_nonblocking(true);
                        let _ = stream.set_nodelay(true);
                        self.sockets.accepted = Some(OwnedFd::from(stream));
                        self.engine
                            .handle_inbound_tcp(now, dest, peer, &mut self.sockets);
                        if let Some(fd) = self.sockets.accepted.take() {
                            // Not taken (table full, family off): reset the client.
                            reset(&fd);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(err) => {
                        debug!(%err, "accept failed");
                        return;
                    }
                },
                ListenSocket::NsTcp(t) => match t.accept() {
                    Ok((stream, peer)) => self.start_relay(stream, peer, ns_port),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(err) => {
                        debug!(%err, "accept in the namespace failed");
                        return;
                    }
                },
                ListenSocket::NsUdp(_) => {
                    self.udp_relays
                        .handle_namespace(relay_ends(&self.sockets), now, index);
                    return;
                }
                ListenSocket::Udp(u) => match u.recv_from(&mut self.buf) {
                    Ok((n, peer)) => self.engine.handle_inbound_udp(
                        now,
                        index,
                        dest,
                        peer,
                        self.buf.get(..n).unwrap_or_default(),
                        &mut self.sockets,
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(err) => {
                        debug!(%err, "forwarded udp port error");
                        return;
                    }
                },
            }
        }
    }

    /// A `-T` connection from the namespace: connect to the host's loopback port `to` in
    /// the same family and splice the two.
    fn start_relay(&mut self, stream: std::net::TcpStream, peer: SocketAddr, to: u16) {
        if self.sockets.relays.len() >= MAX_RELAYS {
            debug!("too many spliced connections, refusing one");
            return;
        }
        let target = if peer.is_ipv6() {
            SocketAddr::from((Ipv6Addr::LOCALHOST, to))
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, to))
        };
        let host_fd = match self.sockets.new_socket(target, SockType::Stream) {
            Ok(fd) => fd,
            Err(err) => {
                debug!(%err, "splice: host socket");
                return;
            }
        };
        self.splice(stream, host_fd, peer, target);
    }

    /// A `-t` client from the host's loopback: spliced to the guest's address of its
    /// family (or, with `--host-lo-to-ns-lo`, to the same loopback address) at the
    /// forward's port, through a socket the namespace agent made there.
    fn splice_to_namespace(&mut self, stream: std::net::TcpStream, peer: SocketAddr, to: u16) {
        if self.sockets.relays.len() >= MAX_RELAYS {
            debug!("too many spliced connections, refusing one");
            return;
        }
        let Some(splice) = &self.lo_splice else {
            return;
        };
        let v4 = unmapped(peer.ip()).is_ipv4();
        let ip = if splice.to_loopback {
            match stream.local_addr().map(|a| unmapped(a.ip())) {
                Ok(ip) if ip.is_loopback() => ip,
                _ if v4 => Ipv4Addr::LOCALHOST.into(),
                _ => Ipv6Addr::LOCALHOST.into(),
            }
        } else {
            match splice.guest.iter().find(|a| a.is_ipv4() == v4) {
                Some(a) => *a,
                None => {
                    debug!(%peer, "splice: the namespace has no address of that family");
                    return;
                }
            }
        };
        let target = SocketAddr::new(ip, to);
        let ns_fd = match splice.source.tcp_socket(target.is_ipv6()) {
            Ok(fd) => fd,
            Err(err) => {
                debug!("splice: namespace socket: {err:#}");
                return;
            }
        };
        self.splice(stream, ns_fd, peer, target);
    }

    /// Connects `connecting` to `target` and splices it with the accepted `stream`.
    fn splice(
        &mut self,
        stream: std::net::TcpStream,
        connecting: OwnedFd,
        peer: SocketAddr,
        target: SocketAddr,
    ) {
        let _ = stream.set_nonblocking(true);
        let accepted = OwnedFd::from(stream);
        match connect(connecting.as_raw_fd(), &SockaddrStorage::from(target)) {
            Ok(()) | Err(Errno::EINPROGRESS) => {}
            Err(err) => {
                debug!(%err, %target, "splice: connect");
                reset(&accepted);
                return;
            }
        }
        let relay = match splice::Relay::new(accepted, connecting) {
            Ok(r) => r,
            Err(err) => {
                debug!(%err, "splice: pipes");
                return;
            }
        };
        let id = self.sockets.next_relay;
        self.sockets.next_relay = self.sockets.next_relay.wrapping_add(1) % (1 << 30);
        for (side, fd) in relay.sockets.iter().enumerate() {
            let token = token::relay(id, side);
            if let Err(err) = self.sockets.registry.register(
                &mut SourceFd(&fd.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                debug!(%err, "splice: register");
                return;
            }
        }
        debug!(relay = id, %peer, %target, "spliced connection");
        self.sockets.relays.insert(id, relay);
    }

    fn relay_event(&mut self, id: usize, side: usize, event: &mio::event::Event) {
        let Some(relay) = self.sockets.relays.get_mut(&id) else {
            return;
        };
        let mut failed = false;
        if !relay.connected && side == 1 && (event.is_writable() || event.is_error()) {
            match relay
                .sockets
                .get(1)
                .map(|fd| getsockopt(fd, sockopt::SocketError))
            {
                Some(Ok(0)) => relay.connected = true,
                _ => failed = true,
            }
        }
        let progress = if failed {
            splice::Progress::Failed
        } else {
            relay.pump()
        };
        if progress == splice::Progress::Open {
            return;
        }
        if let Some(relay) = self.sockets.relays.remove(&id) {
            for fd in &relay.sockets {
                let _ = self
                    .sockets
                    .registry
                    .deregister(&mut SourceFd(&fd.as_raw_fd()));
                if progress == splice::Progress::Failed {
                    reset(fd);
                }
            }
            debug!(relay = id, ?progress, "spliced connection done");
        }
    }

    fn read_tap(&mut self, now: Instant) {
        self.tap_pending = false;
        // Taken for the batch (the engine never touches it), put back after.
        let Some(mut tap) = self.tap.take() else {
            return;
        };
        self.read_tap_batch(&mut tap, now);
        self.tap = Some(tap);
    }

    fn read_tap_batch(&mut self, tap: &mut super::link::Port, now: Instant) {
        for _ in 0..TAP_BATCH {
            match tap.next_frame(&mut self.buf) {
                Ok(n) => {
                    if self.test_drop(0) {
                        continue;
                    }
                    let frame = self.buf.get(..n).unwrap_or_default();
                    if let Some(c) = &mut self.capture {
                        c.frame(frame);
                    }
                    self.engine.handle_frame(now, frame, &mut self.sockets);
                    if self.sockets.reinject {
                        self.sockets.reinject = false;
                        if let Some(f) = &self.sockets.fast {
                            f.reinject(frame);
                        }
                    }
                }
                Err(super::link::Stop::Idle) => {
                    self.engine.end_batch(now, &mut self.sockets);
                    return;
                }
                Err(super::link::Stop::Closed) => {
                    info!("the namespace's socket (-F) was closed");
                    self.link_closed
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    self.engine.end_batch(now, &mut self.sockets);
                    return;
                }
            }
        }
        self.engine.end_batch(now, &mut self.sockets);
        self.tap_pending = true;
    }

    /// The deterministic loss hook: whether to drop this frame (`dir` 0 = from the tap).
    fn test_drop(&mut self, dir: usize) -> bool {
        let Some(n) = self.drop_every else {
            return false;
        };
        let (Some(seen), Some(dropped)) = (
            self.frames_seen.get_mut(dir),
            self.frames_dropped.get_mut(dir),
        ) else {
            return false;
        };
        *seen += 1;
        if (*seen).is_multiple_of(u64::from(n)) {
            *dropped += 1;
            true
        } else {
            false
        }
    }

    fn drain_udp(&mut self, now: Instant, flow: FlowId) {
        for _ in 0..UDP_BATCH {
            let Some(fd) = self.sockets.udp_fd(flow) else {
                return;
            };
            match recv(fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => self.engine.handle_udp_datagram(
                    now,
                    flow,
                    self.buf.get(..n).unwrap_or_default(),
                ),
                Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(err) => {
                    self.engine
                        .handle_udp_error(now, flow, &std::io::Error::from(err));
                }
            }
        }
    }

    fn drain_echo(&mut self, now: Instant, flow: FlowId) {
        let Some(Sock::Echo { fd, v6 }) = self.sockets.map.get(&flow) else {
            return;
        };
        let v6 = *v6;
        loop {
            match recv(fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    if let Some((seq, data)) =
                        wire::parse_echo_reply(self.buf.get(..n).unwrap_or_default(), v6)
                    {
                        self.engine.handle_echo_reply(now, flow, seq, data);
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(err) => {
                    // ICMP errors (unreachable, TTL) arrive as socket errors; the guest's
                    // request simply goes unanswered, as it would on a real path.
                    debug!(flow = flow.0, %err, "ping socket error");
                    return;
                }
            }
        }
    }

    fn flush(&mut self) {
        while let Some(frame) = self.engine.poll_transmit() {
            if let Some(c) = &mut self.capture {
                c.frame(&frame);
            }
            let dropped = self.test_drop(1);
            if !dropped
                && let Some(tap) = &mut self.tap
                && let Err(err) = tap.send(&frame)
            {
                debug!(%err, len = frame.len(), "tap write failed");
            }
            self.engine.recycle(frame);
        }
        if let Some(tap) = &mut self.tap {
            tap.flush();
        }
        if let Some(c) = &mut self.capture {
            c.flush();
        }
    }
}

/// Whether a client is on the host's loopback (IPv4-mapped on a dual-stack socket too).
fn loopback(peer: SocketAddr) -> bool {
    unmapped(peer.ip()).is_loopback()
}

fn unmapped(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// What the `-U` relays work with, from the sockets they do not own.
fn relay_ends(sockets: &Sockets) -> udp_splice::Ends<'_> {
    udp_splice::Ends {
        listeners: &sockets.listeners,
        registry: &sockets.registry,
        outbound: &sockets.outbound,
    }
}
