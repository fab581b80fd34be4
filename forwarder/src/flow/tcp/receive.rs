//! Guest → host: in-order data into the host socket, the stash, the out-of-order queue
//! with its SACK blocks, and the window advertised to the guest (theory of operation in
//! `flow::tcp`).

use std::io;
use std::time::Instant;

use tracing::trace;

use super::*;

impl Conn {
    /// Sends a window update if the socket can take clearly more than the guest knows.
    /// Returns whether one was sent.
    pub(super) fn window_update<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> bool {
        if self.guest_fin || self.state != TcpState::Established {
            return false;
        }
        let space = self.window(cx);
        let known = self.adv_edge.wrapping_sub(self.rcv_nxt);
        if space > known && (space - known >= u32::from(self.mss) || known <= space / 2) {
            self.wnd_backoff = WINDOW_RECHECK_MIN;
            cx.counters.window_updates += 1;
            self.send_ack(cx, self.snd_nxt);
            true
        } else {
            false
        }
    }

    /// A socket that is not full does not signal when it drains, so while the window the
    /// guest knows is small, re-check the socket's space on a short, backed-off timer
    /// (pasta's `ACK_INTERVAL` plays the same role).
    pub(super) fn arm_window_check(&mut self, now: Instant) {
        let known = self.adv_edge.wrapping_sub(self.rcv_nxt);
        if !self.guest_fin && known < WINDOW_LOW && self.wnd_check_at.is_none() {
            self.wnd_check_at = Some(now + self.wnd_backoff);
        }
    }

    pub(super) fn handle_data<S: HostSocket + ?Sized>(
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
    /// stashing what the socket refuses (up to [`MAX_STASH`], and beyond it whatever lies
    /// inside the advertised window, on the shared budget); then the FIN, if any.
    pub(super) fn deliver<S: HostSocket + ?Sized>(
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
            // Up to MAX_STASH of what the socket refused is always kept; beyond that, every
            // byte inside the window we advertised is kept too, on the shared budget: the
            // guest was told it fits (see "Flow control").
            let at = self.rcv_nxt.wrapping_add(u32::try_from(taken).unwrap_or(0));
            let in_window = if lt(at, self.adv_edge) {
                self.adv_edge.wrapping_sub(at) as usize
            } else {
                0
            };
            let own = MAX_STASH.saturating_sub(self.stash.len());
            let borrow = in_window.saturating_sub(own).min(*cx.ooo_budget);
            let stashed = rest.len().min(own + borrow);
            *cx.ooo_budget -= stashed.saturating_sub(own);
            self.stash
                .extend_from_slice(rest.get(..stashed).unwrap_or_default());
            taken += stashed;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(u32::try_from(taken).unwrap_or(0));
        }
        if taken < data.len() {
            if lt(self.rcv_nxt, self.adv_edge) {
                // Bytes we had said fit were refused: the rule this module keeps is broken.
                cx.counters.in_window_dropped += 1;
            }
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
    pub(super) fn hold<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        seq: u32,
        payload: &[u8],
        fin: bool,
    ) {
        let held = self.held_out_of_order();
        let ahead = seq.wrapping_sub(self.rcv_nxt) as usize + payload.len();
        if self.ooo.iter().any(|(s, _, _)| *s == seq) {
            return;
        }
        if self.ooo.len() >= MAX_OOO_SEGMENTS
            || held + payload.len() > MAX_OOO
            || payload.len() > *cx.ooo_budget
            || ahead > MAX_OOO_AHEAD
        {
            if lt(seq, self.adv_edge) {
                cx.counters.in_window_dropped += 1;
            }
            return;
        }
        *cx.ooo_budget -= payload.len();
        let at = self.ooo.partition_point(|(s, _, _)| lt(*s, seq));
        self.ooo.insert(at, (seq, payload.to_vec(), fin));
    }

    /// Up to three SACK blocks covering the out-of-order queue, contiguous pieces merged.
    pub(super) fn sack_blocks(&self) -> [Option<(u32, u32)>; 3] {
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

    /// Bytes held on the shared budget: out of order, and stashed beyond [`MAX_STASH`]
    /// (returned to the budget when the flow goes).
    #[must_use]
    pub fn held_bytes(&self) -> usize {
        self.held_out_of_order() + self.stash.len().saturating_sub(MAX_STASH)
    }

    /// Bytes held out of order.
    #[must_use]
    pub fn held_out_of_order(&self) -> usize {
        self.ooo.iter().map(|(_, d, _)| d.len()).sum()
    }

    pub(super) fn release_ooo(&mut self, budget: &mut usize) {
        *budget += self.held_out_of_order();
        self.ooo.clear();
    }

    pub(super) fn drain_stash<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
    ) -> io::Result<()> {
        if !self.stash.is_empty() {
            let borrowed = self.stash.len().saturating_sub(MAX_STASH);
            let n = cx.sock.send(&self.stash)?;
            self.stash.drain(..n.min(self.stash.len()));
            *cx.ooo_budget += borrowed - self.stash.len().saturating_sub(MAX_STASH);
        }
        if self.stash.is_empty() && self.guest_fin && !self.host_shut {
            cx.sock.shutdown_write();
            self.host_shut = true;
        }
        Ok(())
    }

    /// The receive window we can offer: the socket's free space less the stash.
    pub(super) fn window<S: HostSocket + ?Sized>(&self, cx: &mut Cx<'_, S>) -> u32 {
        let space = cx.sock.send_space().saturating_sub(self.stash.len());
        let max = u32::from(u16::MAX) << self.our_shift;
        u32::try_from(space).unwrap_or(max).min(max)
    }

    /// The window field for the next segment; records the right edge the guest will see.
    pub(super) fn advertise<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> u16 {
        let space = if self.guest_fin { 0 } else { self.window(cx) };
        let field = u16::try_from(space >> self.our_shift).unwrap_or(u16::MAX);
        let closed = field == 0 && !self.guest_fin;
        if closed && !self.wnd_closed {
            cx.counters.zero_windows += 1;
        }
        self.wnd_closed = closed;
        self.adv_edge = self
            .rcv_nxt
            .wrapping_add(u32::from(field) << self.our_shift);
        if self.state == TcpState::Established {
            self.arm_window_check(cx.now);
        }
        field
    }
}
