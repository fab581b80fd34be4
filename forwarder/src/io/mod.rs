//! # Theory of operation
//!
//! The data plane's I/O shell: one dedicated thread that owns the [`Engine`], the tap and
//! the flows' host sockets, and does nothing but move bytes between them and the engine.
//!
//! ## Why a thread with mio, not tokio tasks
//!
//! The engine is a single owner of the flow table (STYLE A2), so the data plane is one
//! sequential loop: wait for readiness, read everything ready, run it through the engine,
//! write everything the engine produced. mio's `Poll` (the epoll wrapper tokio itself is
//! built on) gives exactly that loop with one registry for the tap and thousands of flow
//! sockets, no task or channel per packet, and no `Send` bounds on engine state. tokio runs
//! the control plane (signals, the child process, the API, `auto`) and talks to this thread
//! through a [`Handle`]: a channel of [`Command`]s plus a mio `Waker`.
//!
//! ## One iteration
//!
//! 1. `poll` until the tap or a socket is readable, a command arrives, or the engine's
//!    next timer is due.
//! 2. Read up to [`TAP_BATCH`] frames from the tap (edge-triggered: if the batch limit,
//!    not `EAGAIN`, ended the read, the next poll does not block); each goes to
//!    `Engine::handle_frame`.
//!    Then `Engine::end_batch` sends the ACKs coalesced over the batch.
//! 3. Socket events: TCP readiness to `Engine::handle_tcp_ready`; readable UDP sockets are
//!    drained (one `recv` per datagram) into `Engine::handle_udp_datagram`; ping sockets
//!    into `Engine::handle_echo_reply`.
//! 4. `Engine::handle_timeout`, then execute echo host operations and write queued frames.
//!
//! ## Host sockets ([`Sockets`], the engine's `Host`, in `io::sockets`)
//!
//! All non-blocking, registered edge-triggered with the flow id plus [`FIRST_FLOW_TOKEN`]
//! as token. TCP: `connect()` in progress is completed by the writable edge (`SO_ERROR`);
//! `TCP_NODELAY` (the guest's own stack already coalesced); `SO_PEEK_OFF` so a peek at
//! offset N costs nothing for the N bytes before it (Linux ≥ 6.9; older kernels peek into a
//! scratch prefix instead); acknowledged bytes are dropped with `recv(MSG_TRUNC)` without a
//! copy; free send space is `SO_SNDBUF - SIOCOUTQ`; an abort sets `SO_LINGER {1, 0}` so the
//! close sends a RST. UDP: one socket per flow, `connect()`ed. Echo: unprivileged ping
//! sockets (`SOCK_DGRAM`, `IPPROTO_ICMP[V6]`); [`ping_sockets_allowed`] probes once at
//! start-up whether `net.ipv4.ping_group_range` admits this process. `--outbound` /
//! `--outbound-if` bind TCP and UDP sockets to an address or device.
//!
//! ## The kernel's fast path (`--ebpf`)
//!
//! `Sockets` also holds the fast path's userspace half (`fastpath`): the engine offers a
//! new flow's first packet through `Host::fast_path`; when the kernel takes it, the loop
//! sends the frame it just handled again on the re-injection socket. The ring buffer of
//! FIN/RST events is one more registered fd; each iteration drains it and, once a second,
//! the fast path scans its entries and reports closing and ended flows to the engine. A
//! kernel UDP flow's reservation socket is registered too (token
//! `fastpath::FIRST_TOKEN` + flow id): what the host's stack queues there — fragmented
//! replies, untranslated ICMP errors — goes to the engine like a UDP flow's.
//!
//! ## Forwarded ports
//!
//! The control plane binds them and hands them over as one forward with an id
//! ([`Command::AddForward`]); each socket gets a key (its token minus
//! [`FIRST_LISTENER_TOKEN`], never reused) and remembers its forward, so
//! [`Command::RemoveForward`] closes exactly that forward's sockets while accepted
//! connections, relays and flows go on. `-t` connections and `-u` datagrams go to the engine;
//! `-T` connections are spliced (`splice`), `-U` datagrams relayed in batches
//! (`udp_splice`), both to the host's loopback without the engine.
//!
//! ## Test hook
//!
//! `--drop-every N` (hidden) drops every Nth frame in each direction on the tap path,
//! deterministically, so loss recovery is testable end to end; the drops are logged at exit.
//!
//! ## Limits
//!
//! One frame buffer of [`MAX_FRAME`] bytes; a tap write that fails is logged at debug (the
//! guest's TCP/ICMP retransmits).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, connect,
    getsockopt, recv, send, setsockopt, socket, sockopt,
};
use tracing::{debug, info, warn};

pub mod fastpath;
mod sockets;
mod splice;
mod udp_splice;

use sockets::{open_ping, reset};

use crate::engine::{Engine, HostOp, Stats};
use crate::flow::FlowId;
use crate::policy::Prefix;
use crate::wire;

/// A command from the control plane.
#[derive(Debug)]
pub enum Command {
    /// Log the counters at info level.
    LogStats,
    /// Serve these bound sockets as forward `id` (see `control`).
    AddForward(u32, Vec<Listener>),
    /// Close the sockets of forward `id`; connections already accepted go on.
    RemoveForward(u32),
    /// Answer with the current counters.
    Stats(mpsc::Sender<Stats>),
    /// Replace the host-local prefixes the policy uses.
    SetLocalPrefixes(Vec<Prefix>),
    /// Answer with every flow, userspace's and the kernel's.
    Flows(mpsc::Sender<Vec<FlowRow>>),
    /// Stop the loop and return the final counters.
    Stop,
}

/// One flow as listed by the API (`list_flows`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRow {
    /// The flow's id in the engine's table.
    pub id: u64,
    /// "tcp", "udp", "icmp".
    pub protocol: &'static str,
    /// The guest's side.
    pub guest: SocketAddr,
    /// The other side, as the guest named it.
    pub remote: SocketAddr,
    /// "userspace" or "kernel".
    pub path: &'static str,
    /// The host address and port a kernel flow leaves from.
    pub host: Option<SocketAddr>,
    /// Lifecycle state.
    pub state: &'static str,
    /// Packets and bytes out of and into the namespace (kernel flows).
    pub counters: Option<[u64; 4]>,
}

/// Where outbound sockets are bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outbound {
    /// Source address for IPv4 sockets.
    pub v4: Option<Ipv4Addr>,
    /// Source address for IPv6 sockets.
    pub v6: Option<Ipv6Addr>,
    /// Device (`SO_BINDTODEVICE`).
    pub iface: Option<String>,
}

/// A bound forwarded-port socket (see `forward`).
#[derive(Debug)]
pub struct Listener {
    socket: ListenSocket,
    ns_port: u16,
}

#[derive(Debug)]
enum ListenSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
    /// `-T`: bound in the namespace; connections are spliced to the host's loopback.
    NsTcp(std::net::TcpListener),
    /// `-U`: bound in the namespace; datagrams are relayed to the host's loopback.
    NsUdp(std::net::UdpSocket),
}

impl Listener {
    /// A `-T` listening socket (`udp`: a `-U` socket) bound in the namespace, relaying to
    /// host port `to`.
    #[must_use]
    pub fn namespace(fd: OwnedFd, to: u16, udp: bool) -> Self {
        let socket = if udp {
            ListenSocket::NsUdp(std::net::UdpSocket::from(fd))
        } else {
            ListenSocket::NsTcp(std::net::TcpListener::from(fd))
        };
        Self {
            socket,
            ns_port: to,
        }
    }

    /// A `-t` listening socket (`udp`: a `-u` socket) bound on the host, forwarding to
    /// namespace port `to`.
    fn host(fd: OwnedFd, to: u16, udp: bool) -> Self {
        let socket = if udp {
            ListenSocket::Udp(std::net::UdpSocket::from(fd))
        } else {
            ListenSocket::Tcp(std::net::TcpListener::from(fd))
        };
        Self {
            socket,
            ns_port: to,
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match &self.socket {
            ListenSocket::Tcp(t) | ListenSocket::NsTcp(t) => t.as_raw_fd(),
            ListenSocket::Udp(u) | ListenSocket::NsUdp(u) => u.as_raw_fd(),
        }
    }
}

/// A non-blocking UDP socket bound to `addr` (IPv6 only for IPv6 addresses).
///
/// # Errors
///
/// The socket call that failed (e.g. the address is in use).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    bound_socket(addr, SockType::Datagram, true)
}

/// A non-blocking TCP listening socket on `addr` (IPv6 only for IPv6 addresses).
///
/// # Errors
///
/// The socket call that failed (e.g. the address is in use).
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    bound_socket(addr, SockType::Stream, true)
}

/// Binds the forwarded ports `maps` (UDP with `udp`, else TCP), all or nothing: the first
/// port that cannot be bound is the error, and the sockets bound before it are closed when
/// the partial list is dropped.
///
/// # Errors
///
/// Naming the protocol, address and port that failed (e.g. already in use).
pub fn bind_forwards(maps: &[crate::forward::PortMap], udp: bool) -> Result<Vec<Listener>> {
    let name = if udp { "udp" } else { "tcp" };
    maps.iter()
        .map(|m| {
            let fd = bind_one(m, udp).with_context(|| match m.bind {
                Some(a) => format!("forward {name} port {} on {a}", m.listen),
                None => format!("forward {name} port {}", m.listen),
            })?;
            Ok(Listener::host(fd, m.to, udp))
        })
        .collect()
}

/// Binds what it can of `maps` (`all`): ports that fail are skipped and counted. Returns
/// the sockets and the forwards they serve.
///
/// # Errors
///
/// When not one port could be bound.
pub fn bind_best_effort(
    maps: &[crate::forward::PortMap],
    udp: bool,
) -> Result<(Vec<Listener>, Vec<crate::forward::PortMap>)> {
    let mut out = Vec::new();
    let mut bound = Vec::new();
    let mut skipped = 0usize;
    for m in maps {
        match bind_one(m, udp) {
            Ok(fd) => {
                out.push(Listener::host(fd, m.to, udp));
                bound.push(*m);
            }
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => {
                anyhow::bail!(
                    "all: out of file descriptors after {} ports: all needs one per port, raise the hard open-file limit (ulimit -Hn)",
                    out.len()
                )
            }
            Err(_) => skipped += 1,
        }
    }
    if out.is_empty() && !maps.is_empty() {
        anyhow::bail!(
            "all: none of {} {} ports could be bound",
            maps.len(),
            if udp { "udp" } else { "tcp" }
        );
    }
    info!(
        bound = out.len(),
        skipped,
        proto = if udp { "udp" } else { "tcp" },
        "all: ports bound"
    );
    Ok((out, bound))
}

fn bind_one(m: &crate::forward::PortMap, udp: bool) -> std::io::Result<OwnedFd> {
    let ty = if udp {
        SockType::Datagram
    } else {
        SockType::Stream
    };
    match m.bind {
        Some(a) => bound_socket(SocketAddr::new(a, m.listen), ty, true),
        // One dual-stack socket: IPv4 clients arrive as IPv4-mapped addresses; IPv4 only
        // where the host has no IPv6.
        None => match bound_socket(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, m.listen)),
            ty,
            false,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => bound_socket(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, m.listen)),
                ty,
                true,
            ),
            other => other,
        },
    }
}

/// A non-blocking socket bound to `addr` (and listening, for TCP); an IPv6 socket takes
/// IPv4-mapped clients unless `v6_only`.
fn bound_socket(addr: SocketAddr, ty: SockType, v6_only: bool) -> std::io::Result<OwnedFd> {
    let fd = socket(
        family(addr),
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &v6_only)?;
    }
    let stream = ty == SockType::Stream;
    if stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    if stream {
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(LISTEN_BACKLOG)?)?;
    }
    Ok(fd)
}

/// The socket family of `addr`.
pub(crate) fn family(addr: SocketAddr) -> AddressFamily {
    if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

/// A socket address as the standard library's type (IPv4 or IPv6; `None` for another
/// family).
pub(crate) fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// Options of the data plane itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Binding of outbound sockets.
    pub outbound: Outbound,
    /// Idle time after which a `-U` relay's host socket is closed.
    pub udp_idle: Duration,
    /// Test hook: drop every Nth tap frame each way.
    pub drop_every: Option<u32>,
}

/// The control plane's handle on the data-plane thread.
#[derive(Debug)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    waker: std::sync::Arc<Waker>,
    thread: Option<std::thread::JoinHandle<Result<Stats>>>,
}

impl Handle {
    /// Sends a command and wakes the loop.
    pub fn send(&self, cmd: Command) {
        if self.tx.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Stops the loop and returns its final counters.
    ///
    /// # Errors
    ///
    /// The data plane's own error, if it failed.
    pub fn stop(mut self) -> Result<Stats> {
        self.send(Command::Stop);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow::anyhow!("data plane thread panicked")),
            None => Err(anyhow::anyhow!("data plane already stopped")),
        }
    }

    /// Whether the loop has ended on its own (an error).
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.thread
            .as_ref()
            .is_none_or(std::thread::JoinHandle::is_finished)
    }
}

/// Starts the data plane on its own thread.
///
/// # Errors
///
/// When the poller cannot be created or the tap registered.
pub fn spawn(
    tap: OwnedFd,
    engine: Engine,
    options: Options,
    forwards: Vec<(u32, Vec<Listener>)>,
    fast: Option<fastpath::FastPath>,
) -> Result<Handle> {
    let poll = Poll::new().context("create poller")?;
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), WAKER).context("create waker")?);
    poll.registry()
        .register(&mut SourceFd(&tap.as_raw_fd()), TAP, Interest::READABLE)
        .context("register the tap")?;
    let mut fast = fast;
    if let Some(f) = &mut fast {
        poll.registry()
            .register(
                &mut SourceFd(&f.events_fd()),
                FAST_EVENTS,
                Interest::READABLE,
            )
            .context("register the fast path's ring buffer")?;
        f.set_registry(poll.registry().try_clone().context("clone the registry")?);
    }
    let registry = poll.registry().try_clone().context("clone the registry")?;
    let (tx, rx) = mpsc::channel();
    let plane = Dataplane {
        poll,
        tap,
        engine,
        rx,
        sockets: Sockets {
            registry,
            map: HashMap::new(),
            outbound: options.outbound,
            listeners: HashMap::new(),
            next_listener: 0,
            accepted: None,
            relays: HashMap::new(),
            next_relay: 0,
            udp_relays: udp_splice::Relays::default(),
            udp_idle: options.udp_idle,
            fast,
            reinject: false,
        },
        buf: vec![0; MAX_FRAME],
        tap_pending: false,
        drop_every: options.drop_every,
        frames_seen: [0; 2],
        frames_dropped: [0; 2],
    };
    let mut plane = plane;
    for (id, listeners) in forwards {
        plane
            .sockets
            .add_forward(id, listeners)
            .context("register a forwarded port")?;
    }
    let thread = std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || plane.run())
        .context("start the data plane thread")?;
    Ok(Handle {
        tx,
        waker,
        thread: Some(thread),
    })
}

/// Whether this process may open unprivileged ping sockets (`net.ipv4.ping_group_range`).
#[must_use]
pub fn ping_sockets_allowed() -> bool {
    match socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    ) {
        Ok(_) => true,
        Err(err) => {
            debug!(%err, "ping socket probe failed");
            false
        }
    }
}

struct Dataplane {
    poll: Poll,
    tap: OwnedFd,
    engine: Engine,
    rx: mpsc::Receiver<Command>,
    sockets: Sockets,
    buf: Vec<u8>,
    tap_pending: bool,
    drop_every: Option<u32>,
    frames_seen: [u64; 2],
    frames_dropped: [u64; 2],
}

/// The flows' host sockets: the engine's [`Host`](crate::engine::Host).
pub struct Sockets {
    registry: Registry,
    map: HashMap<FlowId, Sock>,
    outbound: Outbound,
    /// Forwarded-port sockets by key (token minus [`FIRST_LISTENER_TOKEN`]), with the
    /// forward each belongs to.
    listeners: HashMap<usize, (u32, Listener)>,
    next_listener: usize,
    accepted: Option<OwnedFd>,
    relays: HashMap<usize, splice::Relay>,
    next_relay: usize,
    udp_relays: udp_splice::Relays,
    udp_idle: Duration,
    /// The kernel's fast path (`--ebpf`), when it runs.
    fast: Option<fastpath::FastPath>,
    /// The frame being handled was claimed by the fast path: send it again.
    reinject: bool,
}

impl Sockets {
    /// Registers the sockets of forward `id`.
    fn add_forward(&mut self, id: u32, listeners: Vec<Listener>) -> std::io::Result<()> {
        for l in listeners {
            let key = self.next_listener;
            self.next_listener += 1;
            self.registry.register(
                &mut SourceFd(&l.raw_fd()),
                Token(FIRST_LISTENER_TOKEN.0 + key),
                Interest::READABLE,
            )?;
            self.listeners.insert(key, (id, l));
        }
        Ok(())
    }

    /// Closes the sockets of forward `id`.
    fn remove_forward(&mut self, id: u32) {
        let keys: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, (f, _))| *f == id)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some((_, l)) = self.listeners.remove(&key) {
                let _ = self.registry.deregister(&mut SourceFd(&l.raw_fd()));
            }
        }
    }
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets")
            .field("sockets", &self.map.len())
            .finish_non_exhaustive()
    }
}

enum Sock {
    Echo {
        fd: OwnedFd,
        v6: bool,
    },
    Tcp(TcpSock),
    Udp(OwnedFd),
    /// An inbound UDP flow: replies leave through forwarded-port socket `listener`.
    UdpVia {
        listener: usize,
        peer: SocketAddr,
    },
}

struct TcpSock {
    fd: OwnedFd,
    /// The kernel's `SO_PEEK_OFF`, or `None` when the kernel lacks it for TCP.
    peek_off: Option<usize>,
    scratch: Vec<u8>,
}

impl Dataplane {
    fn run(mut self) -> Result<Stats> {
        let mut events = Events::with_capacity(1024);
        let mut scratch = Vec::new();
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
                match event.token() {
                    TAP => tap_ready = true,
                    FAST_EVENTS => {}
                    WAKER => {
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
                    Token(t) if t >= fastpath::FIRST_TOKEN.0 => {
                        let flow = FlowId(u64::try_from(t - fastpath::FIRST_TOKEN.0).unwrap_or(0));
                        // A kernel UDP flow's reservation: drained like a UDP flow's socket.
                        self.drain_udp(now, flow);
                    }
                    Token(t) if t >= FIRST_UDP_RELAY_TOKEN.0 => {
                        self.sockets
                            .udp_relay_event(now, t - FIRST_UDP_RELAY_TOKEN.0);
                    }
                    Token(t) if t >= FIRST_RELAY_TOKEN.0 => {
                        self.relay_event(t - FIRST_RELAY_TOKEN.0, event);
                    }
                    Token(t) if t >= FIRST_LISTENER_TOKEN.0 => {
                        self.listener_event(now, t - FIRST_LISTENER_TOKEN.0);
                    }
                    Token(t) => {
                        let flow = FlowId(u64::try_from(t - FIRST_FLOW_TOKEN.0).unwrap_or(0));
                        self.socket_event(now, flow, event);
                    }
                }
            }
            if tap_ready {
                self.read_tap(now);
            }
            self.sockets.expire_udp_relays(now);
            if let Some(f) = &mut self.sockets.fast {
                for (flow, event) in f.poll(now) {
                    self.engine.handle_kernel_flow(flow, event);
                }
            }
            self.engine.handle_timeout(now, &mut self.sockets);
            self.run_host_ops(now, &mut scratch);
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
                    protocol: f.key.protocol.name(),
                    guest: SocketAddr::new(f.key.guest_addr, f.key.guest_port),
                    remote: SocketAddr::new(f.key.remote_addr, f.key.remote_port),
                    path: if kernel.is_some() {
                        "kernel"
                    } else {
                        "userspace"
                    },
                    host: kernel,
                    state: f.state.name(),
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
            match &l.socket {
                ListenSocket::Tcp(t) => match t.accept() {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nonblocking(true);
                        let _ = stream.set_nodelay(true);
                        self.sockets.accepted = Some(OwnedFd::from(stream));
                        self.engine
                            .handle_inbound_tcp(now, ns_port, peer, &mut self.sockets);
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
                    self.sockets.udp_from_namespace(now, index);
                    return;
                }
                ListenSocket::Udp(u) => match u.recv_from(&mut self.buf) {
                    Ok((n, peer)) => self.engine.handle_inbound_udp(
                        now,
                        index,
                        ns_port,
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
        let _ = stream.set_nonblocking(true);
        let ns_fd = OwnedFd::from(stream);
        let host_fd = match self.sockets.new_socket(target, SockType::Stream) {
            Ok(fd) => fd,
            Err(err) => {
                debug!(%err, "splice: host socket");
                return;
            }
        };
        match connect(host_fd.as_raw_fd(), &SockaddrStorage::from(target)) {
            Ok(()) | Err(Errno::EINPROGRESS) => {}
            Err(err) => {
                debug!(%err, %target, "splice: connect");
                reset(&ns_fd);
                return;
            }
        }
        let relay = match splice::Relay::new(ns_fd, host_fd) {
            Ok(r) => r,
            Err(err) => {
                debug!(%err, "splice: pipes");
                return;
            }
        };
        let id = self.sockets.next_relay;
        self.sockets.next_relay = self.sockets.next_relay.wrapping_add(1) % (1 << 30);
        for (side, fd) in relay.sockets.iter().enumerate() {
            let token = Token(FIRST_RELAY_TOKEN.0 + id * 2 + side);
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

    fn relay_event(&mut self, t: usize, event: &mio::event::Event) {
        let (id, side) = (t / 2, t % 2);
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
        for _ in 0..TAP_BATCH {
            match nix::unistd::read(&self.tap, &mut self.buf) {
                Ok(n) if n > 0 => {
                    if self.test_drop(0) {
                        continue;
                    }
                    let frame = self.buf.get(..n).unwrap_or_default();
                    self.engine.handle_frame(now, frame, &mut self.sockets);
                    if self.sockets.reinject {
                        self.sockets.reinject = false;
                        if let Some(f) = &self.sockets.fast {
                            f.reinject(frame);
                        }
                    }
                }
                Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => {
                    self.engine.end_batch(now, &mut self.sockets);
                    return;
                }
                Err(err) => {
                    warn!(%err, "reading the tap failed");
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

    fn run_host_ops(&mut self, now: Instant, scratch: &mut Vec<u8>) {
        while let Some(op) = self.engine.poll_host_op() {
            match op {
                HostOp::EchoOpen { flow, remote } => match open_ping(remote) {
                    Ok(fd) => {
                        if let Err(err) = self.sockets.register(flow, &fd, Interest::READABLE) {
                            debug!(%err, "register ping socket");
                            self.engine.handle_host_error(now, flow);
                            continue;
                        }
                        self.sockets.map.insert(
                            flow,
                            Sock::Echo {
                                fd,
                                v6: remote.is_ipv6(),
                            },
                        );
                    }
                    Err(err) => {
                        debug!(%remote, %err, "open ping socket");
                        self.engine.handle_host_error(now, flow);
                    }
                },
                HostOp::EchoSend { flow, seq, data } => {
                    let Some(Sock::Echo { fd, v6 }) = self.sockets.map.get(&flow) else {
                        continue;
                    };
                    wire::build::echo_request(scratch, *v6, seq, &data);
                    if let Err(err) = send(fd.as_raw_fd(), scratch, MsgFlags::MSG_DONTWAIT) {
                        debug!(flow = flow.0, %err, "echo send failed");
                    }
                }
                HostOp::Close { flow } => self.sockets.close(flow, false),
            }
        }
    }

    fn flush(&mut self) {
        while let Some(frame) = self.engine.poll_transmit() {
            if !self.test_drop(1)
                && let Err(err) = nix::unistd::write(&self.tap, &frame)
            {
                debug!(%err, len = frame.len(), "tap write failed");
            }
            self.engine.recycle(frame);
        }
    }
}

const TAP: Token = Token(0);
const WAKER: Token = Token(1);
/// The fast path's ring buffer (below [`FIRST_LISTENER_TOKEN`], above every flow token).
const FAST_EVENTS: Token = Token((1 << 40) - 1);
/// Token of flow id 0; flow `n` has token `n + 2`.
pub const FIRST_FLOW_TOKEN: Token = Token(2);
/// Frames read from the tap per wakeup before other sources get a turn.
pub const TAP_BATCH: usize = 128;
/// Send buffer requested for TCP host sockets (the kernel doubles it for overhead).
pub const TCP_SNDBUF: usize = 4 << 20;
/// Token of the first forwarded-port socket (flow tokens stay far below: ids count up from
/// 1 and would need 2^40 flows to get here).
pub const FIRST_LISTENER_TOKEN: Token = Token(1 << 40);
/// Token of the first spliced connection's namespace side (two tokens per relay).
pub const FIRST_RELAY_TOKEN: Token = Token(1 << 41);
/// Token of the first `-U` relay's host socket.
pub const FIRST_UDP_RELAY_TOKEN: Token = Token(1 << 42);
/// Spliced connections at once.
pub const MAX_RELAYS: usize = 4096;
/// Connections accepted (or datagrams received) per forwarded port per wakeup.
pub const ACCEPT_BATCH: usize = 64;
/// Backlog of forwarded TCP ports.
pub const LISTEN_BACKLOG: i32 = 128;
/// Datagrams read from one UDP socket per wakeup.
pub const UDP_BATCH: usize = 64;
/// The largest frame: 65535 bytes of IP plus the Ethernet header, rounded up.
pub const MAX_FRAME: usize = 65536 + 64;
