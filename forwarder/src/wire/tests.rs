//! Packet-layer tests.
//!
//! The frames under `testdata/` were captured with tcpdump from the kernel's own stack and
//! real clients (ping, nc, busybox udhcpc, ISC dhclient -6) in a throwaway pair of
//! namespaces; see `docs/testing.md` for the capture script.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use smoltcp::phy::ChecksumCapabilities;

use super::build::{self, Payload};
use super::*;

const ARP_REQUEST: &[u8] = include_bytes!("testdata/arp_request.bin");
const ARP_REPLY: &[u8] = include_bytes!("testdata/arp_reply.bin");
const ICMP4_ECHO: &[u8] = include_bytes!("testdata/icmp4_echo_request.bin");
const ICMP4_UNREACH: &[u8] = include_bytes!("testdata/icmp4_port_unreachable.bin");
const NDP_NS: &[u8] = include_bytes!("testdata/ndp_ns.bin");
const NDP_NA: &[u8] = include_bytes!("testdata/ndp_na.bin");
const NDP_RS: &[u8] = include_bytes!("testdata/ndp_rs.bin");
const ICMP6_ECHO: &[u8] = include_bytes!("testdata/icmp6_echo_request.bin");
const MLD_HBH: &[u8] = include_bytes!("testdata/mld_report_hbh.bin");
const TCP_SYN: &[u8] = include_bytes!("testdata/tcp_syn.bin");
const TCP_SYNACK: &[u8] = include_bytes!("testdata/tcp_synack.bin");
const UDP4: &[u8] = include_bytes!("testdata/udp4.bin");
const DHCP4_DISCOVER: &[u8] = include_bytes!("testdata/dhcp4_discover.bin");
const DHCP6_SOLICIT: &[u8] = include_bytes!("testdata/dhcp6_solicit.bin");
const DHCP6_INFO: &[u8] = include_bytes!("testdata/dhcp6_info_request.bin");

const ALL: &[(&str, &[u8])] = &[
    ("arp_request", ARP_REQUEST),
    ("arp_reply", ARP_REPLY),
    ("icmp4_echo", ICMP4_ECHO),
    ("icmp4_unreach", ICMP4_UNREACH),
    ("ndp_ns", NDP_NS),
    ("ndp_na", NDP_NA),
    ("ndp_rs", NDP_RS),
    ("icmp6_echo", ICMP6_ECHO),
    ("mld_hbh", MLD_HBH),
    ("tcp_syn", TCP_SYN),
    ("tcp_synack", TCP_SYNACK),
    ("udp4", UDP4),
    ("dhcp4_discover", DHCP4_DISCOVER),
    ("dhcp6_solicit", DHCP6_SOLICIT),
    ("dhcp6_info", DHCP6_INFO),
];

fn mac(last: u8) -> EthernetAddress {
    EthernetAddress([2, 0, 0, 0, 0, last])
}

#[test]
fn every_capture_parses() {
    for (name, bytes) in ALL {
        assert!(
            parse(bytes).is_ok(),
            "{name} did not parse: {:?}",
            parse(bytes)
        );
    }
}

#[test]
fn every_truncated_prefix_is_rejected() {
    for (name, bytes) in ALL {
        for n in 0..bytes.len() {
            assert!(
                parse(&bytes[..n]).is_err(),
                "{name} truncated to {n} bytes was accepted"
            );
        }
    }
}

#[test]
fn single_bit_flips_never_panic() {
    // Every single-bit corruption of every capture: parse must return, never panic. Most
    // flips land in checksummed bytes and must be rejected as such.
    let mut rejected = 0usize;
    let mut total = 0usize;
    for (_, bytes) in ALL {
        let mut copy = bytes.to_vec();
        for i in 0..copy.len() * 8 {
            copy[i / 8] ^= 1 << (i % 8);
            total += 1;
            if parse(&copy).is_err() {
                rejected += 1;
            }
            copy[i / 8] ^= 1 << (i % 8);
        }
    }
    assert!(
        rejected * 2 > total,
        "only {rejected} of {total} corruptions rejected"
    );
}

#[test]
fn bad_checksums_are_reported_as_such() {
    // Byte 24 of an IPv4 frame is the header checksum, byte 36 the ICMP checksum.
    let mut copy = ICMP4_ECHO.to_vec();
    copy[24] ^= 0xff;
    assert_eq!(parse(&copy), Err(DropReason::BadChecksum));
    let mut copy = ICMP4_ECHO.to_vec();
    copy[36] ^= 0xff;
    assert_eq!(parse(&copy), Err(DropReason::BadChecksum));
    let mut copy = UDP4.to_vec();
    let last = copy.len() - 1;
    copy[last] ^= 0x01;
    assert_eq!(parse(&copy), Err(DropReason::BadChecksum));
}

#[test]
fn unknown_ethertype_and_bad_lengths() {
    let mut copy = ARP_REQUEST.to_vec();
    copy[12..14].copy_from_slice(&[0x88, 0xcc]); // LLDP
    assert_eq!(parse(&copy), Err(DropReason::UnknownEthertype));
    // IPv4 total length larger than the frame.
    let mut copy = ICMP4_ECHO.to_vec();
    copy[16..18].copy_from_slice(&0x0fffu16.to_be_bytes());
    assert!(parse(&copy).is_err());
}

#[test]
fn arp_rebuilt_byte_for_byte() {
    for bytes in [ARP_REQUEST, ARP_REPLY] {
        let frame = parse(bytes).unwrap();
        let L3::Arp(arp) = frame.l3 else {
            panic!("not ARP")
        };
        let mut out = Vec::new();
        build::arp(&mut out, frame.eth.src_addr, frame.eth.dst_addr, &arp);
        assert_eq!(out, bytes);
    }
}

#[test]
fn arp_request_fields() {
    let frame = parse(ARP_REQUEST).unwrap();
    let L3::Arp(ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    }) = frame.l3
    else {
        panic!("not ARP")
    };
    assert_eq!(operation, ArpOperation::Request);
    assert_eq!(source_hardware_addr, mac(0x0a));
    assert_eq!(source_protocol_addr, Ipv4Addr::new(198, 51, 100, 10));
    assert_eq!(target_protocol_addr, Ipv4Addr::new(198, 51, 100, 1));
}

/// Rebuilds an IPv4 frame from its parse, keeping the header fields smoltcp's `Ipv4Repr`
/// does not model (identification, DF) from the original, and compares every byte.
fn rebuild_ipv4(bytes: &[u8]) -> Vec<u8> {
    let frame = parse(bytes).unwrap();
    let L3::Ipv4 { ip, l4 } = &frame.l3 else {
        panic!("not IPv4")
    };
    let mut out = Vec::new();
    let payload = match l4 {
        L4::Icmpv4(repr) => Payload::Icmpv4(*repr),
        L4::Udp { udp, payload } => Payload::Udp {
            src_port: udp.src_port,
            dst_port: udp.dst_port,
            data: payload,
        },
        other => panic!("cannot rebuild {other:?}"),
    };
    build::ipv4(
        &mut out,
        (frame.eth.src_addr, frame.eth.dst_addr),
        (ip.src_addr, ip.dst_addr),
        ip.hop_limit,
        &payload,
    )
    .unwrap();
    let original = Ipv4Packet::new_checked(&bytes[14..]).unwrap();
    let mut packet = Ipv4Packet::new_unchecked(&mut out[14..]);
    packet.set_ident(original.ident());
    packet.set_dont_frag(original.dont_frag());
    packet.fill_checksum();
    out
}

#[test]
fn icmpv4_and_udp_rebuilt_byte_for_byte() {
    for bytes in [ICMP4_ECHO, UDP4, DHCP4_DISCOVER] {
        assert_eq!(rebuild_ipv4(bytes), bytes);
    }
}

#[test]
fn icmpv6_rebuilt_byte_for_byte() {
    for bytes in [NDP_NS, NDP_NA, NDP_RS, ICMP6_ECHO] {
        let frame = parse(bytes).unwrap();
        let L3::Ipv6 {
            ip,
            l4: L4::Icmpv6(repr),
        } = &frame.l3
        else {
            panic!("not ICMPv6")
        };
        let mut out = Vec::new();
        build::ipv6(
            &mut out,
            (frame.eth.src_addr, frame.eth.dst_addr),
            (ip.src_addr, ip.dst_addr),
            ip.hop_limit,
            &Payload::Icmpv6 {
                repr: *repr,
                options: &[],
            },
        )
        .unwrap();
        // Traffic class and flow label are not in smoltcp's Ipv6Repr: take them from the
        // capture (the kernel sets a flow label on echo requests).
        out[14..18].copy_from_slice(&bytes[14..18]);
        assert_eq!(out, bytes);
    }
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let frame = parse(MLD_HBH).unwrap();
    let L3::Ipv6 { ip, l4 } = frame.l3 else {
        panic!("not IPv6")
    };
    assert_eq!(ip.next_header, IpProtocol::Icmpv6);
    // MLDv2 report (type 143) is passed up as an ICMPv6 type this layer does not model.
    assert!(matches!(
        l4,
        L4::Other {
            protocol: IpProtocol::Icmpv6,
            icmp_type: 143,
            ..
        }
    ));
}

#[test]
fn ipv6_extension_header_chain_is_bounded() {
    // An IPv6 packet with 9 empty destination-options headers, then no next header.
    let mut ext = Vec::new();
    for _ in 0..9 {
        ext.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    ext[8 * 8] = 59;
    let mut frame = vec![0u8; 14 + 40];
    frame[12..14].copy_from_slice(&[0x86, 0xdd]);
    frame[14] = 0x60;
    frame[18..20].copy_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
    frame[20] = 60;
    frame[21] = 64;
    frame.extend_from_slice(&ext);
    assert_eq!(parse(&frame), Err(DropReason::TooManyExtHeaders));
}

#[test]
fn tcp_syn_options_parsed_and_reemitted() {
    let frame = parse(TCP_SYN).unwrap();
    let L3::Ipv4 {
        ip,
        l4: L4::Tcp(tcp),
    } = frame.l3
    else {
        panic!("not TCP")
    };
    assert_eq!(tcp.control, TcpControl::Syn);
    assert_eq!(tcp.dst_port, 8080);
    assert_eq!(tcp.max_seg_size, Some(1460));
    assert!(tcp.sack_permitted);
    assert_eq!(tcp.window_scale, Some(10));
    assert!(tcp.timestamp.is_some());
    // smoltcp emits options in a different order than Linux (MSS, WS, SACK-perm, TS vs MSS,
    // SACK-perm, TS, WS), so the segment is compared field for field after a round trip,
    // and the fixed header byte for byte.
    let (src, dst) = (IpAddress::Ipv4(ip.src_addr), IpAddress::Ipv4(ip.dst_addr));
    let mut buf = vec![0u8; tcp.buffer_len()];
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[..]),
        &src,
        &dst,
        &ChecksumCapabilities::default(),
    );
    let reparsed = TcpRepr::parse(
        &TcpPacket::new_checked(&buf[..]).unwrap(),
        &src,
        &dst,
        &ChecksumCapabilities::default(),
    )
    .unwrap();
    assert_eq!(reparsed, tcp);
    assert_eq!(buf[..16], TCP_SYN[34..50]);
}

#[test]
fn dhcp4_discover_decodes_and_reencodes() {
    let frame = parse(DHCP4_DISCOVER).unwrap();
    let L3::Ipv4 {
        l4: L4::Udp { udp, payload },
        ..
    } = frame.l3
    else {
        panic!("not UDP")
    };
    assert_eq!(
        (udp.src_port, udp.dst_port),
        (dhcp::DHCP4_CLIENT_PORT, dhcp::DHCP4_SERVER_PORT)
    );
    let (msg_type, chaddr, out) = dhcp::with_v4(payload, |repr| {
        let mut out = Vec::new();
        dhcp::encode_v4(repr, &mut out).unwrap();
        (repr.message_type, repr.client_hardware_address, out)
    })
    .unwrap();
    assert_eq!(msg_type, dhcp::DhcpMessageType::Discover);
    assert_eq!(chaddr, mac(0x0a));
    // udhcpc pads the options area to 300 bytes and orders options its own way; smoltcp
    // emits no padding. The fixed BOOTP part (236 bytes + magic cookie) is identical, and the
    // re-encoded message decodes to the same representation.
    assert_eq!(out[..240], payload[..240]);
    let again = dhcp::with_v4(&out, |r| {
        (
            r.message_type,
            r.transaction_id,
            r.client_hardware_address,
            r.parameter_request_list.map(<[u8]>::to_vec),
        )
    })
    .unwrap();
    let first = dhcp::with_v4(payload, |r| {
        (
            r.message_type,
            r.transaction_id,
            r.client_hardware_address,
            r.parameter_request_list.map(<[u8]>::to_vec),
        )
    })
    .unwrap();
    assert_eq!(again, first);
}

#[test]
fn dhcp6_messages_decode_and_reencode() {
    for (bytes, kind) in [
        (DHCP6_SOLICIT, dhcp::v6::MessageType::Solicit),
        (DHCP6_INFO, dhcp::v6::MessageType::InformationRequest),
    ] {
        let frame = parse(bytes).unwrap();
        let L3::Ipv6 {
            l4: L4::Udp { payload, .. },
            ..
        } = frame.l3
        else {
            panic!("not UDP")
        };
        let msg = dhcp::decode_v6(payload).unwrap();
        assert_eq!(msg.msg_type(), kind);
        let mut out = Vec::new();
        dhcp::encode_v6(&msg, &mut out).unwrap();
        // dhcproto keeps options sorted by code (dhclient sends IA_NA before ORO), so the
        // bytes are a permutation of the option TLVs: same length, same decoded message.
        assert_eq!(out.len(), payload.len());
        assert_eq!(out[..4], payload[..4]);
        assert_eq!(dhcp::decode_v6(&out).unwrap(), msg);
    }
}

#[test]
fn rdnss_option_layout() {
    let mut out = Vec::new();
    build::rdnss_option(&mut out, 600, &["2001:db8::53".parse().unwrap()]);
    assert_eq!(out.len(), 24);
    assert_eq!(&out[..8], &[25, 3, 0, 0, 0, 0, 2, 0x58]);
}

fn decode_dhcp_if_udp(bytes: &[u8]) {
    let Ok(Frame {
        l3:
            L3::Ipv4 {
                l4: L4::Udp { payload, .. },
                ..
            }
            | L3::Ipv6 {
                l4: L4::Udp { payload, .. },
                ..
            },
        ..
    }) = parse(bytes)
    else {
        return;
    };
    let _ = dhcp::with_v4(payload, |r| r.transaction_id);
    let _ = dhcp::decode_v6(payload);
}

fn arb_mac() -> impl Strategy<Value = EthernetAddress> {
    any::<[u8; 6]>().prop_map(|mut b| {
        b[0] &= 0xfe; // unicast
        EthernetAddress(b)
    })
}

fn arb_v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn arb_v6() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

proptest! {
    #[test]
    fn arp_roundtrip(src in arb_mac(), dst in arb_mac(), sp in arb_v4(), tp in arb_v4(), reply in any::<bool>()) {
        let repr = ArpRepr::EthernetIpv4 {
            operation: if reply { ArpOperation::Reply } else { ArpOperation::Request },
            source_hardware_addr: src, source_protocol_addr: sp,
            target_hardware_addr: dst, target_protocol_addr: tp,
        };
        let mut out = Vec::new();
        build::arp(&mut out, src, dst, &repr);
        let frame = parse(&out).unwrap();
        prop_assert_eq!(frame.l3, L3::Arp(repr));
    }

    #[test]
    fn udp4_roundtrip(macs in (arb_mac(), arb_mac()), src in arb_v4(), dst in arb_v4(),
                      sport in any::<u16>(), dport in 1..=u16::MAX, ttl in any::<u8>(),
                      data in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut out = Vec::new();
        build::ipv4(&mut out, macs, (src, dst), ttl, &Payload::Udp { src_port: sport, dst_port: dport, data: &data }).unwrap();
        let frame = parse(&out).unwrap();
        let L3::Ipv4 { ip, l4: L4::Udp { udp, payload } } = frame.l3 else { panic!("not UDP") };
        prop_assert_eq!((ip.src_addr, ip.dst_addr, ip.hop_limit), (src, dst, ttl));
        prop_assert_eq!((udp.src_port, udp.dst_port), (sport, dport));
        prop_assert_eq!(payload, &data[..]);
    }

    #[test]
    fn udp6_roundtrip(macs in (arb_mac(), arb_mac()), src in arb_v6(), dst in arb_v6(),
                      sport in any::<u16>(), dport in 1..=u16::MAX,
                      data in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut out = Vec::new();
        build::ipv6(&mut out, macs, (src, dst), 64, &Payload::Udp { src_port: sport, dst_port: dport, data: &data }).unwrap();
        let frame = parse(&out).unwrap();
        let L3::Ipv6 { ip, l4: L4::Udp { udp, payload } } = frame.l3 else { panic!("not UDP") };
        prop_assert_eq!((ip.src_addr, ip.dst_addr), (src, dst));
        prop_assert_eq!((udp.src_port, udp.dst_port), (sport, dport));
        prop_assert_eq!(payload, &data[..]);
    }

    #[test]
    fn icmp_echo_roundtrip(macs in (arb_mac(), arb_mac()), s4 in arb_v4(), d4 in arb_v4(), s6 in arb_v6(), d6 in arb_v6(),
                           ident in any::<u16>(), seq_no in any::<u16>(),
                           data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut out = Vec::new();
        let v4 = Icmpv4Repr::EchoRequest { ident, seq_no, data: &data };
        build::ipv4(&mut out, macs, (s4, d4), 64, &Payload::Icmpv4(v4)).unwrap();
        let frame = parse(&out).unwrap();
        let ok = matches!(frame.l3, L3::Ipv4 { l4: L4::Icmpv4(r), .. } if r == v4);
        prop_assert!(ok);
        let v6 = Icmpv6Repr::EchoReply { ident, seq_no, data: &data };
        build::ipv6(&mut out, macs, (s6, d6), 64, &Payload::Icmpv6 { repr: v6, options: &[] }).unwrap();
        let frame = parse(&out).unwrap();
        let ok = matches!(frame.l3, L3::Ipv6 { l4: L4::Icmpv6(r), .. } if r == v6);
        prop_assert!(ok);
    }

    #[test]
    fn tcp_roundtrip(src in arb_v4(), dst in arb_v4(), sport in 1..=u16::MAX, dport in 1..=u16::MAX,
                     seq in any::<i32>(), ack in proptest::option::of(any::<i32>()), win in any::<u16>(),
                     ws in proptest::option::of(0u8..=14), mss in proptest::option::of(536u16..=65495),
                     sack in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let repr = TcpRepr {
            src_port: sport, dst_port: dport,
            control: if ack.is_some() { TcpControl::Psh } else { TcpControl::Syn },
            seq_number: TcpSeqNumber(seq), ack_number: ack.map(TcpSeqNumber), window_len: win,
            window_scale: ws, max_seg_size: mss, sack_permitted: sack,
            sack_ranges: [None; 3], timestamp: None, payload: &data,
        };
        let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut TcpPacket::new_unchecked(&mut buf[..]), &s, &d, &ChecksumCapabilities::default());
        let L4::Tcp(parsed) = parse_tcp(&buf, &s, &d).unwrap() else { panic!("not TCP") };
        prop_assert_eq!(parsed, repr);
    }

    #[test]
    fn dhcp4_roundtrip(xid in any::<u32>(), chaddr in arb_mac(), ip in arb_v4(), lease in any::<u32>(), mtu in 68u16..) {
        let mtu_bytes = mtu.to_be_bytes();
        let extra = [dhcp::DhcpOption { kind: 26, data: &mtu_bytes }];
        let repr = dhcp::DhcpRepr {
            message_type: dhcp::DhcpMessageType::Offer, transaction_id: xid, secs: 0,
            client_hardware_address: chaddr, client_ip: Ipv4Addr::UNSPECIFIED, your_ip: ip,
            server_ip: Ipv4Addr::UNSPECIFIED, router: Some(ip), subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED, broadcast: false, requested_ip: None, client_identifier: None,
            server_identifier: Some(ip), parameter_request_list: None, dns_servers: None, max_size: None,
            lease_duration: Some(lease), renew_duration: None, rebind_duration: None, additional_options: &extra,
        };
        let mut out = Vec::new();
        dhcp::encode_v4(&repr, &mut out).unwrap();
        // smoltcp's parse does not return unknown options in `additional_options`; the MTU
        // option is read back from the checked view instead.
        let mut expected = repr.clone();
        expected.additional_options = &[];
        let same = dhcp::with_v4(&out, |parsed| parsed == &expected).unwrap();
        prop_assert!(same);
        let packet = dhcp::DhcpPacket::new_checked(&out[..]).unwrap();
        let mtu_back = packet.options().find(|o| o.kind == 26).map(|o| o.data.to_vec());
        prop_assert_eq!(mtu_back, Some(mtu_bytes.to_vec()));
    }

    #[test]
    fn dhcp6_roundtrip(xid in any::<[u8; 3]>(), addr in arb_v6(), dns in arb_v6(), iaid in any::<u32>()) {
        use dhcp::v6::{DhcpOption, IAAddr, IANA, Message, MessageType};
        let mut msg = Message::new_with_id(MessageType::Reply, xid);
        msg.opts_mut().insert(DhcpOption::ServerId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 1]));
        let mut ia_opts = dhcp::v6::DhcpOptions::new();
        ia_opts.insert(DhcpOption::IAAddr(IAAddr { addr, preferred_life: 3600, valid_life: 7200, opts: dhcp::v6::DhcpOptions::new() }));
        msg.opts_mut().insert(DhcpOption::IANA(IANA { id: iaid, t1: 1800, t2: 2880, opts: ia_opts }));
        msg.opts_mut().insert(DhcpOption::DomainNameServers(vec![dns]));
        let mut out = Vec::new();
        dhcp::encode_v6(&msg, &mut out).unwrap();
        prop_assert_eq!(dhcp::decode_v6(&out).unwrap(), msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = parse(&bytes);
        let _ = dhcp::with_v4(&bytes, |r| r.transaction_id);
        let _ = dhcp::decode_v6(&bytes);
    }

    #[test]
    fn mutated_captures_never_panic(which in 0..ALL.len(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut copy = ALL[which].1.to_vec();
        for (i, b) in flips {
            let at = i.index(copy.len());
            copy[at] = b;
        }
        decode_dhcp_if_udp(&copy);
    }
}
