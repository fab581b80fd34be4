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
//! If the socket takes only part, the rest goes to the stash (at most [`MAX_STASH`] bytes,
//! written first when the socket is writable again); what fits neither is dropped and an
//! ACK sent at once. This is the lesson of `research/passt-pasta.md` §4.3: in-window data
//! is never silently thrown away while the guest believes it was accepted, and a refusal is
//! signalled by an immediate duplicate ACK. A segment beyond `rcv_nxt` (a hole: loss on the
//! tap) is kept in a bounded out-of-order queue ([`MAX_OOO`] per flow, [`MAX_OOO_TOTAL`]
//! in all) and answered with an immediate duplicate ACK, so the guest fast-retransmits after
//! three; when the retransmission fills the hole, what waited behind it is written at once
//! and one cumulative ACK covers all of it. Beyond the bounds, segments are dropped and the
//! guest retransmits them. This is the one place bytes are held here: only while a hole
//! exists, and only what the guest already sent. The advertised window is the socket's free send space (`SO_SNDBUF` minus
//! `SIOCOUTQ`) minus the stash, scaled by our window scale; when the socket drains
//! (writable) and the window the guest knows is small, a window update is sent. ACKs for
//! in-order data are coalesced: one per flow per batch of tap frames ([`Conn::flush_ack`]).
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
//! Per flow: the stash ([`MAX_STASH`]), the out-of-order queue ([`MAX_OOO`],
//! [`MAX_OOO_SEGMENTS`]; all flows together [`MAX_OOO_TOTAL`]), [`MAX_PUSH_SEGMENTS`] segments per push, and
//! [`MAX_RETRIES`]. The table bounds the number of flows.
//!
//! ## Host interface
//!
//! The state machine reaches its socket only through [`HostSocket`]; the I/O shell implements
//! it with a real non-blocking socket, the tests with an in-memory fake, which is what makes
//! every state testable with a manual clock (STYLE A1).

use std::io::{self, IoSliceMut};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::trace;

use crate::flow::Key;
use crate::frames::Queue;
use crate::wire::build::{self, Payload, TCP_FIN, TCP_PSH, TcpHeader};
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

    /// Sends a window update if the socket can take clearly more than the guest knows.
    /// Returns whether one was sent.
    fn window_update<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> bool {
        if self.guest_fin || self.state != TcpState::Established {
            return false;
        }
        let space = self.window(cx);
        let known = self.adv_edge.wrapping_sub(self.rcv_nxt);
        if space > known && (space - known >= u32::from(self.mss) || known <= space / 2) {
            self.wnd_backoff = WINDOW_RECHECK_MIN;
            self.send_ack(cx, self.snd_nxt);
            true
        } else {
            false
        }
    }

    /// A socket that is not full does not signal when it drains, so while the window the
    /// guest knows is small, re-check the socket's space on a short, backed-off timer
    /// (pasta's `ACK_INTERVAL` plays the same role).
    fn arm_window_check(&mut self, now: Instant) {
        let known = self.adv_edge.wrapping_sub(self.rcv_nxt);
        if !self.guest_fin && known < WINDOW_LOW && self.wnd_check_at.is_none() {
            self.wnd_check_at = Some(now + self.wnd_backoff);
        }
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

    fn handle_ack<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        ack: u32,
        seg: &TcpRepr<'_>,
    ) {
        let old_wnd = self.guest_wnd;
        self.guest_wnd = u32::from(seg.window_len) << self.guest_shift;
        if lt(self.snd_una, ack) && le(ack, self.snd_nxt) {
            let mut acked = ack.wrapping_sub(self.snd_una);
            if self.fin_sent && ack == self.snd_nxt {
                // The FIN takes one sequence number but no byte in the socket.
                self.fin_acked = true;
                acked -= 1;
            }
            if acked > 0 {
                cx.sock.discard(acked as usize);
            }
            self.snd_una = ack;
            self.retries = 0;
            self.rto = RTO_MIN;
            self.dup_acks = 0;
            self.rto_at = (self.snd_nxt != self.snd_una).then(|| cx.now + self.rto);
            if let Some(recover) = self.recover {
                if lt(ack, recover) {
                    // Partial ACK: the next hole is at the new snd_una.
                    self.retransmit_one(cx);
                } else {
                    self.recover = None;
                }
            }
        } else if ack == self.snd_una
            && seg.payload.is_empty()
            && seg.control == TcpControl::None
            && self.snd_nxt != self.snd_una
            && self.guest_wnd == old_wnd
        {
            self.dup_acks = self.dup_acks.saturating_add(1);
            if self.dup_acks == DUP_ACK_THRESHOLD && self.recover.is_none() {
                self.recover = Some(self.snd_nxt);
                self.retransmit_one(cx);
            }
        }
        if self.guest_wnd == 0 && self.rto_at.is_none() && self.state == TcpState::Established {
            // Persist: probe until the guest opens its window.
            self.rto_at = Some(cx.now + self.rto);
        }
    }

    fn handle_data<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        seg_seq: u32,
        seg: &TcpRepr<'_>,
    ) -> Verdict {
        let fin = seg.control == TcpControl::Fin;
        if seg.payload.is_empty() && !fin {
            // A keepalive probes with the byte before rcv_nxt: answer it.
            if lt(seg_seq, self.rcv_nxt) {
                self.send_ack(cx, self.snd_nxt);
            }
            return Verdict::Keep;
        }
        if self.guest_fin {
            self.send_ack(cx, self.snd_nxt);
            return Verdict::Keep;
        }
        if lt(self.rcv_nxt, seg_seq) {
            // A hole before this segment (loss on the tap): keep it for when the hole is
            // filled, and tell the guest at once with a duplicate ACK.
            trace!(
                seq = seg_seq,
                expected = self.rcv_nxt,
                "out of order from guest"
            );
            self.hold(cx, seg_seq, seg.payload, fin);
            self.send_ack(cx, self.snd_nxt);
            return Verdict::Keep;
        }
        match self.deliver(cx, seg_seq, seg.payload, fin) {
            Err(()) => return self.reset(cx),
            Ok(Delivered::All) => {}
            Ok(Delivered::Old | Delivered::Refused) => {
                // A retransmission of what we have, or bytes the socket refused: tell the
                // guest at once where we stand.
                self.send_ack(cx, self.snd_nxt);
                return Verdict::Keep;
            }
        }
        // The hole may be filled: deliver what waited behind it, in order.
        while let Some(pos) = self.ooo.iter().position(|(s, _, _)| le(*s, self.rcv_nxt)) {
            let (s, data, f) = self.ooo.remove(pos);
            *cx.ooo_budget += data.len();
            if self.guest_fin {
                continue;
            }
            match self.deliver(cx, s, &data, f) {
                Err(()) => return self.reset(cx),
                Ok(Delivered::All | Delivered::Old) => {}
                Ok(Delivered::Refused) => break,
            }
        }
        if self.guest_fin {
            self.release_ooo(cx.ooo_budget);
            self.send_ack(cx, self.snd_nxt);
        } else {
            self.ack_pending = true;
        }
        Verdict::Keep
    }

    /// Writes the part of a segment at `seq` that is new (at `rcv_nxt`) to the socket,
    /// stashing what the socket refuses (up to [`MAX_STASH`]); then the FIN, if any.
    fn deliver<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        seq: u32,
        payload: &[u8],
        fin: bool,
    ) -> Result<Delivered, ()> {
        let already = self.rcv_nxt.wrapping_sub(seq) as usize;
        if already > payload.len() || (already == payload.len() && !fin) {
            return Ok(Delivered::Old);
        }
        let data = payload.get(already..).unwrap_or_default();
        let mut taken = 0;
        if !data.is_empty() {
            if self.stash.is_empty() {
                match cx.sock.send(data) {
                    Ok(n) => taken = n,
                    Err(err) => {
                        trace!(%err, "host write failed");
                        return Err(());
                    }
                }
            }
            let rest = data.get(taken..).unwrap_or_default();
            let room = MAX_STASH.saturating_sub(self.stash.len());
            let stashed = rest.len().min(room);
            self.stash
                .extend_from_slice(rest.get(..stashed).unwrap_or_default());
            taken += stashed;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(u32::try_from(taken).unwrap_or(0));
        }
        if taken < data.len() {
            return Ok(Delivered::Refused);
        }
        if fin {
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.guest_fin = true;
            if self.stash.is_empty() {
                cx.sock.shutdown_write();
                self.host_shut = true;
            }
        }
        Ok(Delivered::All)
    }

    /// Keeps an out-of-order segment, within the per-flow and global bounds.
    fn hold<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        seq: u32,
        payload: &[u8],
        fin: bool,
    ) {
        let held: usize = self.ooo.iter().map(|(_, d, _)| d.len()).sum();
        let ahead = seq.wrapping_sub(self.rcv_nxt) as usize + payload.len();
        if self.ooo.len() >= MAX_OOO_SEGMENTS
            || held + payload.len() > MAX_OOO
            || payload.len() > *cx.ooo_budget
            || ahead > MAX_OOO_AHEAD
            || self.ooo.iter().any(|(s, _, _)| *s == seq)
        {
            return;
        }
        *cx.ooo_budget -= payload.len();
        let at = self.ooo.partition_point(|(s, _, _)| lt(*s, seq));
        self.ooo.insert(at, (seq, payload.to_vec(), fin));
    }

    /// Up to three SACK blocks covering the out-of-order queue, contiguous pieces merged.
    fn sack_blocks(&self) -> [Option<(u32, u32)>; 3] {
        let mut blocks: [Option<(u32, u32)>; 3] = [None; 3];
        let mut n = 0;
        for (seq, data, _) in &self.ooo {
            let end = seq.wrapping_add(u32::try_from(data.len()).unwrap_or(0));
            match blocks.get_mut(n.max(1) - 1).and_then(|b| b.as_mut()) {
                Some((_, right)) if n > 0 && le(*seq, *right) => {
                    if lt(*right, end) {
                        *right = end;
                    }
                }
                _ => {
                    let Some(slot) = blocks.get_mut(n) else {
                        break;
                    };
                    *slot = Some((*seq, end));
                    n += 1;
                }
            }
        }
        blocks
    }

    /// Bytes held out of order (returned to the global budget when the flow goes).
    #[must_use]
    pub fn held_bytes(&self) -> usize {
        self.ooo.iter().map(|(_, d, _)| d.len()).sum()
    }

    fn release_ooo(&mut self, budget: &mut usize) {
        *budget += self.held_bytes();
        self.ooo.clear();
    }

    fn drain_stash<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> io::Result<()> {
        if !self.stash.is_empty() {
            let n = cx.sock.send(&self.stash)?;
            self.stash.drain(..n.min(self.stash.len()));
        }
        if self.stash.is_empty() && self.guest_fin && !self.host_shut {
            cx.sock.shutdown_write();
            self.host_shut = true;
        }
        Ok(())
    }

    /// Sends host data the guest's window allows.
    fn push<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        self.wants_push = false;
        if self.state != TcpState::Established || self.fin_sent {
            return;
        }
        loop {
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
            let window = self.guest_wnd.saturating_sub(in_flight);
            if window == 0 {
                return;
            }
            if !cx.out.has_room(MAX_PUSH_SEGMENTS) {
                self.wants_push = true;
                return;
            }
            let offset = in_flight as usize;
            let budget = (window as usize)
                .min(MAX_PUSH_BYTES)
                .min(MAX_PUSH_SEGMENTS * usize::from(self.mss));
            match self.send_segments(cx, offset, budget, self.snd_nxt) {
                Ok(0) => {
                    self.send_fin(cx);
                    return;
                }
                Ok(n) => {
                    self.snd_nxt = self.snd_nxt.wrapping_add(u32::try_from(n).unwrap_or(0));
                    if self.rto_at.is_none() {
                        self.rto_at = Some(cx.now + self.rto);
                    }
                    if n == budget {
                        // The socket may hold more: yield to the other flows; the engine
                        // resumes this one in its round-robin ([`Conn::resume`]).
                        self.wants_push = true;
                        return;
                    }
                    // A short read loops once more: the next peek says `WouldBlock`, or
                    // 0 when the remote's FIN came with the data (no further edge).
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    return;
                }
                Err(err) => {
                    trace!(%err, "host read failed");
                    return;
                }
            }
        }
    }

    /// Continues sending host data after [`Conn::take_push_request`] queued another turn.
    pub fn resume<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> Verdict {
        self.push_queued = false;
        self.push(cx);
        self.verdict()
    }

    /// Whether this connection stopped sending with data and window left, and is not yet
    /// in the engine's round-robin; marks it queued.
    pub fn take_push_request(&mut self) -> bool {
        if self.wants_push && !self.push_queued {
            self.push_queued = true;
            true
        } else {
            false
        }
    }

    /// Peeks up to `budget` bytes at `offset` into segments starting at `first_seq`.
    /// Returns the bytes sent (0 = end of stream).
    fn send_segments<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        offset: usize,
        budget: usize,
        first_seq: u32,
    ) -> io::Result<usize> {
        let v6 = cx.key.remote_addr.is_ipv6();
        let hdr = build::tcp_headers_len(v6);
        let mss = usize::from(self.mss);
        let count = budget.div_ceil(mss).clamp(1, MAX_PUSH_SEGMENTS);
        let mut frames: heapless::Vec<Vec<u8>, MAX_PUSH_SEGMENTS> = heapless::Vec::new();
        let mut left = budget;
        for _ in 0..count {
            let len = left.min(mss);
            left -= len;
            let mut buf = cx.out.data_buffer();
            buf.resize(hdr + len, 0);
            if frames.push(buf).is_err() {
                break;
            }
        }
        let got = {
            let mut iov: heapless::Vec<IoSliceMut<'_>, MAX_PUSH_SEGMENTS> = heapless::Vec::new();
            for frame in &mut frames {
                if let Some(payload) = frame.get_mut(hdr..) {
                    let _ = iov.push(IoSliceMut::new(payload));
                }
            }
            cx.sock.peek(offset, &mut iov)
        };
        let got = match got {
            Ok(n) => n,
            Err(err) => {
                for frame in frames {
                    cx.out.recycle(frame);
                }
                return Err(err);
            }
        };
        let window = self.advertise(cx);
        let mut seq = first_seq;
        let mut left = got;
        let total = frames.len();
        for (i, mut frame) in frames.into_iter().enumerate() {
            let cap = frame.len() - hdr;
            let len = left.min(cap);
            if len == 0 {
                cx.out.recycle(frame);
                continue;
            }
            left -= len;
            frame.truncate(hdr + len);
            let last = left == 0 || i + 1 == total;
            let header = self.header(cx, seq, if last { TCP_PSH } else { 0 }, window);
            if build::tcp_in_place(&mut frame, &header).is_ok() {
                cx.out.push(frame);
            } else {
                cx.out.recycle(frame);
            }
            seq = seq.wrapping_add(u32::try_from(len).unwrap_or(0));
        }
        self.ack_pending = false;
        Ok(got)
    }

    fn retransmit_one<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        let in_flight = self.snd_nxt.wrapping_sub(self.snd_una) as usize;
        if self.fin_sent && in_flight == 1 {
            self.resend_fin(cx);
            return;
        }
        let len = usize::from(self.mss).min(in_flight);
        if len > 0 {
            let _ = self.send_segments(cx, 0, len, self.snd_una);
        }
    }

    fn on_rto<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> Verdict {
        self.retries = self.retries.saturating_add(1);
        if self.retries > MAX_RETRIES {
            trace!("too many retransmissions");
            return self.reset(cx);
        }
        self.rto = (self.rto * 2).min(RTO_MAX);
        match self.state {
            TcpState::Connecting => {}
            TcpState::SynSent => self.send_syn(cx),
            TcpState::SynAckSent => self.send_syn_ack(cx),
            TcpState::Established => {
                if self.snd_nxt == self.snd_una {
                    if self.guest_wnd == 0 {
                        // Zero-window probe; not a failure of the guest.
                        self.retries = 0;
                        self.send_ack(cx, self.snd_una.wrapping_sub(1));
                    }
                } else {
                    // Go back to the oldest unacknowledged byte.
                    self.recover = None;
                    self.dup_acks = 0;
                    if self.fin_sent && self.snd_nxt.wrapping_sub(self.snd_una) == 1 {
                        self.resend_fin(cx);
                    } else {
                        self.fin_sent = false;
                        self.snd_nxt = self.snd_una;
                        self.push(cx);
                    }
                }
            }
        }
        self.rto_at = Some(cx.now + self.rto);
        Verdict::Keep
    }

    fn send_fin<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        if self.fin_sent {
            return;
        }
        self.fin_sent = true;
        let fin_seq = self.snd_nxt;
        self.snd_nxt = self.snd_nxt.wrapping_add(1);
        self.emit_empty(cx, fin_seq, TCP_FIN);
        if self.rto_at.is_none() {
            self.rto_at = Some(cx.now + self.rto);
        }
    }

    fn resend_fin<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        let fin_seq = self.snd_nxt.wrapping_sub(1);
        self.emit_empty(cx, fin_seq, TCP_FIN);
    }

    fn send_ack<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>, seq: u32) {
        self.emit_empty(cx, seq, 0);
    }

    fn emit_empty<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>, seq: u32, flags: u8) {
        let window = self.advertise(cx);
        if self.sack && flags == 0 && !self.ooo.is_empty() {
            // Tell the guest what waits behind the hole (RFC 2018), so it resends only
            // the hole.
            let repr = TcpRepr {
                src_port: cx.key.remote_port,
                dst_port: cx.key.guest_port,
                control: TcpControl::None,
                seq_number: TcpSeqNumber(seq.cast_signed()),
                ack_number: Some(TcpSeqNumber(self.rcv_nxt.cast_signed())),
                window_len: window,
                window_scale: None,
                max_seg_size: None,
                sack_permitted: false,
                sack_ranges: self.sack_blocks(),
                timestamp: None,
                payload: &[],
            };
            emit_repr(cx, &repr);
            self.ack_pending = false;
            return;
        }
        let header = self.header(cx, seq, flags, window);
        let mut frame = cx.out.buffer();
        frame.resize(build::tcp_headers_len(cx.key.remote_addr.is_ipv6()), 0);
        if build::tcp_in_place(&mut frame, &header).is_ok() {
            cx.out.push(frame);
        } else {
            cx.out.recycle(frame);
        }
        self.ack_pending = false;
    }

    fn send_syn_ack<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        self.emit_syn(cx, Some(self.rcv_nxt));
    }

    /// Emits our SYN (`ack` = `None`, inbound) or SYN-ACK with our options: MSS, window
    /// scale when either side scales (an inbound connection offers it), SACK-permitted as
    /// negotiated (offered inbound).
    fn emit_syn<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>, ack: Option<u32>) {
        let space = self.window(cx).min(u32::from(u16::MAX));
        let repr = TcpRepr {
            src_port: cx.key.remote_port,
            dst_port: cx.key.guest_port,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(self.iss.cast_signed()),
            ack_number: ack.map(|a| TcpSeqNumber(a.cast_signed())),
            window_len: u16::try_from(space).unwrap_or(u16::MAX),
            window_scale: (self.our_shift > 0 || self.guest_shift > 0).then_some(self.our_shift),
            max_seg_size: Some(self.mss),
            sack_permitted: self.sack,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        self.adv_edge = self.rcv_nxt.wrapping_add(space);
        emit_repr(cx, &repr);
    }

    /// Sends a RST to the guest and tells the caller to abort the socket.
    fn reset<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> Verdict {
        send_rst(cx.out, cx.macs, cx.key, self.snd_nxt, Some(self.rcv_nxt));
        Verdict::Abort
    }

    /// The receive window we can offer: the socket's free space less the stash.
    fn window<S: HostSocket + ?Sized>(&self, cx: &mut Cx<'_, S>) -> u32 {
        let space = cx.sock.send_space().saturating_sub(self.stash.len());
        let max = u32::from(u16::MAX) << self.our_shift;
        u32::try_from(space).unwrap_or(max).min(max)
    }

    /// The window field for the next segment; records the right edge the guest will see.
    fn advertise<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> u16 {
        let space = if self.guest_fin { 0 } else { self.window(cx) };
        let field = u16::try_from(space >> self.our_shift).unwrap_or(u16::MAX);
        self.adv_edge = self
            .rcv_nxt
            .wrapping_add(u32::from(field) << self.our_shift);
        if self.state == TcpState::Established {
            self.arm_window_check(cx.now);
        }
        field
    }

    fn header<S: HostSocket + ?Sized>(
        &self,
        cx: &Cx<'_, S>,
        seq: u32,
        flags: u8,
        window: u16,
    ) -> TcpHeader {
        TcpHeader {
            macs: cx.macs,
            addrs: (cx.key.remote_addr, cx.key.guest_addr),
            ports: (cx.key.remote_port, cx.key.guest_port),
            seq,
            ack: self.rcv_nxt,
            flags,
            window,
        }
    }
}

/// Sends a RST for `key` to the guest: with `ack` as RST+ACK (answering a segment without
/// an ACK, RFC 9293 §3.10.7.1), else a bare RST at `seq`.
pub fn send_rst(
    out: &mut Queue,
    macs: (EthernetAddress, EthernetAddress),
    key: &Key,
    seq: u32,
    ack: Option<u32>,
) {
    let repr = TcpRepr {
        src_port: key.remote_port,
        dst_port: key.guest_port,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(seq.cast_signed()),
        ack_number: ack.map(|a| TcpSeqNumber(a.cast_signed())),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    emit_repr_to(out, macs, key, &repr);
}

/// The RST answering `seg` when no flow takes it (RFC 9293 §3.10.7.1, CLOSED state).
pub fn rst_for(seg: &TcpRepr<'_>) -> (u32, Option<u32>) {
    match seg.ack_number {
        Some(ack) => (seq(ack), None),
        None => {
            let len = seg.payload.len()
                + usize::from(matches!(seg.control, TcpControl::Syn | TcpControl::Fin));
            (
                0,
                Some(seq(seg.seq_number).wrapping_add(u32::try_from(len).unwrap_or(0))),
            )
        }
    }
}

fn emit_repr<S: HostSocket + ?Sized>(cx: &mut Cx<'_, S>, repr: &TcpRepr<'_>) {
    emit_repr_to(cx.out, cx.macs, cx.key, repr);
}

fn emit_repr_to(
    out: &mut Queue,
    macs: (EthernetAddress, EthernetAddress),
    key: &Key,
    repr: &TcpRepr<'_>,
) {
    let mut frame = out.buffer();
    let payload = Payload::Tcp(*repr);
    let built = match (key.remote_addr, key.guest_addr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            build::ipv4(&mut frame, macs, (s, d), build::DEFAULT_TTL, &payload)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            build::ipv6(&mut frame, macs, (s, d), build::DEFAULT_TTL, &payload)
        }
        _ => Err(build::BuildError::WrongFamily),
    };
    if built.is_ok() {
        out.push(frame);
    } else {
        out.recycle(frame);
    }
}

fn seq(n: TcpSeqNumber) -> u32 {
    n.0.cast_unsigned()
}

/// `a < b` in sequence space (RFC 1982 serial arithmetic).
fn lt(a: u32, b: u32) -> bool {
    a.wrapping_sub(b).cast_signed() < 0
}

fn le(a: u32, b: u32) -> bool {
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
/// Out-of-order bytes kept across all flows.
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
