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
//! the control plane (signals, the child process, later the API) and talks to this thread
//! through a [`Handle`]: a channel plus a mio `Waker`.
//!
//! ## One iteration
//!
//! 1. `poll` until the tap or a socket is readable, a command arrives, or the engine's
//!    next timer is due.
//! 2. Read up to [`TAP_BATCH`] frames from the tap (edge-triggered: if the batch limit,
//!    not `EAGAIN`, ended the read, the next poll does not block); each goes to
//!    `Engine::handle_frame`.
//! 3. Drain readable ping sockets into `Engine::handle_echo_reply`.
//! 4. `Engine::handle_timeout`, then execute host operations and write queued frames.
//!
//! ## Host sockets
//!
//! Echo flows use unprivileged ping sockets (`SOCK_DGRAM`, `IPPROTO_ICMP[V6]`) connected to
//! the remote. Their token is the flow id plus [`FIRST_FLOW_TOKEN`]. [`ping_sockets_allowed`]
//! probes once at start-up whether `net.ipv4.ping_group_range` admits this process.
//!
//! ## Limits
//!
//! One frame buffer of [`MAX_FRAME`] bytes; a tap write that fails is counted by the engine
//! as sent and logged at debug (the guest's TCP/ICMP retransmits).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, connect,
    recv, send, socket,
};
use tracing::{debug, info, warn};

use crate::engine::{Engine, HostOp, Stats};
use crate::flow::FlowId;
use crate::wire;

/// A command from the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Log the counters at info level.
    LogStats,
    /// Stop the loop and return the final counters.
    Stop,
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
pub fn spawn(tap: OwnedFd, engine: Engine) -> Result<Handle> {
    let poll = Poll::new().context("create poller")?;
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), WAKER).context("create waker")?);
    poll.registry()
        .register(&mut SourceFd(&tap.as_raw_fd()), TAP, Interest::READABLE)
        .context("register the tap")?;
    let (tx, rx) = mpsc::channel();
    let plane = Dataplane {
        poll,
        tap,
        engine,
        rx,
        sockets: HashMap::new(),
        buf: vec![0; MAX_FRAME],
        tap_pending: false,
    };
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
    sockets: HashMap<FlowId, EchoSocket>,
    buf: Vec<u8>,
    tap_pending: bool,
}

struct EchoSocket {
    fd: OwnedFd,
    v6: bool,
}

impl Dataplane {
    fn run(mut self) -> Result<Stats> {
        let mut events = Events::with_capacity(256);
        let mut scratch = Vec::new();
        loop {
            let now = Instant::now();
            let timeout = if self.tap_pending {
                Some(Duration::ZERO)
            } else {
                self.engine
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(now))
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
                    WAKER => {
                        while let Ok(cmd) = self.rx.try_recv() {
                            match cmd {
                                Command::LogStats => {
                                    info!("stats: {}", self.engine.stats().summary());
                                }
                                Command::Stop => return Ok(self.engine.stats().clone()),
                            }
                        }
                    }
                    Token(t) => {
                        let flow = FlowId(u64::try_from(t - FIRST_FLOW_TOKEN.0).unwrap_or(0));
                        self.drain_echo(now, flow);
                    }
                }
            }
            if tap_ready {
                self.read_tap(now);
            }
            self.engine.handle_timeout(now);
            self.run_host_ops(now, &mut scratch);
            self.flush();
        }
    }

    fn read_tap(&mut self, now: Instant) {
        self.tap_pending = false;
        for _ in 0..TAP_BATCH {
            match nix::unistd::read(&self.tap, &mut self.buf) {
                Ok(n) if n > 0 => self
                    .engine
                    .handle_frame(now, self.buf.get(..n).unwrap_or_default()),
                Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => return,
                Err(err) => {
                    warn!(%err, "reading the tap failed");
                    return;
                }
            }
        }
        self.tap_pending = true;
    }

    fn drain_echo(&mut self, now: Instant, flow: FlowId) {
        let Some(sock) = self.sockets.get(&flow) else {
            return;
        };
        loop {
            match recv(sock.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    if let Some((seq, data)) =
                        wire::parse_echo_reply(self.buf.get(..n).unwrap_or_default(), sock.v6)
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
                        let token = Token(
                            usize::try_from(flow.0)
                                .unwrap_or(usize::MAX)
                                .saturating_add(FIRST_FLOW_TOKEN.0),
                        );
                        if let Err(err) = self.poll.registry().register(
                            &mut SourceFd(&fd.as_raw_fd()),
                            token,
                            Interest::READABLE,
                        ) {
                            debug!(%err, "register ping socket");
                            self.engine.handle_host_error(now, flow);
                            continue;
                        }
                        self.sockets.insert(
                            flow,
                            EchoSocket {
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
                    let Some(sock) = self.sockets.get(&flow) else {
                        continue;
                    };
                    wire::build::echo_request(scratch, sock.v6, seq, &data);
                    if let Err(err) = send(sock.fd.as_raw_fd(), scratch, MsgFlags::MSG_DONTWAIT) {
                        debug!(flow = flow.0, %err, "echo send failed");
                    }
                }
                HostOp::Close { flow } => {
                    if let Some(sock) = self.sockets.remove(&flow) {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&sock.fd.as_raw_fd()));
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        while let Some(frame) = self.engine.poll_transmit() {
            if let Err(err) = nix::unistd::write(&self.tap, &frame) {
                debug!(%err, len = frame.len(), "tap write failed");
            }
            self.engine.recycle(frame);
        }
    }
}

fn open_ping(remote: IpAddr) -> nix::Result<OwnedFd> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    match remote {
        IpAddr::V4(a) => {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Datagram,
                flags,
                SockProtocol::Icmp,
            )?;
            connect(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(a, 0)))?;
            Ok(fd)
        }
        IpAddr::V6(a) => {
            let fd = socket(
                AddressFamily::Inet6,
                SockType::Datagram,
                flags,
                SockProtocol::IcmpV6,
            )?;
            connect(
                fd.as_raw_fd(),
                &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, 0)),
            )?;
            Ok(fd)
        }
    }
}

const TAP: Token = Token(0);
const WAKER: Token = Token(1);
/// Token of flow id 0; flow `n` has token `n + 2`.
pub const FIRST_FLOW_TOKEN: Token = Token(2);
/// Frames read from the tap per wakeup before other sources get a turn.
pub const TAP_BATCH: usize = 128;
/// The largest frame: 65535 bytes of IP plus the Ethernet header, rounded up.
pub const MAX_FRAME: usize = 65536 + 64;
