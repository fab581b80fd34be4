//! TCP translation scenarios, one per state and event, through the engine with a fake host
//! (`engine::fake`) and a manual clock. Each reads like a packet trace: guest segment in,
//! host operations and segments to the guest out.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::engine::fake::{FakeHost, FakeTcp};
use crate::engine::{Engine, Settings};
use crate::flow::{FlowId, tcp};
use crate::plan::DEFAULT_MAC;
use crate::plan::testing::network;
use crate::policy::Policy;
use crate::services::Switches;
use crate::wire::build::{self, Payload};
use crate::wire::{self, EthernetAddress, L3, L4, TcpControl, TcpRepr, TcpSeqNumber};

const GUEST_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0x0b]);
const GUEST: &str = "198.51.100.2";
const REMOTE: &str = "203.0.113.1";
const GUEST_ISN: u32 = 1000;

/// A segment as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seg {
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    mss: Option<u16>,
    wscale: Option<u8>,
    sack: [Option<(u32, u32)>; 3],
    payload: Vec<u8>,
}

struct T {
    e: Engine,
    host: FakeHost,
    now: Instant,
    port: u16,
}

impl T {
    fn new() -> Self {
        Self::with(Settings::default())
    }

    fn with(settings: Settings) -> Self {
        let now = Instant::now();
        let services = Switches {
            ra: false,
            ..Switches::default()
        };
        Self {
            e: Engine::new(network(), services, settings, now),
            host: FakeHost::new(),
            now,
            port: 40000,
        }
    }

    fn frame(&self, control: TcpControl, seq: u32, ack: Option<u32>, data: &[u8]) -> Vec<u8> {
        self.frame_win(control, seq, ack, data, 1000)
    }

    fn frame_win(
        &self,
        control: TcpControl,
        seq: u32,
        ack: Option<u32>,
        data: &[u8],
        window: u16,
    ) -> Vec<u8> {
        let syn = control == TcpControl::Syn;
        let repr = TcpRepr {
            src_port: self.port,
            dst_port: 80,
            control,
            seq_number: TcpSeqNumber(seq.cast_signed()),
            ack_number: ack.map(|a| TcpSeqNumber(a.cast_signed())),
            window_len: window,
            window_scale: syn.then_some(7),
            max_seg_size: syn.then_some(1460),
            sack_permitted: syn,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: data,
        };
        let mut out = Vec::new();
        build::ipv4(
            &mut out,
            (GUEST_MAC, DEFAULT_MAC),
            (GUEST.parse().unwrap(), REMOTE.parse().unwrap()),
            64,
            &Payload::Tcp(repr),
        )
        .unwrap();
        out
    }

    /// Sends frames from the guest as one batch.
    fn send(&mut self, frames: &[Vec<u8>]) {
        for f in frames {
            self.e.handle_frame(self.now, f, &mut self.host);
        }
        self.e.end_batch(self.now, &mut self.host);
    }

    fn out(&mut self) -> Vec<Seg> {
        std::iter::from_fn(|| self.e.poll_transmit())
            .map(|f| {
                let frame = wire::parse(&f).expect("our frame parses");
                let L3::Ipv4 { ip, l4: L4::Tcp(t) } = frame.l3 else {
                    panic!("not TCP/IPv4: {frame:?}")
                };
                assert_eq!(ip.src_addr.to_string(), REMOTE);
                assert_eq!(ip.dst_addr.to_string(), GUEST);
                assert_eq!((t.src_port, t.dst_port), (80, self.port));
                Seg {
                    control: t.control,
                    seq: t.seq_number.0.cast_unsigned(),
                    ack: t.ack_number.map(|a| a.0.cast_unsigned()),
                    window: t.window_len,
                    mss: t.max_seg_size,
                    wscale: t.window_scale,
                    sack: t.sack_ranges,
                    payload: t.payload.to_vec(),
                }
            })
            .collect()
    }

    fn flow_for_port(&self, port: u16) -> FlowId {
        self.e
            .flows()
            .iter()
            .find(|(_, f)| f.key().guest_port == port)
            .expect("a flow")
            .0
    }

    /// Frames out, as (destination port) only.
    fn out_ports(&mut self) -> Vec<u16> {
        std::iter::from_fn(|| self.e.poll_transmit())
            .map(|f| match wire::parse(&f).expect("parses").l3 {
                L3::Ipv4 { l4: L4::Tcp(t), .. } => t.dst_port,
                _ => 0,
            })
            .collect()
    }

    /// Segments out, whatever their port.
    fn out_any(&mut self) -> Vec<Seg> {
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| self.e.poll_transmit()).collect();
        let mut segs = Vec::new();
        for f in frames {
            if let L3::Ipv4 { l4: L4::Tcp(t), .. } = wire::parse(&f).expect("parses").l3 {
                segs.push(Seg {
                    control: t.control,
                    seq: t.seq_number.0.cast_unsigned(),
                    ack: t.ack_number.map(|a| a.0.cast_unsigned()),
                    window: t.window_len,
                    mss: t.max_seg_size,
                    wscale: t.window_scale,
                    sack: t.sack_ranges,
                    payload: t.payload.to_vec(),
                });
            }
        }
        segs
    }

    fn flow(&self) -> FlowId {
        self.flow_for_port(self.port)
    }

    fn sock(&mut self) -> &mut FakeTcp {
        let flow = self.flow();
        self.host.tcp.get_mut(&flow).expect("socket")
    }

    fn ready(&mut self, readable: bool, writable: bool) {
        let flow = self.flow();
        self.e
            .handle_tcp_ready(self.now, flow, readable, writable, false, &mut self.host);
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        while let Some(t) = self.e.poll_timeout() {
            if t > self.now {
                break;
            }
            self.e.handle_timeout(self.now, &mut self.host);
        }
    }

    /// SYN, connect completes, SYN-ACK, ACK: returns our ISS + 1 (the first host byte).
    fn establish(&mut self) -> u32 {
        self.send(&[self.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
        assert!(self.out().is_empty(), "no SYN-ACK before the host connects");
        self.ready(false, true);
        let out = self.out();
        assert_eq!(out.len(), 1);
        let synack = &out[0];
        assert_eq!(synack.control, TcpControl::Syn);
        assert_eq!(synack.ack, Some(GUEST_ISN + 1));
        let first = synack.seq.wrapping_add(1);
        self.send(&[self.frame(TcpControl::None, GUEST_ISN + 1, Some(first), &[])]);
        assert!(self.out().is_empty());
        first
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| u8::try_from(i * 31 % 251).unwrap())
        .collect()
}

#[test]
fn syn_waits_for_connect_then_synack_carries_options() {
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    let flow = t.flow();
    assert_eq!(
        t.host.tcp[&flow].target,
        Some(format!("{REMOTE}:80").parse().unwrap())
    );
    assert!(t.out().is_empty());
    // A retransmitted SYN while connecting is absorbed.
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    assert!(t.out().is_empty());
    t.ready(false, true);
    let out = t.out();
    assert_eq!(out[0].control, TcpControl::Syn);
    assert_eq!(out[0].mss, Some(1460), "min(guest MSS, tap MTU - 40)");
    assert_eq!(out[0].wscale, Some(tcp::OUR_WINDOW_SHIFT));
    assert_eq!(t.e.stats().tcp_connected, 1);
}

#[test]
fn no_tcp_drops_the_guests_segments_silently() {
    let mut t = T::new();
    let off = Switches {
        ra: false,
        tcp: false,
        ..Switches::default()
    };
    t.e = Engine::new(network(), off, Settings::default(), t.now);
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    assert!(t.host.tcp.is_empty(), "no socket opened");
    assert!(t.out().is_empty(), "no RST, no SYN-ACK");
    assert_eq!(t.e.stats().ignored, 1);
}

#[test]
fn refused_connect_gets_rst_and_flow_goes() {
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    let flow = t.flow();
    t.sock().connect_error = Some(libc::ECONNREFUSED);
    t.ready(false, true);
    let out = t.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].control, TcpControl::Rst);
    assert_eq!(out[0].ack, Some(GUEST_ISN + 1));
    assert!(t.e.flows().is_empty());
    assert_eq!(t.host.closed, vec![(flow, true)]);
}

#[test]
fn immediate_connect_failure_and_policy_denial_get_rst() {
    let mut t = T::new();
    t.host.connect_now_error = Some(libc::ENETUNREACH);
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    assert_eq!(t.out()[0].control, TcpControl::Rst);
    assert!(t.e.flows().is_empty());

    let mut t = T::with(Settings {
        policy: Policy {
            deny: vec![format!("tcp://{REMOTE}:80").parse().unwrap()],
            ..Policy::default()
        },
        ..Settings::default()
    });
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    let out = t.out();
    assert_eq!(out[0].control, TcpControl::Rst);
    assert!(t.host.tcp.is_empty(), "no socket for a denied flow");
    assert_eq!(t.e.stats().tcp_denied, 1);
}

#[test]
fn a_syn_the_fast_path_claims_leaves_nothing_in_userspace() {
    let mut t = T::new();
    t.host.fast = Some(Vec::new());
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    // The flow is in the one table, as the kernel's: no socket, no segment from userspace.
    let flow = t.flow();
    assert!(matches!(
        t.e.flows().get(flow).map(|f| &f.ext),
        Some(crate::engine::Detail::Kernel(_))
    ));
    assert!(t.host.tcp.is_empty() && t.out().is_empty());
    let s = t.e.stats();
    assert_eq!((s.fast_tcp_flows, s.fast_flows, s.flows_open), (1, 1, 1));
    let keys = t.host.fast.clone().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].remote_addr, REMOTE.parse::<IpAddr>().unwrap());
    assert_eq!((keys[0].guest_port, keys[0].remote_port), (t.port, 80));
    // A segment of it that reaches userspace is dropped and counted, never answered.
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 1, Some(1), b"x")]);
    assert!(t.out().is_empty());
    assert_eq!(t.e.stats().fast_stray, 1);
    assert_eq!(t.host.fast.as_ref().unwrap().len(), 1, "offered once");
    // The shell reports it closing, then released: it leaves the table.
    t.e.handle_kernel_flow(flow, crate::engine::KernelEvent::Closing);
    assert_eq!(
        t.e.flows().get(flow).unwrap().state(),
        crate::flow::State::Closing
    );
    t.e.handle_kernel_flow(flow, crate::engine::KernelEvent::Ended);
    assert!(t.e.flows().is_empty());
    assert_eq!(t.e.stats().fast_flows, 0);
}

#[test]
fn mid_stream_segments_are_never_offered_to_the_fast_path() {
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    t.host.fast = Some(Vec::new());
    t.ready(false, true);
    t.out();
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 1, Some(1), b"x")]);
    assert!(
        t.host.fast.as_ref().unwrap().is_empty(),
        "a userspace flow stays there"
    );
    assert_eq!(t.e.stats().fast_tcp_flows, 0);
}

#[test]
fn mapped_and_denied_destinations_are_never_offered_to_the_fast_path() {
    let mut t = T::with(Settings {
        policy: Policy {
            maps: vec![(REMOTE.parse().unwrap(), "127.0.0.1".parse().unwrap())],
            ..Policy::default()
        },
        ..Settings::default()
    });
    t.host.fast = Some(Vec::new());
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    assert_eq!(t.e.flows().len(), 1, "mapped: translated in userspace");
    assert_eq!(
        t.host.tcp[&t.flow()].target,
        Some("127.0.0.1:80".parse().unwrap())
    );
    let mut t = T::with(Settings {
        policy: Policy {
            deny: vec![format!("tcp://{REMOTE}:80").parse().unwrap()],
            ..Policy::default()
        },
        ..Settings::default()
    });
    t.host.fast = Some(Vec::new());
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    assert_eq!(t.out()[0].control, TcpControl::Rst);
    assert!(t.host.fast.as_ref().unwrap().is_empty());
    assert_eq!(t.e.stats().fast_tcp_flows, 0);
}

#[test]
fn segment_without_flow_gets_rst() {
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::None, 5, Some(77), b"x")]);
    let out = t.out();
    assert_eq!(out[0].control, TcpControl::Rst);
    assert_eq!(out[0].seq, 77);
    // A RST is never answered.
    t.send(&[t.frame(TcpControl::Rst, 5, None, &[])]);
    assert!(t.out().is_empty());
}

#[test]
fn full_table_refuses_with_rst() {
    let mut t = T::with(Settings {
        max_flows: 1,
        ..Settings::default()
    });
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    t.port += 1;
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    assert_eq!(t.out()[0].control, TcpControl::Rst);
    assert_eq!(t.e.stats().flow_table_full, 1);
}

#[test]
fn guest_data_is_written_and_acked_once_per_batch() {
    let mut t = T::new();
    let first = t.establish();
    let a = data(1000);
    t.send(&[
        t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), &a[..500]),
        t.frame(TcpControl::Psh, GUEST_ISN + 501, Some(first), &a[500..]),
    ]);
    assert_eq!(t.sock().sent, a);
    let out = t.out();
    assert_eq!(out.len(), 1, "one ACK for the batch: {out:?}");
    assert_eq!(out[0].ack, Some(GUEST_ISN + 1001));
    // A retransmission of what we have is re-acknowledged, not written twice.
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), &a[..500])]);
    assert_eq!(t.sock().sent.len(), 1000);
    assert_eq!(t.out()[0].ack, Some(GUEST_ISN + 1001));
}

#[test]
fn partial_write_is_stashed_then_flushed_and_window_follows_space() {
    let mut t = T::new();
    t.host.sndbuf = 2000;
    let first = t.establish();
    let a = data(2500);
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), &a)]);
    assert_eq!(t.sock().sent.len(), 2000);
    let out = t.out();
    assert_eq!(out[0].ack, Some(GUEST_ISN + 2501), "stashed bytes are ours");
    assert_eq!(out[0].window, 0, "socket full and 500 bytes stashed");
    t.sock().drain_sent(2000);
    t.ready(false, true);
    assert_eq!(t.sock().sent, a, "stash written in order");
    let out = t.out();
    assert_eq!(out.len(), 1, "window update");
    assert!(out[0].window > 0);
}

#[test]
fn data_beyond_stash_is_refused_with_immediate_ack() {
    let mut t = T::new();
    t.host.sndbuf = 10;
    let first = t.establish();
    let big = data(40_000);
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), &big)]);
    assert_eq!(t.out()[0].ack, Some(GUEST_ISN + 40_001));
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 40_001, Some(first), &big)]);
    let taken = 10 + tcp::MAX_STASH;
    let out = t.out();
    assert_eq!(
        out.len(),
        1,
        "refusal acknowledged at once, not at batch end"
    );
    assert_eq!(
        out[0].ack,
        Some(GUEST_ISN + 1 + u32::try_from(taken).unwrap())
    );
}

#[test]
fn out_of_order_from_guest_is_held_and_sacked_until_the_hole_fills() {
    let mut t = T::new();
    let first = t.establish();
    let a = data(300);
    // Bytes 100..200 and 250..300 arrive; 0..100 and 200..250 are lost.
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 101, Some(first), &a[100..200])]);
    assert!(t.sock().sent.is_empty(), "nothing written past a hole");
    let out = t.out();
    assert_eq!(out[0].ack, Some(GUEST_ISN + 1), "duplicate ACK at once");
    assert_eq!(out[0].sack[0], Some((GUEST_ISN + 101, GUEST_ISN + 201)));
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 251, Some(first), &a[250..])]);
    let out = t.out();
    assert_eq!(
        out[0].sack[..2],
        [
            Some((GUEST_ISN + 101, GUEST_ISN + 201)),
            Some((GUEST_ISN + 251, GUEST_ISN + 301))
        ]
    );
    // The first hole fills: everything up to the second hole goes out, in order.
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), &a[..100])]);
    assert_eq!(t.sock().sent, a[..200]);
    let out = t.out();
    assert_eq!(out.last().unwrap().ack, Some(GUEST_ISN + 201));
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 201, Some(first), &a[200..250])]);
    assert_eq!(t.sock().sent, a);
    let out = t.out();
    assert_eq!(out.len(), 1, "one cumulative ACK");
    assert_eq!(out[0].ack, Some(GUEST_ISN + 301));
    assert_eq!(out[0].sack, [None; 3], "nothing held any more");
}

#[test]
fn out_of_order_fin_completes_when_the_hole_fills() {
    let mut t = T::new();
    let first = t.establish();
    t.send(&[t.frame(TcpControl::Fin, GUEST_ISN + 4, Some(first), b"def")]);
    assert!(!t.sock().shut);
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), b"abc")]);
    assert_eq!(t.sock().sent, b"abcdef");
    assert!(t.sock().shut, "the held FIN took effect");
    let out = t.out();
    assert_eq!(out.last().unwrap().ack, Some(GUEST_ISN + 8));
}

#[test]
fn host_data_is_segmented_and_discarded_only_when_acked() {
    let mut t = T::new();
    let first = t.establish();
    let b = data(4000);
    t.sock().rx = b.clone();
    t.ready(true, false);
    let out = t.out();
    // The guest's window is 1000 << 7 = 128000 bytes; MSS 1460.
    let sizes: Vec<usize> = out.iter().map(|s| s.payload.len()).collect();
    assert_eq!(sizes, vec![1460, 1460, 1080]);
    assert_eq!(out[0].seq, first);
    assert_eq!(out[2].control, TcpControl::Psh);
    let got: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(got, b);
    assert_eq!(t.sock().rx.len(), 4000, "nothing discarded before the ACK");
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 1, Some(first + 2920), &[])]);
    assert_eq!(t.sock().rx.len(), 1080);
}

#[test]
fn guest_window_limits_what_is_sent() {
    let mut t = T::new();
    let first = t.establish();
    t.sock().rx = data(5000);
    // Window 10 << 7 = 1280 bytes.
    t.send(&[t.frame_win(TcpControl::None, GUEST_ISN + 1, Some(first), &[], 10)]);
    t.ready(true, false);
    let sent: usize = t.out().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 1280);
    // The ACK opens the window again.
    t.send(&[t.frame_win(TcpControl::None, GUEST_ISN + 1, Some(first + 1280), &[], 10)]);
    let sent: usize = t.out().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 1280);
}

#[test]
fn lost_segments_are_resent_from_the_socket_on_timeout() {
    let mut t = T::new();
    let first = t.establish();
    let b = data(2000);
    t.sock().rx = b.clone();
    t.ready(true, false);
    assert_eq!(t.out().len(), 2);
    // Nothing acknowledged: after the RTO everything is resent, same bytes.
    t.advance(tcp::RTO_MIN);
    let out = t.out();
    assert_eq!(out[0].seq, first);
    let got: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(got, b);
    // Backoff: not again after one more RTO_MIN.
    t.advance(tcp::RTO_MIN);
    assert!(t.out().is_empty());
}

#[test]
fn three_duplicate_acks_resend_the_first_segment() {
    let mut t = T::new();
    let first = t.establish();
    t.sock().rx = data(1460 * 4);
    t.ready(true, false);
    assert_eq!(t.out().len(), 4);
    let dup = t.frame(TcpControl::None, GUEST_ISN + 1, Some(first + 1460), &[]);
    t.send(std::slice::from_ref(&dup));
    assert!(t.out().is_empty(), "a new ACK, not a duplicate");
    t.send(&[dup.clone(), dup.clone()]);
    assert!(t.out().is_empty());
    t.send(&[dup]);
    let out = t.out();
    assert_eq!(out.len(), 1, "fast retransmit: {out:?}");
    assert_eq!(out[0].seq, first + 1460);
    assert_eq!(out[0].payload.len(), 1460);
    // Partial ACK during recovery: the next hole goes at once.
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 1, Some(first + 2920), &[])]);
    let out = t.out();
    assert_eq!(out[0].seq, first + 2920);
}

#[test]
fn zero_window_is_probed_until_it_opens() {
    let mut t = T::new();
    let first = t.establish();
    t.send(&[t.frame_win(TcpControl::None, GUEST_ISN + 1, Some(first), &[], 0)]);
    t.sock().rx = data(100);
    t.ready(true, false);
    assert!(t.out().is_empty(), "nothing into a zero window");
    t.advance(tcp::RTO_MIN);
    let out = t.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].seq, first.wrapping_sub(1), "probe at snd_una - 1");
    assert!(out[0].payload.is_empty());
    // The guest answers with an open window: data flows.
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 1, Some(first), &[])]);
    let sent: usize = t.out().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, 100);
}

#[test]
fn guest_fin_then_host_eof_closes_cleanly() {
    let mut t = T::new();
    let first = t.establish();
    let flow = t.flow();
    t.send(&[t.frame(TcpControl::Fin, GUEST_ISN + 1, Some(first), b"bye")]);
    assert!(t.sock().shut, "shutdown(SHUT_WR) after the data");
    assert_eq!(t.sock().sent, b"bye");
    let out = t.out();
    assert_eq!(out[0].ack, Some(GUEST_ISN + 5), "data and FIN acknowledged");
    t.sock().rx = b"reply".to_vec();
    t.sock().eof = true;
    t.ready(true, false);
    let out = t.out();
    assert_eq!(out[0].payload, b"reply");
    assert_eq!(out[1].control, TcpControl::Fin);
    assert_eq!(out[1].seq, first + 5);
    assert!(!t.e.flows().is_empty(), "our FIN not yet acknowledged");
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 5, Some(first + 6), &[])]);
    assert!(t.e.flows().is_empty());
    assert_eq!(t.host.closed, vec![(flow, false)]);
}

#[test]
fn host_eof_first_then_guest_fin() {
    let mut t = T::new();
    let first = t.establish();
    t.sock().eof = true;
    t.ready(true, false);
    let out = t.out();
    assert_eq!(out[0].control, TcpControl::Fin);
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 1, Some(first + 1), &[])]);
    assert!(
        !t.e.flows().is_empty(),
        "half-closed: the guest may still send"
    );
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first + 1), b"more")]);
    assert_eq!(t.sock().sent, b"more");
    t.send(&[t.frame(TcpControl::Fin, GUEST_ISN + 5, Some(first + 1), &[])]);
    assert!(t.e.flows().is_empty());
}

#[test]
fn simultaneous_close() {
    let mut t = T::new();
    let first = t.establish();
    t.sock().eof = true;
    t.ready(true, false);
    assert_eq!(t.out()[0].control, TcpControl::Fin);
    // The guest's FIN crosses ours: it does not acknowledge our FIN yet.
    t.send(&[t.frame(TcpControl::Fin, GUEST_ISN + 1, Some(first), &[])]);
    assert!(!t.e.flows().is_empty());
    assert_eq!(t.out()[0].ack, Some(GUEST_ISN + 2));
    t.send(&[t.frame(TcpControl::None, GUEST_ISN + 2, Some(first + 1), &[])]);
    assert!(t.e.flows().is_empty());
}

#[test]
fn lost_fin_is_retransmitted() {
    let mut t = T::new();
    let first = t.establish();
    t.sock().eof = true;
    t.ready(true, false);
    assert_eq!(t.out()[0].control, TcpControl::Fin);
    t.advance(tcp::RTO_MIN);
    let out = t.out();
    assert_eq!(out[0].control, TcpControl::Fin);
    assert_eq!(out[0].seq, first);
}

#[test]
fn guest_rst_aborts_in_every_state() {
    // Connecting.
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    let flow = t.flow();
    t.send(&[t.frame(TcpControl::Rst, GUEST_ISN + 1, None, &[])]);
    assert!(t.e.flows().is_empty());
    assert_eq!(t.host.closed, vec![(flow, true)]);
    // SYN-ACK sent.
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    t.ready(false, true);
    t.send(&[t.frame(TcpControl::Rst, GUEST_ISN + 1, None, &[])]);
    assert!(t.e.flows().is_empty());
    // Established, and half-closed.
    for half_closed in [false, true] {
        let mut t = T::new();
        let first = t.establish();
        if half_closed {
            t.send(&[t.frame(TcpControl::Fin, GUEST_ISN + 1, Some(first), &[])]);
        }
        let seq = GUEST_ISN + 1 + u32::from(half_closed);
        // Out of window: ignored (RFC 5961).
        t.send(&[t.frame(TcpControl::Rst, seq + 1_000_000, None, &[])]);
        assert!(!t.e.flows().is_empty());
        t.send(&[t.frame(TcpControl::Rst, seq, None, &[])]);
        assert!(t.e.flows().is_empty());
        assert_eq!(t.host.closed.last().map(|c| c.1), Some(true));
    }
}

#[test]
fn host_reset_becomes_rst_to_guest() {
    let mut t = T::new();
    let first = t.establish();
    let flow = t.flow();
    t.e.handle_tcp_ready(t.now, flow, false, false, true, &mut t.host);
    let out = t.out();
    assert_eq!(out[0].control, TcpControl::Rst);
    assert_eq!(out[0].seq, first);
    assert!(t.e.flows().is_empty());
    // A write failure does the same.
    let mut t = T::new();
    let first = t.establish();
    t.sock().send_error = Some(libc::EPIPE);
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), b"x")]);
    assert_eq!(t.out()[0].control, TcpControl::Rst);
    assert!(t.e.flows().is_empty());
}

#[test]
fn unanswered_synack_gives_up_and_connect_timeout_resets() {
    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    t.ready(false, true);
    assert_eq!(t.out().len(), 1);
    t.advance(tcp::RTO_INITIAL);
    assert_eq!(t.out()[0].control, TcpControl::Syn, "SYN-ACK resent");
    for _ in 0..=tcp::MAX_RETRIES {
        t.advance(tcp::RTO_MAX);
    }
    assert!(t.e.flows().is_empty(), "gave up after MAX_RETRIES");

    let mut t = T::new();
    t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
    t.advance(tcp::CONNECT_TIMEOUT);
    assert_eq!(t.out()[0].control, TcpControl::Rst);
    assert!(t.e.flows().is_empty());
}

#[test]
fn idle_established_flow_is_reset_after_the_idle_timeout() {
    let mut t = T::new();
    t.establish();
    t.advance(tcp::IDLE_TIMEOUT - Duration::from_secs(1));
    assert!(!t.e.flows().is_empty());
    t.advance(Duration::from_secs(2));
    assert!(t.e.flows().is_empty());
    assert_eq!(t.out().last().map(|s| s.control), Some(TcpControl::Rst));
}

#[test]
fn drained_socket_reopens_the_window_on_the_recheck_timer() {
    let mut t = T::new();
    t.host.sndbuf = 3000;
    let first = t.establish();
    t.send(&[t.frame(TcpControl::Psh, GUEST_ISN + 1, Some(first), &data(2900))]);
    let out = t.out();
    assert_eq!(out[0].window, 0, "100 bytes free < 1 << 8");
    // The remote reads; a socket that never hit EAGAIN does not signal it.
    t.sock().drain_sent(2900);
    t.advance(tcp::WINDOW_RECHECK_MIN);
    let out = t.out();
    assert_eq!(out.len(), 1, "window update from the timer");
    assert_eq!(u32::from(out[0].window) << tcp::OUR_WINDOW_SHIFT, 2816);
}

#[test]
fn keepalive_probe_is_answered() {
    let mut t = T::new();
    let first = t.establish();
    t.send(&[t.frame(TcpControl::None, GUEST_ISN, Some(first), &[])]);
    let out = t.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ack, Some(GUEST_ISN + 1));
}

#[test]
fn gateway_is_mapped_to_loopback() {
    let mut t = T::with(Settings {
        policy: Policy {
            maps: vec![(
                "198.51.100.1".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            )],
            ..Policy::default()
        },
        ..Settings::default()
    });
    let repr = TcpRepr {
        src_port: 40000,
        dst_port: 8080,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1),
        ack_number: None,
        window_len: 100,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let mut frame = Vec::new();
    build::ipv4(
        &mut frame,
        (GUEST_MAC, DEFAULT_MAC),
        (GUEST.parse().unwrap(), "198.51.100.1".parse().unwrap()),
        64,
        &Payload::Tcp(repr),
    )
    .unwrap();
    t.send(&[frame]);
    let flow = t.flow();
    assert_eq!(
        t.host.tcp[&flow].target,
        Some("127.0.0.1:8080".parse().unwrap())
    );
    let f = t.e.flows().get(flow).unwrap();
    assert_eq!(f.initiator().addr, GUEST.parse::<IpAddr>().unwrap());
    assert_eq!(f.target().addr, "127.0.0.1".parse::<IpAddr>().unwrap());
}

#[test]
fn bulk_flows_take_turns() {
    let mut t = T::new();
    let first_a = t.establish();
    let turn = tcp::MAX_PUSH_SEGMENTS * 1460;
    // Flow A: a big window and more data than one turn.
    t.send(&[t.frame_win(TcpControl::None, GUEST_ISN + 1, Some(first_a), &[], 65535)]);
    t.sock().rx = data(3 * turn);
    t.ready(true, false);
    let sent: usize = t.out().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, turn, "one turn, then yield");
    // Flow B gets its turn before A's second one.
    t.port += 1;
    let first_b = t.establish();
    t.send(&[t.frame_win(TcpControl::None, GUEST_ISN + 1, Some(first_b), &[], 65535)]);
    let b = t.flow_for_port(t.port);
    t.host.tcp.get_mut(&b).unwrap().rx = data(turn / 2);
    t.e.handle_tcp_ready(t.now, b, true, false, false, &mut t.host);
    let ports: Vec<u16> = t.out_ports();
    assert!(ports.iter().all(|p| *p == t.port), "B's data: {ports:?}");
    assert!(
        t.e.poll_timeout().is_some_and(|d| d <= t.now),
        "A waits for a turn"
    );
    t.e.handle_timeout(t.now, &mut t.host);
    let sent: usize = t.out_any().iter().map(|s| s.payload.len()).sum();
    assert_eq!(sent, turn, "A's second turn");
}

fn syn_ack_from_guest(t: &T, seq: u32, ack: u32) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: t.port,
        dst_port: 80,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(seq.cast_signed()),
        ack_number: Some(TcpSeqNumber(ack.cast_signed())),
        window_len: 1000,
        window_scale: Some(7),
        max_seg_size: Some(1400),
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let mut out = Vec::new();
    build::ipv4(
        &mut out,
        (GUEST_MAC, DEFAULT_MAC),
        (GUEST.parse().unwrap(), REMOTE.parse().unwrap()),
        64,
        &Payload::Tcp(repr),
    )
    .unwrap();
    out
}

#[test]
fn inbound_connection_opens_toward_the_guest_from_the_client_address() {
    let mut t = T::new();
    // A client 203.0.113.1:80 connected to a forwarded port that maps to guest port 40000
    // (T's frames use guest port `t.port` and remote port 80).
    let client = format!("{REMOTE}:80").parse().unwrap();
    let flow =
        t.e.handle_inbound_tcp(t.now, t.port.into(), client, &mut t.host)
            .unwrap();
    let out = t.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].control, TcpControl::Syn);
    assert_eq!(out[0].ack, None);
    assert!(out[0].mss.is_some() && out[0].wscale.is_some());
    let iss = out[0].seq;
    // The host data the client already sent waits for the handshake.
    t.host.tcp.get_mut(&flow).unwrap().rx = b"GET /".to_vec();
    t.ready(true, false);
    assert!(t.out().is_empty());
    t.send(&[syn_ack_from_guest(&t, 5000, iss + 1)]);
    let out = t.out();
    assert_eq!(out[0].ack, Some(5001), "handshake completed");
    let data: Vec<u8> = out.iter().flat_map(|s| s.payload.clone()).collect();
    assert_eq!(data, b"GET /");
    assert_eq!(
        t.e.flows().get(flow).unwrap().initiator().addr,
        REMOTE.parse::<IpAddr>().unwrap()
    );
    // The guest answers; the client's socket gets it.
    t.send(&[t.frame(TcpControl::Psh, 5001, Some(iss + 6), b"200 OK")]);
    assert_eq!(t.host.tcp[&flow].sent, b"200 OK");
}

#[test]
fn inbound_clients_on_the_host_come_from_the_address_that_stands_for_it() {
    // The gateway (here: 203.0.113.1) maps to the host's loopback; 169.254.1.2 to the
    // address the guest shares with the host.
    let mut t = T::with(Settings {
        policy: Policy {
            maps: vec![
                ("169.254.1.2".parse().unwrap(), GUEST.parse().unwrap()),
                (REMOTE.parse().unwrap(), "127.0.0.1".parse().unwrap()),
            ],
            ..Policy::default()
        },
        ..Settings::default()
    });
    let from = |t: &mut T, client: &str| {
        let flow =
            t.e.handle_inbound_tcp(t.now, t.port.into(), client.parse().unwrap(), &mut t.host)?;
        Some(t.e.flows().get(flow)?.initiator().addr.to_string())
    };
    assert_eq!(from(&mut t, "127.0.0.1:80").as_deref(), Some(REMOTE));
    assert_eq!(
        from(&mut t, "[::ffff:127.0.0.9]:81").as_deref(),
        Some(REMOTE)
    );
    assert_eq!(
        from(&mut t, "198.51.100.2:80").as_deref(),
        Some("169.254.1.2")
    );
    assert_eq!(from(&mut t, "192.0.2.9:80").as_deref(), Some("192.0.2.9"));
    // Nothing stands for the host: refused, counted.
    let mut t = T::new();
    assert_eq!(from(&mut t, "127.0.0.1:80"), None);
    assert_eq!(t.e.stats().inbound_refused, 1);
}

#[test]
fn inbound_to_a_closed_guest_port_resets_the_client() {
    let mut t = T::new();
    let client = format!("{REMOTE}:80").parse().unwrap();
    let flow =
        t.e.handle_inbound_tcp(t.now, t.port.into(), client, &mut t.host)
            .unwrap();
    let iss = t.out()[0].seq;
    // An unrelated RST is ignored; the one acknowledging our SYN closes the port.
    t.send(&[t.frame(TcpControl::Rst, 0, None, &[])]);
    assert!(!t.e.flows().is_empty());
    let mut rst = t.frame(TcpControl::Rst, 0, Some(iss + 1), &[]);
    t.send(std::slice::from_mut(&mut rst));
    assert!(t.e.flows().is_empty());
    assert_eq!(t.host.closed, vec![(flow, true)], "client reset");
    // An unanswered SYN is retransmitted.
    let flow =
        t.e.handle_inbound_tcp(t.now, t.port.into(), client, &mut t.host)
            .unwrap();
    let _ = t.out();
    t.advance(tcp::RTO_INITIAL);
    assert_eq!(t.out()[0].control, TcpControl::Syn);
    assert!(t.e.flows().get(flow).is_some());
}

mod hostile {
    use proptest::prelude::*;

    use super::*;
    use tcp::MAX_OOO;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Arbitrary segments from the guest (any flags, sequence and acknowledgment
        /// numbers, windows and payload sizes) and arbitrary host events never panic, and
        /// the flow's state stays within its bounds.
        #[test]
        fn arbitrary_segments_and_events_never_panic(
            events in proptest::collection::vec(
                (0u8..8, any::<u32>(), any::<u32>(), any::<u16>(), 0usize..3000, any::<bool>()),
                1..60,
            )
        ) {
            let mut t = T::new();
            t.host.sndbuf = 4096;
            let first = t.establish();
            for (kind, seq, ack, window, len, relative) in events {
                let (seq, ack) = if relative {
                    (GUEST_ISN.wrapping_add(seq % 10_000), first.wrapping_add(ack % 10_000))
                } else {
                    (seq, ack)
                };
                let payload = data(len);
                match kind {
                    0 => t.send(&[t.frame_win(TcpControl::Psh, seq, Some(ack), &payload, window)]),
                    1 => t.send(&[t.frame_win(TcpControl::None, seq, Some(ack), &[], window)]),
                    2 => t.send(&[t.frame(TcpControl::Fin, seq, Some(ack), &payload)]),
                    3 => t.send(&[t.frame(TcpControl::Rst, seq, None, &[])]),
                    4 => t.send(&[t.frame(TcpControl::Syn, seq, None, &[])]),
                    5 => {
                        if !t.e.flows().is_empty() {
                            t.sock().rx.extend_from_slice(&payload);
                            t.sock().eof = len % 7 == 0;
                            t.ready(true, true);
                        }
                    }
                    6 => {
                        if !t.e.flows().is_empty() {
                            t.sock().drain_sent(len);
                        }
                        t.advance(Duration::from_millis(u64::from(window % 5000)));
                    }
                    _ => t.send(&[t.frame_win(TcpControl::None, seq, None, &payload, window)]),
                }
                let _ = t.out();
                for (_, f) in t.e.flows().iter() {
                    if let crate::engine::Detail::Tcp(c) = &f.ext {
                        prop_assert!(c.held_out_of_order() <= MAX_OOO);
                    }
                }
                prop_assert!(t.e.flows().len() <= 2);
            }
        }
    }
}

/// The engine's frames for three connections opened 7 ms apart, under `secret`.
fn handshake_trace(secret: [u8; 16]) -> Vec<Vec<u8>> {
    let mut t = T::with(Settings {
        iss_secret: secret,
        ..Settings::default()
    });
    let mut frames = Vec::new();
    for port in 40000..40003 {
        t.port = port;
        t.send(&[t.frame(TcpControl::Syn, GUEST_ISN, None, &[])]);
        t.ready(false, true);
        frames.extend(std::iter::from_fn(|| t.e.poll_transmit()));
        t.advance(Duration::from_millis(7));
    }
    frames
}

#[test]
fn same_seed_same_trace_and_the_seed_decides_the_iss() {
    let a = handshake_trace([7; 16]);
    assert_eq!(a.len(), 3, "one SYN-ACK per connection");
    assert_eq!(
        a,
        handshake_trace([7; 16]),
        "same seed and clock, same bytes"
    );
    let b = handshake_trace([8; 16]);
    assert_ne!(a, b, "another seed, other initial sequence numbers");
}

/// Data segments of `len` bytes from the guest, in order from sequence `seq`, MSS-sized.
fn segments(t: &T, seq: u32, ack: u32, all: &[u8]) -> Vec<Vec<u8>> {
    all.chunks(1460)
        .enumerate()
        .map(|(i, c)| {
            let at = seq.wrapping_add(u32::try_from(i * 1460).unwrap());
            t.frame(TcpControl::Psh, at, Some(ack), c)
        })
        .collect()
}

#[test]
fn bytes_inside_the_window_are_never_dropped_when_the_socket_shrinks() {
    let mut t = T::new();
    t.host.sndbuf = 256 << 10;
    let first = t.establish();
    let warmup = data(14_600);
    t.send(&segments(&t, GUEST_ISN + 1, first, &warmup));
    let ack = t.out().pop().expect("the batch's ACK");
    let window = usize::from(ack.window) << tcp::OUR_WINDOW_SHIFT;
    assert!(
        window > tcp::MAX_STASH * 2,
        "a window the stash alone could not cover"
    );
    // The socket takes less than it said: only 4 KiB of the window it offered.
    let queued = t.sock().queued;
    t.sock().sndbuf = queued + 4096;
    let rest = data(window);
    let seq = GUEST_ISN + 1 + u32::try_from(warmup.len()).unwrap();
    t.send(&segments(&t, seq, first, &rest));
    let acked = t.out().iter().filter_map(|s| s.ack).next_back();
    let end = seq.wrapping_add(u32::try_from(window).unwrap());
    assert_eq!(
        acked,
        Some(end),
        "every byte inside the window is acknowledged"
    );
    assert_eq!(t.e.stats().tcp_in_window_dropped, 0);
    // It drains and grows again: what the stash held reaches the host in order.
    let sent = t.sock().sent.len();
    t.sock().drain_sent(sent);
    t.sock().sndbuf = 1 << 30;
    t.ready(false, true);
    let mut want = warmup.clone();
    want.extend_from_slice(&rest);
    assert_eq!(t.sock().sent, want, "in order, nothing lost");
    assert!(t.out().iter().any(|s| s.window > 0), "the window reopens");
}

#[test]
fn a_closed_window_reopens_a_millisecond_after_the_socket_drains() {
    let mut t = T::new();
    t.host.sndbuf = 65_536;
    let first = t.establish();
    // The SYN-ACK offered 65535 bytes (unscaled): the guest fills it, the socket is full.
    let fill = data(65_535);
    t.send(&segments(&t, GUEST_ISN + 1, first, &fill));
    let ack = t.out().pop().expect("the batch's ACK");
    assert_eq!(ack.window, 0, "nothing more fits");
    assert_eq!(t.e.stats().tcp_zero_windows, 1);
    t.sock().drain_sent(65_535);
    t.advance(tcp::WINDOW_RECHECK_MIN);
    let update = t.out();
    assert_eq!(update.len(), 1, "one window update");
    assert!(update[0].window > 0);
    assert_eq!(t.e.stats().tcp_window_updates, 1);
    assert_eq!(t.e.stats().tcp_in_window_dropped, 0);
}
