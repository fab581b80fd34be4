//! Engine scenarios: frames in, frames and host operations out, with a manual clock.
//! The requests are real frames captured from the kernel and DHCP clients (`wire/testdata`).

mod tcp;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::fake::{Echo, FakeHost};
use super::*;
use crate::plan::testing::network;
use crate::services::Switches;
use crate::wire::build;
use crate::wire::{ArpOperation, ArpRepr, DropReason, Frame, Icmpv4Repr};

const ARP_REQUEST: &[u8] = include_bytes!("../../wire/testdata/arp_request.bin");
const DHCP4_DISCOVER: &[u8] = include_bytes!("../../wire/testdata/dhcp4_discover.bin");
const DHCP6_SOLICIT: &[u8] = include_bytes!("../../wire/testdata/dhcp6_solicit.bin");
const DHCP6_INFO: &[u8] = include_bytes!("../../wire/testdata/dhcp6_info_request.bin");
const NDP_RS: &[u8] = include_bytes!("../../wire/testdata/ndp_rs.bin");
const MLD: &[u8] = include_bytes!("../../wire/testdata/mld_report_hbh.bin");

const GUEST_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0x0a]);

fn engine(t0: Instant) -> Engine {
    // Most tests do not want the start-up RA in their output.
    Engine::new(
        network(),
        Switches {
            ra: false,
            ..Switches::default()
        },
        Settings {
            max_flows: 16,
            ..Settings::default()
        },
        t0,
    )
}

fn drain(e: &mut Engine) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| e.poll_transmit()).collect()
}

/// What the engine asked `host` to do with echo sockets, in order; `host` forgets it.
fn ops(host: &mut FakeHost) -> Vec<Echo> {
    std::mem::take(&mut host.echo)
}

/// An ARP request from the guest for `target` (the captured request is for 198.51.100.1).
fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: "198.51.100.2".parse().unwrap(),
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    build::arp(&mut out, GUEST_MAC, EthernetAddress::BROADCAST, &repr);
    out
}

fn echo4(dst: Ipv4Addr, ident: u16, seq_no: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let repr = Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data: b"abcdefgh",
    };
    build::ipv4(
        &mut out,
        (GUEST_MAC, crate::plan::DEFAULT_MAC),
        ("198.51.100.2".parse().unwrap(), dst),
        64,
        &Payload::Icmpv4(repr),
    )
    .unwrap();
    out
}

fn echo6(dst: Ipv6Addr, ident: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let repr = Icmpv6Repr::EchoRequest {
        ident,
        seq_no: 1,
        data: b"v6",
    };
    build::ipv6(
        &mut out,
        (GUEST_MAC, crate::plan::DEFAULT_MAC),
        ("2001:db8:1::2".parse().unwrap(), dst),
        64,
        &Payload::Icmpv6 { repr, options: &[] },
    )
    .unwrap();
    out
}

#[test]
fn captured_arp_request_for_gateway_gets_reply_from_our_mac() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    // The capture asks for 198.51.100.1 from 198.51.100.10: in this plan that is "any other
    // address", answered all the same.
    e.handle_frame(t0, ARP_REQUEST, &mut FakeHost::new());
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let frame = wire::parse(&out[0]).unwrap();
    assert_eq!(frame.eth.dst_addr, GUEST_MAC);
    let L3::Arp(ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        ..
    }) = frame.l3
    else {
        panic!()
    };
    assert_eq!(operation, ArpOperation::Reply);
    assert_eq!(source_hardware_addr, crate::plan::DEFAULT_MAC);
    assert_eq!(source_protocol_addr, Ipv4Addr::new(198, 51, 100, 1));
    assert_eq!(e.stats().arp_replies, 1);
}

#[test]
fn arp_for_guest_itself_is_ignored_and_counted() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    e.handle_frame(
        t0,
        &arp_request("198.51.100.2".parse().unwrap()),
        &mut FakeHost::new(),
    );
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().ignored, 1);
}

#[test]
fn captured_udhcpc_discover_gets_offer() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    e.handle_frame(t0, DHCP4_DISCOVER, &mut FakeHost::new());
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let frame = wire::parse(&out[0]).unwrap();
    let L3::Ipv4 {
        ip,
        l4: L4::Udp { udp, payload },
    } = frame.l3
    else {
        panic!()
    };
    assert_eq!((udp.src_port, udp.dst_port), (67, 68));
    assert_eq!(ip.src_addr, Ipv4Addr::new(198, 51, 100, 1));
    let (kind, yiaddr) = wire::dhcp::with_v4(payload, |r| (r.message_type, r.your_ip)).unwrap();
    assert_eq!(kind, wire::dhcp::DhcpMessageType::Offer);
    assert_eq!(yiaddr, Ipv4Addr::new(198, 51, 100, 2));
}

#[test]
fn captured_dhclient6_solicit_and_info_request_get_replies() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    e.handle_frame(t0, DHCP6_SOLICIT, &mut FakeHost::new());
    e.handle_frame(t0, DHCP6_INFO, &mut FakeHost::new());
    let out = drain(&mut e);
    assert_eq!(out.len(), 2);
    let kinds: Vec<_> = out
        .iter()
        .map(|f| {
            let frame = wire::parse(f).unwrap();
            let L3::Ipv6 {
                ip,
                l4: L4::Udp { udp, payload },
            } = frame.l3
            else {
                panic!()
            };
            assert_eq!((udp.src_port, udp.dst_port), (547, 546));
            assert_eq!(ip.src_addr, network().ipv6.unwrap().router_ll);
            assert_eq!(ip.dst_addr, "fe80::ff:fe00:a".parse::<Ipv6Addr>().unwrap());
            wire::dhcp::decode_v6(payload).unwrap().msg_type()
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            wire::dhcp::v6::MessageType::Advertise,
            wire::dhcp::v6::MessageType::Reply
        ]
    );
}

#[test]
fn captured_router_solicit_gets_ra_with_rdnss() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    e.services = Switches::default();
    e.handle_frame(t0, NDP_RS, &mut FakeHost::new());
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    let frame = wire::parse(&out[0]).unwrap();
    assert_eq!(
        frame.eth.dst_addr,
        EthernetAddress([0x33, 0x33, 0, 0, 0, 1])
    );
    let L3::Ipv6 {
        ip,
        l4: L4::Icmpv6(Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert { prefix_info, .. })),
    } = frame.l3
    else {
        panic!("not an RA: {frame:?}")
    };
    assert_eq!(ip.hop_limit, 255);
    assert_eq!(
        prefix_info.unwrap().prefix,
        "2001:db8:1::".parse::<Ipv6Addr>().unwrap()
    );
    // The RDNSS option follows the options smoltcp emitted; the checksum covered it (parse
    // verified it), and it carries the planned server.
    let dns = "2001:db8:1::53".parse::<Ipv6Addr>().unwrap().octets();
    assert!(out[0].windows(16).any(|w| w == dns));
}

#[test]
fn unsolicited_ras_follow_the_schedule() {
    let t0 = Instant::now();
    let mut e = Engine::new(network(), Switches::default(), Settings::default(), t0);
    assert_eq!(e.poll_timeout(), Some(t0));
    e.handle_timeout(t0, &mut FakeHost::new());
    assert_eq!(drain(&mut e).len(), 1);
    assert_eq!(e.poll_timeout(), Some(t0 + RA_SCHEDULE[1]));
    e.handle_timeout(t0 + Duration::from_secs(1), &mut FakeHost::new());
    assert!(drain(&mut e).is_empty(), "RA sent before it was due");
    e.handle_timeout(t0 + RA_SCHEDULE[1], &mut FakeHost::new());
    assert_eq!(drain(&mut e).len(), 1);
    assert_eq!(e.stats().router_adverts, 2);
}

#[test]
fn echo_to_gateway_is_answered_locally() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let mut host = FakeHost::new();
    e.handle_frame(t0, &echo4("198.51.100.1".parse().unwrap(), 7, 3), &mut host);
    e.handle_frame(t0, &echo6(network().ipv6.unwrap().router_ll, 8), &mut host);
    let out = drain(&mut e);
    assert_eq!(out.len(), 2);
    let frame = wire::parse(&out[0]).unwrap();
    let L3::Ipv4 {
        ip,
        l4:
            L4::Icmpv4(Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 3,
                data,
            }),
    } = frame.l3
    else {
        panic!()
    };
    assert_eq!(ip.src_addr, Ipv4Addr::new(198, 51, 100, 1));
    assert_eq!(data, b"abcdefgh");
    assert!(ops(&mut host).is_empty());
    assert_eq!(e.stats().echo_local, 2);
}

#[test]
fn echo_elsewhere_opens_a_flow_and_relays_the_reply_with_guest_ident() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let remote: Ipv4Addr = "203.0.113.1".parse().unwrap();
    let mut host = FakeHost::new();
    e.handle_frame(t0, &echo4(remote, 0x4242, 1), &mut host);
    e.handle_frame(t0, &echo4(remote, 0x4242, 2), &mut host);
    assert!(
        drain(&mut e).is_empty(),
        "must not answer a forwarded echo itself"
    );
    let ops = ops(&mut host);
    let Echo::Open { flow, remote: r } = ops[0].clone() else {
        panic!("{ops:?}")
    };
    assert_eq!(r, IpAddr::V4(remote));
    assert_eq!(
        ops[1],
        Echo::Send {
            flow,
            seq: 1,
            data: b"abcdefgh".to_vec()
        }
    );
    assert_eq!(
        ops[2],
        Echo::Send {
            flow,
            seq: 2,
            data: b"abcdefgh".to_vec()
        }
    );
    assert_eq!(ops.len(), 3, "one flow for both requests");

    e.handle_echo_reply(t0, flow, 1, b"abcdefgh");
    let out = drain(&mut e);
    let frame = wire::parse(&out[0]).unwrap();
    assert_eq!(frame.eth.dst_addr, GUEST_MAC);
    let L3::Ipv4 {
        ip,
        l4: L4::Icmpv4(Icmpv4Repr::EchoReply { ident, seq_no, .. }),
    } = frame.l3
    else {
        panic!()
    };
    assert_eq!(
        (ip.src_addr, ip.dst_addr),
        (remote, Ipv4Addr::new(198, 51, 100, 2))
    );
    assert_eq!((ident, seq_no), (0x4242, 1));
}

#[test]
fn a_ping_socket_that_cannot_open_removes_its_flow() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let mut host = FakeHost::new();
    host.echo_open_error = Some(libc::EACCES);
    e.handle_frame(t0, &echo4("203.0.113.1".parse().unwrap(), 5, 1), &mut host);
    assert!(e.flows().is_empty(), "no flow without its socket");
    assert!(ops(&mut host).is_empty(), "nothing sent");
    assert_eq!(e.stats().host_errors, 1);
    // The next request tries again.
    e.handle_frame(t0, &echo4("203.0.113.1".parse().unwrap(), 5, 2), &mut host);
    assert_eq!(ops(&mut host).len(), 2, "open, send");
}

#[test]
fn idle_echo_flow_is_closed_and_late_replies_are_stale() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let mut host = FakeHost::new();
    e.handle_frame(t0, &echo6("2001:db8:2::1".parse().unwrap(), 9), &mut host);
    let Echo::Open { flow, .. } = ops(&mut host)[0].clone() else {
        panic!()
    };
    let mut now = t0;
    while let Some(due) = e.poll_timeout() {
        assert!(
            due <= t0 + flow::ICMP_IDLE,
            "flow outlived its idle timeout"
        );
        now = due;
        e.handle_timeout(now, &mut host);
    }
    assert!(ops(&mut host).is_empty());
    assert_eq!(host.closed, vec![(flow, false)]);
    assert!(e.flows().is_empty());
    assert_eq!(e.poll_timeout(), None, "no timer once the table is empty");
    e.handle_echo_reply(now, flow, 1, b"late");
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().stale_host_events, 1);
}

#[test]
fn full_table_refuses_new_echo_flows() {
    let t0 = Instant::now();
    let mut e = Engine::new(
        network(),
        Switches {
            ra: false,
            ..Switches::default()
        },
        Settings {
            max_flows: 2,
            ..Settings::default()
        },
        t0,
    );
    for ident in 0..3 {
        e.handle_frame(
            t0,
            &echo4("203.0.113.1".parse().unwrap(), ident, 1),
            &mut FakeHost::new(),
        );
    }
    assert_eq!(e.flows().len(), 2);
    assert_eq!(e.stats().flow_table_full, 1);
}

#[test]
fn ping_sockets_forbidden_means_local_answers_counted_as_fallback() {
    let t0 = Instant::now();
    let mut e = Engine::new(
        network(),
        Switches {
            ra: false,
            echo_local_only: true,
            ..Switches::default()
        },
        Settings {
            max_flows: 16,
            ..Settings::default()
        },
        t0,
    );
    let mut host = FakeHost::new();
    e.handle_frame(t0, &echo4("203.0.113.1".parse().unwrap(), 1, 1), &mut host);
    assert_eq!(drain(&mut e).len(), 1);
    assert!(ops(&mut host).is_empty());
    assert_eq!(e.stats().echo_local_fallback, 1);
}

#[test]
fn disabled_services_stay_silent() {
    let t0 = Instant::now();
    let off = Switches {
        arp: false,
        ndp: false,
        ra: false,
        dhcp: false,
        dhcpv6: false,
        icmp: false,
        echo_local_only: false,
        tcp: false,
        udp: false,
    };
    let mut e = Engine::new(network(), off, Settings::default(), t0);
    for frame in [
        &arp_request("198.51.100.1".parse().unwrap())[..],
        DHCP4_DISCOVER,
        DHCP6_SOLICIT,
        NDP_RS,
        &echo4("198.51.100.1".parse().unwrap(), 1, 1),
    ] {
        e.handle_frame(t0, frame, &mut FakeHost::new());
    }
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.poll_timeout(), None);
}

#[test]
fn malformed_frames_are_counted_and_service_continues() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let good = echo4("198.51.100.1".parse().unwrap(), 1, 1);
    let mut bad_sum = good.clone();
    bad_sum[24] ^= 0xff;
    let mut unknown = good.clone();
    unknown[12..14].copy_from_slice(&[0x88, 0xb5]);
    for frame in [&good[..10], &bad_sum[..], &unknown[..], &[][..], MLD] {
        e.handle_frame(t0, frame, &mut FakeHost::new());
    }
    e.handle_frame(t0, &good, &mut FakeHost::new());
    assert_eq!(
        drain(&mut e).len(),
        1,
        "the good frame after the bad ones is still answered"
    );
    let s = e.stats();
    assert_eq!(s.drops(DropReason::Truncated), 2);
    assert_eq!(s.drops(DropReason::BadChecksum), 1);
    assert_eq!(s.drops(DropReason::UnknownEthertype), 1);
    assert_eq!(s.ignored, 1, "MLD report is well-formed but unhandled");
    assert_eq!(s.frames_in, 6);
}

#[test]
fn garbage_dhcp_payloads_are_counted() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let mut out = Vec::new();
    build::ipv4(
        &mut out,
        (GUEST_MAC, EthernetAddress::BROADCAST),
        (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
        64,
        &Payload::Udp {
            src_port: 68,
            dst_port: 67,
            data: b"not dhcp",
        },
    )
    .unwrap();
    e.handle_frame(t0, &out, &mut FakeHost::new());
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.stats().bad_dhcp, 1);
}

#[test]
fn tx_queue_is_bounded() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    let frame = echo4("198.51.100.1".parse().unwrap(), 1, 1);
    for _ in 0..frames::MAX_QUEUED + 10 {
        e.handle_frame(t0, &frame, &mut FakeHost::new());
    }
    assert_eq!(e.stats().tx_queue_full, 10);
    assert_eq!(drain(&mut e).len(), frames::MAX_QUEUED);
}

#[test]
fn stats_summary_names_drops() {
    let t0 = Instant::now();
    let mut e = engine(t0);
    e.handle_frame(t0, &[0u8; 5], &mut FakeHost::new());
    let summary = e.stats().summary();
    assert!(summary.contains("drop_truncated=1"), "{summary}");
    assert!(summary.contains("frames_in=1"), "{summary}");
    let _: Option<Frame<'_>> = None;
}
