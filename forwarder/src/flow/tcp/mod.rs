//! # Theory of operation
//!
//! TCP translation, pasta-style: the guest's TCP talks to this per-flow state machine, which
//! mirrors one host socket. There is no second TCP stack and no second copy of the byte
//! stream: the host socket's buffers are the only buffers.
//!
//! ## Scope and sequence spaces
//!
//! A [`Conn`] holds two sequence spaces seen from the guest. **Guest → host**: `rcv_nxt` is
//! the next byte expected from the guest; a byte is acknowledged to the guest once the host
//! socket has accepted it (`send()` returned), never earlier — except for the bounded
//! *stash* below. **Host → guest**: `snd_una` is the oldest byte the guest has not
//! acknowledged and `snd_nxt` the next byte to send; the bytes between them are still in the
//! host socket's receive queue, read with `MSG_PEEK` at offset `snd_nxt - snd_una`, and
//! removed from the socket (`discard`) only when the guest acknowledges them. So a
//! retransmission is a peek at offset 0: nothing is buffered here.
//!
//! ## States
//!
//! [`TcpState`] names the lifecycle; half-close is two flags, because the two directions
//! close independently:
//!
//! | state | RFC 9293 equivalent (guest's peer) | leaves on |
//! |---|---|---|
//! | `Connecting` | SYN-RECEIVED, SYN-ACK withheld | host `connect()` done → SYN-ACK, `SynAckSent`; refused → RST, removed |
//! | `SynAckSent` | SYN-RECEIVED | guest ACKs the SYN-ACK → `Established` |
//! | `SynSent` | SYN-SENT (inbound: a client connected to a forwarded host port) | guest's SYN-ACK → ACK, `Established`; guest's RST → the client's socket is reset |
//! | `Established` | ESTABLISHED / CLOSE-WAIT / FIN-WAIT / LAST-ACK | both FINs exchanged and ours acknowledged → removed |
//!
//! `guest_fin`: the guest's FIN arrived in order (it is acknowledged and the host socket gets
//! `shutdown(SHUT_WR)` once the stash is empty). `fin_sent`: the host socket reached EOF and
//! a FIN followed its last byte to the guest; `fin_acked` when the guest acknowledges it.
//! A RST from the guest (in window) aborts the host socket (linger 0 → the remote gets a
//! RST); a host error or reset becomes a RST to the guest. Either way the flow is removed at
//! once: nothing waits in TIME_WAIT here (the kernels on both sides keep their own).
//!
//! ## Guest → host
//!
//! A segment at `rcv_nxt` (after trimming bytes already received) is written to the socket.
//! If the socket takes only part, the rest goes to the stash (written first when the socket
//! is writable again): up to [`MAX_STASH`] bytes always, and beyond that every byte that
//! lies inside the window we advertised (see "Flow control"); what fits neither — bytes the
//! guest sent beyond our window — is dropped and an ACK sent at once. A segment beyond
//! `rcv_nxt` (a hole: loss on the tap) is kept in a bounded out-of-order queue ([`MAX_OOO`]
//! per flow, [`MAX_OOO_TOTAL`] in all) and answered with an immediate duplicate ACK, so the
//! guest fast-retransmits after three; when the retransmission fills the hole, what waited
//! behind it is written at once and one cumulative ACK covers all of it. Beyond the bounds,
//! segments are dropped and the guest retransmits them. This is the one place bytes are
//! held here: only while a hole exists, and only what the guest already sent. ACKs for
//! in-order data are coalesced: one per flow per batch of tap frames ([`Conn::flush_ack`]).
//!
//! ## Flow control: no byte the window promised is dropped
//!
//! The rule: a byte inside the window we advertised is never thrown away. The guest's stack
//! counts such a drop as congestion and, for a drop that leaves fewer than three duplicate
//! ACKs behind it, waits for a retransmission timeout — the collapse `research/
//! passt-pasta.md` §4.3 measured for pasta behind any link slower than the tap. So:
//!
//! 1. The window is what the socket takes now ([`HostSocket::send_space`]) less the stash,
//!    scaled by our window scale. The shell must answer a *lower bound*: Linux refuses a
//!    write once the socket's buffer memory, which counts each buffer's overhead, reaches
//!    its limit, so `SO_SNDBUF − SIOCOUTQ` (payload) overstates the room by that overhead —
//!    measured here behind a 1 Gbit/s uplink, 560 segments dropped in 6 s and 0.42× the
//!    host's own upload. `io::sockets` converts the free memory (`SO_MEMINFO`) at the
//!    queue's own payload ratio, less a margin.
//! 2. Should a socket still take less than it said (its memory shrinks under pressure, an
//!    estimate is off), the refused bytes inside the window go to the stash beyond
//!    [`MAX_STASH`], drawing on the budget shared with the out-of-order queue
//!    ([`MAX_OOO_TOTAL`]); only with that budget spent is an in-window byte dropped, and
//!    then it is counted (`tcp_in_window_dropped`, which the tests hold at 0).
//! 3. The window reopens as the socket drains. A socket that never filled signals no
//!    writable edge (Linux wakes only a writer it refused: `SOCK_NOSPACE`), so while the
//!    window the guest knows is below [`WINDOW_LOW`] its space is re-checked on a timer
//!    from [`WINDOW_RECHECK_MIN`] (1 ms, reset by every update sent) backing off to
//!    [`WINDOW_RECHECK_MAX`] while nothing changes; an update goes out as soon as the
//!    space grew by an MSS or doubled ([`Conn::on_timer`]). A zero window is therefore
//!    reopened within a millisecond of the socket draining, not by the guest's persist
//!    probes (whose backoff starts at 200 ms). Behind a 100 Mbit/s uplink this costs a few
//!    hundred window updates per second per flow and carries 1.00× the host's own upload.
//!
//! Counted: `tcp_in_window_dropped`, `tcp_window_updates`, `tcp_zero_windows` (episodes:
//! a zero window advertised after a non-zero one).
//!
//! ## Host → guest
//!
//! When the socket is readable or the guest's window opens, up to `min(guest window,
//! MAX_PUSH_BYTES)` bytes are peeked straight into frame buffers (a connection that could
//! send more then yields, and the engine resumes it in a round-robin after the other flows
//! had their turn, so one bulk flow cannot starve the rest) (one `recvmsg` with one
//! iovec per segment) and sent as segments of at most the MSS, the last with PSH. A peek
//! that returns 0 bytes is EOF: a FIN follows the last byte. Retransmission: on the RTO
//! (go back to `snd_una` and resend everything, exponential backoff from [`RTO_MIN`], reset
//! after [`MAX_RETRIES`]), and on the third duplicate ACK (resend the first unacknowledged
//! segment; partial ACKs during recovery resend the next one, NewReno-style, RFC 6582).
//! A zero window from the guest arms a persist timer whose probe is an ACK at `snd_una - 1`,
//! which the guest must answer with its current window (RFC 9293 §3.8.6.1).
//!
//! ## Options
//!
//! From the guest's SYN: MSS (segments toward the guest are at most `min(its MSS, tap MTU -
//! headers)`), window scale (ours is [`OUR_WINDOW_SHIFT`], advertised only if the guest
//! offered one), SACK-permitted (echoed: our duplicate ACKs then carry SACK blocks for the
//! out-of-order queue, so the guest resends only the holes; the guest's own SACK blocks
//! about our data are not used — we resend from `snd_una`). Timestamps are not echoed.
//!
//! ## Timers (one deadline per flow, see `flow`)
//!
//! * connect: [`CONNECT_TIMEOUT`] for the host `connect()`, then RST to the guest;
//! * retransmission / persist: `rto`, from [`RTO_INITIAL`] (SYN-ACK) or [`RTO_MIN`],
//!   doubled per expiry up to [`RTO_MAX`];
//! * idle: [`IDLE_TIMEOUT`] without traffic while established, [`HALF_CLOSED_TIMEOUT`] once
//!   either side has sent its FIN; then both sides are reset.
//!
//! ## Limits
//!
//! Per flow: the stash ([`MAX_STASH`], beyond it at most the advertised window on the
//! shared budget), the out-of-order queue ([`MAX_OOO`], [`MAX_OOO_SEGMENTS`]); the
//! out-of-order queues and the stashes beyond [`MAX_STASH`] of all flows together
//! [`MAX_OOO_TOTAL`]; [`MAX_PUSH_SEGMENTS`] segments per push, and
//! [`MAX_RETRIES`]. The table bounds the number of flows.
//!
//! ## Files
//!
//! `mod.rs` holds the types, the constructors and the event entry points (`on_*`), which
//! decide; `receive.rs` the guest → host direction (data into the socket, the stash, the
//! out-of-order queue, the advertised window); `transmit.rs` host → guest (ACKs from the
//! guest, pushing peeked bytes, retransmission, FIN); `emit.rs` builds the segments.
//!
//! ## Host interface
//!
//!
//! The state machine reaches its socket only through [`HostSocket`]; the I/O shell implements
//! it with a real non-blocking socket, the tests with an in-memory fake, which is what makes
//! every state testable with a manual clock (STYLE A1).

mod emit;
mod receive;
mod transmit;

use std::io::{self, IoSliceMut};
use std::time::{Duration, Instant};

use tracing::trace;

pub use emit::{rst_for, send_rst};

use crate::flow::Key;
use crate::frames::Queue;
use crate::wire::{EthernetAddress, TcpControl, TcpRepr, TcpSeqNumber};

/// What the translation needs from the flow's host socket.
pub trait HostSocket {
    /// Writes bytes; returns how many the socket accepted (0 when it is full).
    ///
    /// # Errors
    ///
    /// The socket failed (reset, broken pipe).
    fn send(&mut self, data: &[u8]) -> io::Result<usize>;
    /// Peeks at received bytes starting `offset` bytes after the oldest unread byte, into
    /// `bufs` in order. `Ok(0)` means end of stream (the peer sent FIN and every byte
    /// before `offset` was already peeked).
    ///
    /// # Errors
    ///
    /// `WouldBlock` when nothing is available, or the socket's failure.
    fn peek(&mut self, offset: usize, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    /// Removes `n` acknowledged bytes from the receive queue.
    fn discard(&mut self, n: usize);
    /// `shutdown(SHUT_WR)`: the guest has finished sending.
    fn shutdown_write(&mut self);
    /// Bytes the socket can accept now.
    fn send_space(&mut self) -> usize;
}

/// Lifecycle of a translated TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// The guest's SYN arrived; the host `connect()` is in progress.
    Connecting,
    /// The host side is connected and the SYN-ACK is out.
    SynAckSent,
    /// Inbound: our SYN to the guest is out (a client connected to a forwarded port).
    SynSent,
    /// The guest acknowledged the SYN-ACK (or, inbound, sent its SYN-ACK).
    Established,
}

/// What the caller does with the flow after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Both sides are done: remove it and close the socket.
    Close,
    /// Reset: remove it and abort the socket (the remote gets a RST).
    Abort,
}

/// Everything an event handler needs besides the connection.
#[expect(
    missing_debug_implementations,
    reason = "holds the socket trait object"
)]
pub struct Cx<'a, S: HostSocket + ?Sized> {
    /// The current time.
    pub now: Instant,
    /// The flow's tap-side key (the guest's and the remote's address and port).
    pub key: &'a Key,
    /// Our MAC and the guest's.
    pub macs: (EthernetAddress, EthernetAddress),
    /// The tap MTU.
    pub mtu: u16,
    /// Frames toward the guest.
    pub out: &'a mut Queue,
    /// The host socket.
    pub sock: &'a mut S,
    /// Bytes all flows may still hold out of order ([`MAX_OOO_TOTAL`] at start).
    pub ooo_budget: &'a mut usize,
    /// The flow-control counters of all flows.
    pub counters: &'a mut Counters,
}

/// What flow control did, over all flows (`forwarder ctl stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Guest segments of which bytes inside the window we advertised were dropped (the
    /// socket and the stash were full, or the out-of-order queue at its bound). The rule is
    /// that this stays 0.
    pub in_window_dropped: u64,
    /// Window updates sent because the socket drained.
    pub window_updates: u64,
    /// Times the window advertised to the guest closed to zero.
    pub zero_windows: u64,
}

/// Per-connection translation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    /// Lifecycle state.
    pub state: TcpState,
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    rcv_nxt: u32,
    guest_wnd: u32,
    guest_shift: u8,
    our_shift: u8,
    mss: u16,
    adv_edge: u32,
    dup_acks: u8,
    recover: Option<u32>,
    rto: Duration,
    rto_at: Option<Instant>,
    retries: u8,
    connect_by: Option<Instant>,
    wnd_check_at: Option<Instant>,
    wnd_backoff: Duration,
    /// The last window advertised was zero (one zero-window episode until it opens).
    wnd_closed: bool,
    guest_fin: bool,
    host_shut: bool,
    fin_sent: bool,
    fin_acked: bool,
    ack_pending: bool,
    stash: Vec<u8>,
    ooo: Vec<(u32, Vec<u8>, bool)>,
    sack: bool,
    wants_push: bool,
    push_queued: bool,
}

/// What became of a segment's bytes.
enum Delivered {
    /// All new bytes (and the FIN) were taken.
    All,
    /// Nothing new in it.
    Old,
    /// The socket and the stash took only part.
    Refused,
}

impl Conn {
    /// A connection for the guest's SYN `syn`, with our initial sequence number `iss`.
    #[must_use]
    pub fn new(now: Instant, syn: &TcpRepr<'_>, iss: u32, mtu: u16, v6: bool) -> Self {
        let ip_tcp = if v6 { 60 } else { 40 };
        let tap_mss = mtu.saturating_sub(ip_tcp).max(MIN_MSS);
        let mss = syn
            .max_seg_size
            .map_or(DEFAULT_MSS, |m| m.max(MIN_MSS))
            .min(tap_mss);
        let (guest_shift, our_shift) = match syn.window_scale {
            Some(s) => (s.min(MAX_WINDOW_SHIFT), OUR_WINDOW_SHIFT),
            None => (0, 0),
        };
        let rcv_nxt = seq(syn.seq_number).wrapping_add(1);
        Self {
            rcv_nxt,
            // The window in a SYN is never scaled (RFC 7323 §2.2).
            guest_wnd: u32::from(syn.window_len),
            guest_shift,
            our_shift,
            adv_edge: rcv_nxt,
            connect_by: Some(now + CONNECT_TIMEOUT),
            sack: syn.sack_permitted,
            ..Self::blank(TcpState::Connecting, iss, mss)
        }
    }

    /// The fields every connection starts with; the constructors set the rest.
    fn blank(state: TcpState, iss: u32, mss: u16) -> Self {
        Self {
            state,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            rcv_nxt: 0,
            guest_wnd: 0,
            guest_shift: 0,
            our_shift: OUR_WINDOW_SHIFT,
            mss,
            adv_edge: 0,
            dup_acks: 0,
            recover: None,
            rto: RTO_INITIAL,
            rto_at: None,
            retries: 0,
            connect_by: None,
            wnd_check_at: None,
            wnd_backoff: WINDOW_RECHECK_MIN,
            wnd_closed: false,
            guest_fin: false,
            host_shut: false,
            fin_sent: false,
            fin_acked: false,
            ack_pending: false,
            stash: Vec::new(),
            ooo: Vec::new(),
            sack: true,
            wants_push: false,
            push_queued: false,
        }
    }

    /// A connection toward the guest for a client accepted on a forwarded host port, with
    /// our initial sequence number `iss`. [`Conn::send_syn`] opens it.
    #[must_use]
    pub fn inbound(iss: u32, mtu: u16, v6: bool) -> Self {
        let ip_tcp = if v6 { 60 } else { 40 };
        let mss = mtu.saturating_sub(ip_tcp).max(MIN_MSS);
        Self {
            snd_nxt: iss.wrapping_add(1),
            ..Self::blank(TcpState::SynSent, iss, mss)
        }
    }

    /// Sends (or resends) the SYN of an inbound connection.
    pub fn send_syn<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        self.emit_syn(cx, None);
        if self.rto_at.is_none() {
            self.rto_at = Some(cx.now + self.rto);
        }
    }

    /// The guest's SYN-ACK to our inbound SYN: take its options, acknowledge, established.
    fn on_syn_ack<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>, seg: &TcpRepr<'_>) {
        self.rcv_nxt = seq(seg.seq_number).wrapping_add(1);
        self.adv_edge = self.rcv_nxt;
        match seg.window_scale {
            Some(shift) => self.guest_shift = shift.min(MAX_WINDOW_SHIFT),
            None => self.our_shift = 0,
        }
        if let Some(m) = seg.max_seg_size {
            self.mss = self.mss.min(m.max(MIN_MSS));
        }
        self.sack = seg.sack_permitted;
        self.guest_wnd = u32::from(seg.window_len);
        self.snd_una = self.iss.wrapping_add(1);
        self.state = TcpState::Established;
        self.rto = RTO_MIN;
        self.rto_at = None;
        self.retries = 0;
        self.send_ack(cx, self.snd_nxt);
        self.push(cx);
    }

    /// The segment size toward the guest.
    #[must_use]
    pub fn mss(&self) -> u16 {
        self.mss
    }

    /// Whether either side has sent its FIN.
    #[must_use]
    pub fn is_closing(&self) -> bool {
        self.guest_fin || self.fin_sent
    }

    /// Whether an ACK waits for [`Conn::flush_ack`].
    #[must_use]
    pub fn has_ack_pending(&self) -> bool {
        self.ack_pending
    }

    /// The connection's next deadline, given when it last carried traffic.
    #[must_use]
    pub fn deadline(&self, last_seen: Instant) -> Option<Instant> {
        let idle = last_seen
            + if self.is_closing() {
                HALF_CLOSED_TIMEOUT
            } else {
                IDLE_TIMEOUT
            };
        [self.connect_by, self.rto_at, self.wnd_check_at, Some(idle)]
            .into_iter()
            .flatten()
            .min()
    }

    /// The host `connect()` completed: the SYN-ACK goes to the guest.
    pub fn on_connected<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        if self.state != TcpState::Connecting {
            return;
        }
        self.connect_by = None;
        self.state = TcpState::SynAckSent;
        self.snd_nxt = self.iss.wrapping_add(1);
        self.send_syn_ack(cx);
        self.rto = RTO_INITIAL;
        self.rto_at = Some(cx.now + self.rto);
    }

    /// Handles a segment from the guest (not the first SYN).
    pub fn on_segment<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        seg: &TcpRepr<'_>,
    ) -> Verdict {
        let seg_seq = seq(seg.seq_number);
        match seg.control {
            TcpControl::Rst if self.state == TcpState::SynSent => {
                // RFC 9293 §3.10.7.3: in SYN-SENT a RST is acceptable if it acknowledges
                // our SYN: the guest's port is closed.
                let ours = seg.ack_number.map(seq) == Some(self.iss.wrapping_add(1));
                return if ours { Verdict::Abort } else { Verdict::Keep };
            }
            TcpControl::Syn if self.state == TcpState::SynSent => {
                if seg.ack_number.map(seq) == Some(self.iss.wrapping_add(1)) {
                    self.on_syn_ack(cx, seg);
                }
                return Verdict::Keep;
            }
            TcpControl::Rst => {
                // RFC 5961 §3.2 in its simplest form: only an exactly or nearly in-window
                // RST is believed; others are ignored.
                let offset = seg_seq.wrapping_sub(self.rcv_nxt);
                let window = self.adv_edge.wrapping_sub(self.rcv_nxt).max(1);
                return if offset < window || self.state == TcpState::Connecting {
                    Verdict::Abort
                } else {
                    Verdict::Keep
                };
            }
            TcpControl::Syn => {
                // A retransmitted SYN: answer again if we already have.
                if self.state == TcpState::SynAckSent {
                    self.send_syn_ack(cx);
                } else if self.state == TcpState::Established {
                    self.send_ack(cx, self.snd_nxt);
                }
                return Verdict::Keep;
            }
            _ => {}
        }
        if matches!(self.state, TcpState::Connecting | TcpState::SynSent) {
            return Verdict::Keep;
        }
        let Some(ack) = seg.ack_number.map(seq) else {
            return Verdict::Keep;
        };
        if self.state == TcpState::SynAckSent {
            if ack == self.iss.wrapping_add(1) {
                self.state = TcpState::Established;
                self.snd_una = ack;
                self.rto = RTO_MIN;
                self.rto_at = None;
                self.retries = 0;
            } else {
                return Verdict::Keep;
            }
        }
        self.handle_ack(cx, ack, seg);
        let verdict = self.handle_data(cx, seg_seq, seg);
        if verdict != Verdict::Keep {
            return verdict;
        }
        self.push(cx);
        self.verdict()
    }

    /// The host socket is readable and/or writable.
    pub fn on_host_ready<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        readable: bool,
        writable: bool,
    ) -> Verdict {
        if matches!(self.state, TcpState::Connecting | TcpState::SynSent) {
            return Verdict::Keep;
        }
        if writable {
            if let Err(err) = self.drain_stash(cx) {
                trace!(%err, "host write failed");
                return self.reset(cx);
            }
            self.window_update(cx);
        }
        if readable || writable {
            self.push(cx);
        }
        self.verdict()
    }

    /// The host socket failed or was reset: the guest gets a RST.
    pub fn on_host_error<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> Verdict {
        self.reset(cx)
    }

    /// The flow's deadline came.
    pub fn on_timer<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        last_seen: Instant,
    ) -> Verdict {
        if self.connect_by.is_some_and(|t| t <= cx.now) {
            trace!("connect timed out");
            return self.reset(cx);
        }
        let idle_limit = if self.is_closing() {
            HALF_CLOSED_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        if cx.now.saturating_duration_since(last_seen) >= idle_limit {
            trace!("idle timeout");
            return self.reset(cx);
        }
        if self.wnd_check_at.is_some_and(|t| t <= cx.now) {
            self.wnd_check_at = None;
            if !self.window_update(cx) {
                self.wnd_backoff = (self.wnd_backoff * 2).min(WINDOW_RECHECK_MAX);
                self.arm_window_check(cx.now);
            }
        }
        if self.rto_at.is_some_and(|t| t <= cx.now) {
            self.rto_at = None;
            return self.on_rto(cx);
        }
        Verdict::Keep
    }

    /// Sends the ACK coalesced over a batch of guest segments, if one is due.
    pub fn flush_ack<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        if self.ack_pending {
            self.send_ack(cx, self.snd_nxt);
        }
    }

    fn verdict(&self) -> Verdict {
        if self.guest_fin && self.host_shut && self.fin_acked {
            Verdict::Close
        } else {
            Verdict::Keep
        }
    }
}

pub(super) fn seq(n: TcpSeqNumber) -> u32 {
    n.0.cast_unsigned()
}

/// `a < b` in sequence space (RFC 1982 serial arithmetic).
pub(super) fn lt(a: u32, b: u32) -> bool {
    a.wrapping_sub(b).cast_signed() < 0
}

pub(super) fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// Our window scale shift (RFC 7323): windows up to 64 KiB << 8 = 16 MiB.
pub const OUR_WINDOW_SHIFT: u8 = 8;
/// The largest shift RFC 7323 §2.3 allows.
pub const MAX_WINDOW_SHIFT: u8 = 14;
/// MSS assumed when the guest's SYN carries none (RFC 9293 §3.7.1: 536).
pub const DEFAULT_MSS: u16 = 536;
/// The smallest MSS accepted, so a hostile guest cannot make us emit 1-byte segments.
pub const MIN_MSS: u16 = 536;
/// Bytes accepted from the guest beyond what the host socket took (per flow).
pub const MAX_STASH: usize = 64 * 1024;
/// Out-of-order bytes from the guest kept per flow (loss on the tap leaves a hole; what
/// follows it is kept so that one retransmission repairs it, instead of go-back-N).
pub const MAX_OOO: usize = 1024 * 1024;
/// Out-of-order segments kept per flow.
pub const MAX_OOO_SEGMENTS: usize = 256;
/// How far beyond `rcv_nxt` a kept segment may end.
pub const MAX_OOO_AHEAD: usize = 16 * 1024 * 1024;
/// Bytes held across all flows beyond their sockets: out of order, and stashed past
/// [`MAX_STASH`] inside a window a socket did not honour.
pub const MAX_OOO_TOTAL: usize = 64 * 1024 * 1024;
/// Segments built from one peek.
pub const MAX_PUSH_SEGMENTS: usize = 64;
/// Bytes peeked per push, so one flow cannot monopolise a wakeup.
pub const MAX_PUSH_BYTES: usize = 1024 * 1024;
/// Below this window the guest knows, the socket's space is re-checked on a timer.
pub const WINDOW_LOW: u32 = 1024 * 1024;
/// First window re-check delay.
pub const WINDOW_RECHECK_MIN: Duration = Duration::from_millis(1);
/// Longest window re-check delay (a remote that stopped reading).
pub const WINDOW_RECHECK_MAX: Duration = Duration::from_millis(200);
/// Duplicate ACKs that trigger a fast retransmission (RFC 5681 §3.2).
pub const DUP_ACK_THRESHOLD: u8 = 3;
/// Retransmission timeout of the SYN-ACK (RFC 6298 §2.1: 1 s).
pub const RTO_INITIAL: Duration = Duration::from_secs(1);
/// Smallest data retransmission timeout (Linux's `TCP_RTO_MIN`; the tap's RTT is µs, the
/// guest's delayed ACK up to 40 ms).
pub const RTO_MIN: Duration = Duration::from_millis(200);
/// Largest retransmission timeout.
pub const RTO_MAX: Duration = Duration::from_secs(30);
/// Retransmissions without progress before both sides are reset (≈ 2 minutes of backoff).
pub const MAX_RETRIES: u8 = 10;
/// How long the host `connect()` may take (Linux's own SYN retries last ≈ 127 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(75);
/// Idle time after which an established flow is reset (pasta's `ACT_TIMEOUT`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(7200);
/// Idle time after which a half-closed flow is reset (Linux's `tcp_fin_timeout`).
pub const HALF_CLOSED_TIMEOUT: Duration = Duration::from_secs(60);
