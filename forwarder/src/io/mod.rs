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
//! 4. `Engine::handle_timeout`, then write the queued frames (the order is `engine`'s).
//!
//! ## Host sockets ([`Sockets`], the engine's `Host`, in `io::sockets`)
//!
//! All non-blocking, registered edge-triggered with the flow's token (`io::token`). TCP:
//! `connect()` in progress is completed by the writable edge (`SO_ERROR`); `TCP_NODELAY`
//! (the guest's own stack already coalesced); `SO_PEEK_OFF` so a peek at offset N costs
//! nothing for the N bytes before it (Linux ≥ 6.9; older kernels peek into a scratch prefix
//! instead); acknowledged bytes are dropped with `recv(MSG_TRUNC)` without a copy; free
//! send space is a lower bound from `SO_MEMINFO` and `SIOCOUTQ` (`io::sockets`); an abort
//! sets `SO_LINGER {1, 0}` so the close sends a RST. UDP: one socket per flow,
//! `connect()`ed. Echo: unprivileged ping sockets (`SOCK_DGRAM`, `IPPROTO_ICMP[V6]`);
//! [`ping_sockets_allowed`] probes once at start-up whether `net.ipv4.ping_group_range`
//! admits this process. `--outbound` / `--outbound-if` bind TCP and UDP sockets to an
//! address or device.
//!
//! ## The kernel's fast path (`--ebpf`)
//!
//! `Sockets` also holds the fast path's userspace half (`fastpath`): the engine offers a
//! new flow's first packet through `Host::fast_path`; when the kernel takes it, the loop
//! sends the frame it just handled again on the re-injection socket. The ring buffer of
//! FIN/RST events is one more registered fd; each iteration drains it and, once a second,
//! the fast path scans its entries and reports closing and ended flows to the engine. A
//! kernel UDP flow's reservation socket is registered too (a reservation token of
//! `io::token`): what the host's stack queues there — fragmented
//! replies, untranslated ICMP errors — goes to the engine like a UDP flow's.
//!
//! ## Forwarded ports
//!
//! The control plane binds them and hands them over as one forward with an id
//! ([`Command::AddForward`]); each socket gets a key (never reused; `io::token`
//! makes its token) and remembers its forward, so
//! [`Command::RemoveForward`] closes exactly that forward's sockets while accepted
//! connections, relays and flows go on. `-t` connections and `-u` datagrams go to the engine;
//! `-T` connections are spliced (`splice`), `-U` datagrams relayed in batches
//! (`udp_splice`), both to the host's loopback without the engine.
//!
//! ## Files
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | this theory, [`Command`], [`Handle`], [`spawn`], [`Options`] |
//! | `dataplane.rs` | the loop: readiness → engine calls → writes, in the order `engine` prescribes |
//! | `token.rs` | the one list of poll tokens and the event source each stands for |
//! | `sockets.rs` | [`Sockets`], the engine's `Host`: flow sockets, forwarded-port registration, the fast path's handle |
//! | `listen.rs` | [`Listener`] and binding forwarded ports (all or nothing; best effort for `all`) |
//! | `splice.rs`, `udp_splice.rs` | the `-T` / `-U` relays to the host's loopback |
//! | `fastpath.rs` | the eBPF fast path's userspace half |
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
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
    bind, setsockopt, socket, sockopt,
};
use tracing::debug;

mod capture;
mod dataplane;
pub mod fastpath;
mod link;
mod listen;
mod sockets;
mod splice;
mod token;
mod udp_splice;

pub use link::Link;
pub use listen::{
    ACCEPT_BATCH, FD_RESERVE, LISTEN_BACKLOG, Listener, bind_best_effort, bind_forwards, bind_udp,
    can_bind_to_device, listen_tcp, set_freebind,
};
pub use sockets::Sockets;

use crate::engine::{Engine, Stats};
use crate::policy::Prefix;

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
    /// Splice `-t` clients from the host's loopback into the namespace.
    LoopbackSplice(LoopbackSplice),
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

/// A non-blocking socket toward `target`, bound as `outbound` says.
fn new_socket(outbound: &Outbound, target: SocketAddr, ty: SockType) -> std::io::Result<OwnedFd> {
    let fd = socket(
        family(target),
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(dev) = &outbound.iface {
        setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev))?;
    }
    match target {
        SocketAddr::V4(_) => {
            if let Some(a) = outbound.v4 {
                bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(a, 0)))?;
            }
        }
        SocketAddr::V6(_) => {
            if let Some(a) = outbound.v6 {
                bind(
                    fd.as_raw_fd(),
                    &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, 0)),
                )?;
            }
        }
    }
    Ok(fd)
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
    /// `-t` TCP clients from the host's loopback are spliced to the namespace through a
    /// socket made there (pasta's default; off with `--no-splice`), given the sockets'
    /// source ([`Command::LoopbackSplice`]).
    pub splice_loopback: bool,
    /// `--host-lo-to-ns-lo`: those clients go to the namespace's loopback, not its address.
    pub host_lo_to_ns_lo: bool,
    /// `--splice-only`: no tap; `-t` TCP clients from the host's loopback are spliced to
    /// the namespace's loopback, others are refused.
    pub splice_only: bool,
    /// `-p/--pcap`: capture the tap's frames to this file.
    pub pcap: Option<std::path::PathBuf>,
    /// `--freebind`: forwarded ports may listen on addresses the host does not have
    /// (applied by [`set_freebind`] before anything is bound).
    pub freebind: bool,
}

/// How `-t` TCP clients from the host's loopback reach the namespace: spliced, through a
/// socket made there, to the guest's address of the client's family (pasta's way: the
/// namespace sees the connection come from its own address) or to the same loopback
/// address (`--host-lo-to-ns-lo`).
#[derive(Debug)]
pub struct LoopbackSplice {
    /// Where the namespace's sockets come from.
    pub source: Box<dyn NamespaceSockets>,
    /// Connect to the namespace's loopback, not to `guest`.
    pub to_loopback: bool,
    /// The guest's addresses.
    pub guest: Vec<std::net::IpAddr>,
}

/// Makes sockets inside the served namespace (the namespace agent, `ns::Agent`): a socket
/// keeps the namespace it was made in, so the data plane can connect it from here.
pub trait NamespaceSockets: Send + std::fmt::Debug {
    /// A new non-blocking TCP socket of the family (`v6`), not yet connected.
    ///
    /// # Errors
    ///
    /// When the namespace's side cannot make one.
    fn tcp_socket(&self, v6: bool) -> Result<OwnedFd>;
}

/// The control plane's handle on the data-plane thread.
#[derive(Debug)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    waker: std::sync::Arc<Waker>,
    thread: Option<std::thread::JoinHandle<Result<Stats>>>,
    link_closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Handle {
    /// Whether the loop ended because `-F`'s socket closed (a normal end).
    #[must_use]
    pub fn link_closed(&self) -> bool {
        self.link_closed.load(std::sync::atomic::Ordering::Relaxed)
    }

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
    tap: Option<Link>,
    engine: Engine,
    options: Options,
    forwards: Vec<(u32, Vec<Listener>)>,
    fast: Option<fastpath::FastPath>,
) -> Result<Handle> {
    let capture = options
        .pcap
        .as_deref()
        .map(capture::Capture::create)
        .transpose()?;
    let poll = Poll::new().context("create poller")?;
    let waker =
        std::sync::Arc::new(Waker::new(poll.registry(), token::WAKER).context("create waker")?);
    let tap = tap.map(link::Port::new);
    if let Some(tap) = &tap {
        // A stream's queued writes go on when it is writable again.
        let interest = if tap.is_stream() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        poll.registry()
            .register(&mut SourceFd(&tap.raw_fd()), token::TAP, interest)
            .context("register the tap")?;
    }
    let link_closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut fast = fast;
    if let Some(f) = &mut fast {
        poll.registry()
            .register(
                &mut SourceFd(&f.events_fd()),
                token::FAST_EVENTS,
                Interest::READABLE,
            )
            .context("register the fast path's ring buffer")?;
        f.set_registry(poll.registry().try_clone().context("clone the registry")?);
    }
    let registry = poll.registry().try_clone().context("clone the registry")?;
    let (tx, rx) = mpsc::channel();
    let plane = dataplane::Dataplane {
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
            fast,
            reinject: false,
            echo_buf: Vec::new(),
        },
        buf: vec![0; MAX_FRAME],
        tap_pending: false,
        drop_every: options.drop_every,
        frames_seen: [0; 2],
        frames_dropped: [0; 2],
        udp_relays: udp_splice::Relays::default(),
        udp_idle: options.udp_idle,
        lo_splice: None,
        capture,
        splice_only: options.splice_only,
        link_closed: link_closed.clone(),
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
        link_closed,
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

/// Frames read from the tap per wakeup before other sources get a turn.
pub const TAP_BATCH: usize = 128;
/// Send buffer requested for TCP host sockets (the kernel doubles it for overhead).
pub const TCP_SNDBUF: usize = 4 << 20;
/// Spliced connections at once.
pub const MAX_RELAYS: usize = 4096;
/// Datagrams read from one UDP socket per wakeup.
pub const UDP_BATCH: usize = 64;
/// The largest frame: 65535 bytes of IP plus the Ethernet header, rounded up.
pub const MAX_FRAME: usize = 65536 + 64;
