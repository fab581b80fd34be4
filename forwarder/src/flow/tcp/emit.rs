//! Segments toward the guest: ACKs, SYN/SYN-ACK, RSTs, headers with the current window, and
//! the frames they are built into.

use std::net::IpAddr;

use super::*;
use crate::wire::build::{self, Payload, TcpHeader};

impl Conn {
    pub(super) fn send_ack<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>, seq: u32) {
        self.emit_empty(cx, seq, 0);
    }

    pub(super) fn emit_empty<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        seq: u32,
        flags: u8,
    ) {
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

    pub(super) fn send_syn_ack<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) {
        self.emit_syn(cx, Some(self.rcv_nxt));
    }

    /// Emits our SYN (`ack` = `None`, inbound) or SYN-ACK with our options: MSS, window
    /// scale when either side scales (an inbound connection offers it), SACK-permitted as
    /// negotiated (offered inbound).
    pub(super) fn emit_syn<S: HostSocket + ?Sized>(
        &mut self,
        cx: &mut Cx<'_, S>,
        ack: Option<u32>,
    ) {
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
    pub(super) fn reset<S: HostSocket + ?Sized>(&mut self, cx: &mut Cx<'_, S>) -> Verdict {
        send_rst(cx.out, cx.macs, cx.key, self.snd_nxt, Some(self.rcv_nxt));
        Verdict::Abort
    }

    pub(super) fn header<S: HostSocket + ?Sized>(
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

pub(super) fn emit_repr<S: HostSocket + ?Sized>(cx: &mut Cx<'_, S>, repr: &TcpRepr<'_>) {
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
