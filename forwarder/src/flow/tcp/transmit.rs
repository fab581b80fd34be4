//! Host → guest: the guest's ACKs, bytes peeked from the host socket pushed as segments,
//! retransmission (RTO, fast retransmit, NewReno recovery) and our FIN (theory of operation
//! in `flow::tcp`).

use std::io;

use tracing::trace;

use super::*;
use crate::wire::build::{self, TCP_FIN, TCP_PSH};

impl Conn {
    pub(super) fn handle_ack<S: HostSocket + ?Sized>(
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

    /// Sends host data the guest's window allows.
    pub(super) fn push<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
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
    pub(super) fn send_segments<S: HostSocket + ?Sized>(
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

    pub(super) fn retransmit_one<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
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

    pub(super) fn on_rto<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> Verdict {
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

    pub(super) fn send_fin<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
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

    pub(super) fn resend_fin<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        let fin_seq = self.snd_nxt.wrapping_sub(1);
        self.emit_empty(cx, fin_seq, TCP_FIN);
    }
}
