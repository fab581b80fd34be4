//! Frame builders: representations in, complete Ethernet frames with valid checksums out.
//!
//! Every builder clears the output buffer, sizes it exactly and fills it, so buffers can be
//! reused from a pool without leaking old bytes. Sizes come from the representations'
//! `buffer_len()`, which is what makes the emitting views in bounds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
pub use smoltcp::wire::{ETHERNET_HEADER_LEN, IPV6_HEADER_LEN};

use super::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr, UdpPacket, UdpRepr, checksum,
};

/// What an IP packet built here carries.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// An ICMPv4 message (IPv4 only).
    Icmpv4(Icmpv4Repr<'a>),
    /// An ICMPv6 message (IPv6 only), followed by raw NDP options (`options`, already
    /// encoded, e.g. by [`rdnss_option`]) that smoltcp's NDP representation cannot carry.
    Icmpv6 {
        /// The message.
        repr: Icmpv6Repr<'a>,
        /// Encoded NDP options appended after the message; empty for none.
        options: &'a [u8],
    },
    /// A UDP datagram.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// The payload.
        data: &'a [u8],
    },
    /// A TCP segment (with options: SYN-ACK, RST; data segments use [`tcp_in_place`]).
    Tcp(TcpRepr<'a>),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Icmpv4(repr) => repr.buffer_len(),
            Self::Icmpv6 { repr, options } => repr.buffer_len() + options.len(),
            Self::Udp { data, .. } => smoltcp::wire::UDP_HEADER_LEN + data.len(),
            Self::Tcp(repr) => repr.buffer_len(),
        }
    }

    fn protocol(&self) -> IpProtocol {
        match self {
            Self::Icmpv4(_) => IpProtocol::Icmp,
            Self::Icmpv6 { .. } => IpProtocol::Icmpv6,
            Self::Udp { .. } => IpProtocol::Udp,
            Self::Tcp(_) => IpProtocol::Tcp,
        }
    }
}

/// Why a frame could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The payload does not fit in one IP packet.
    #[error("payload of {0} bytes does not fit in an IP packet")]
    TooLarge(usize),
    /// The payload type does not belong to the IP version (e.g. ICMPv6 in IPv4).
    #[error("payload does not match the IP version")]
    WrongFamily,
}

/// Builds an Ethernet frame carrying an ARP packet.
pub fn arp(out: &mut Vec<u8>, src: EthernetAddress, dst: EthernetAddress, repr: &ArpRepr) {
    let eth = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: EthernetProtocol::Arp,
    };
    reset(out, eth.buffer_len() + repr.buffer_len());
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    eth.emit(&mut frame);
    repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
}

/// Builds an Ethernet frame carrying an IPv4 packet.
///
/// # Errors
///
/// [`BuildError`] if the payload is IPv6-only or larger than an IPv4 packet can hold.
pub fn ipv4(
    out: &mut Vec<u8>,
    (src_mac, dst_mac): (EthernetAddress, EthernetAddress),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    hop_limit: u8,
    payload: &Payload<'_>,
) -> Result<(), BuildError> {
    if matches!(payload, Payload::Icmpv6 { .. }) {
        return Err(BuildError::WrongFamily);
    }
    let len = payload.len();
    if len > usize::from(u16::MAX) - 20 {
        return Err(BuildError::TooLarge(len));
    }
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: payload.protocol(),
        payload_len: len,
        hop_limit,
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    reset(out, ETHERNET_HEADER_LEN + ip.buffer_len() + len);
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    let body = packet.payload_mut();
    let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    match payload {
        Payload::Icmpv4(repr) => {
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(body),
                &ChecksumCapabilities::default(),
            );
        }
        Payload::Udp {
            src_port,
            dst_port,
            data,
        } => emit_udp(body, (&s, &d), *src_port, *dst_port, data),
        Payload::Tcp(repr) => repr.emit(
            &mut TcpPacket::new_unchecked(body),
            &s,
            &d,
            &ChecksumCapabilities::default(),
        ),
        Payload::Icmpv6 { .. } => return Err(BuildError::WrongFamily),
    }
    Ok(())
}

/// Builds an Ethernet frame carrying an IPv6 packet (no extension headers).
///
/// # Errors
///
/// [`BuildError`] if the payload is IPv4-only or larger than an IPv6 packet can hold.
pub fn ipv6(
    out: &mut Vec<u8>,
    (src_mac, dst_mac): (EthernetAddress, EthernetAddress),
    (src, dst): (Ipv6Addr, Ipv6Addr),
    hop_limit: u8,
    payload: &Payload<'_>,
) -> Result<(), BuildError> {
    if matches!(payload, Payload::Icmpv4(_)) {
        return Err(BuildError::WrongFamily);
    }
    let len = payload.len();
    if len > usize::from(u16::MAX) {
        return Err(BuildError::TooLarge(len));
    }
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: payload.protocol(),
        payload_len: len,
        hop_limit,
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv6,
    };
    reset(out, ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + len);
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv6Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet);
    let body = packet.payload_mut();
    match payload {
        Payload::Icmpv6 { repr, options } => {
            let (message, trailer) = body.split_at_mut(repr.buffer_len());
            repr.emit(
                &src,
                &dst,
                &mut Icmpv6Packet::new_unchecked(message),
                &ChecksumCapabilities::default(),
            );
            trailer.copy_from_slice(options);
            if !options.is_empty() {
                Icmpv6Packet::new_unchecked(body).fill_checksum(&src, &dst);
            }
        }
        Payload::Udp {
            src_port,
            dst_port,
            data,
        } => {
            emit_udp(
                body,
                (&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst)),
                *src_port,
                *dst_port,
                data,
            );
        }
        Payload::Tcp(repr) => repr.emit(
            &mut TcpPacket::new_unchecked(body),
            &IpAddress::Ipv6(src),
            &IpAddress::Ipv6(dst),
            &ChecksumCapabilities::default(),
        ),
        Payload::Icmpv4(_) => return Err(BuildError::WrongFamily),
    }
    Ok(())
}

/// The fixed header of a TCP segment built in place by [`tcp_in_place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    /// Source and destination MAC.
    pub macs: (EthernetAddress, EthernetAddress),
    /// Source and destination address (one family).
    pub addrs: (IpAddr, IpAddr),
    /// Source and destination port.
    pub ports: (u16, u16),
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (the ACK flag is always set).
    pub ack: u32,
    /// Extra flags ([`TCP_FIN`], [`TCP_PSH`]).
    pub flags: u8,
    /// Window field (already scaled down).
    pub window: u16,
}

/// Length of the Ethernet, IP and option-less TCP headers in front of a segment's payload.
#[must_use]
pub const fn tcp_headers_len(v6: bool) -> usize {
    ETHERNET_HEADER_LEN + if v6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN } + TCP_HEADER_LEN
}

/// Writes the Ethernet, IP and TCP headers (no options) in front of the payload already in
/// `frame[tcp_headers_len(v6)..]` and fills the IP and TCP checksums. This is the data
/// path's builder: the payload was read from the host socket straight into the frame.
///
/// # Errors
///
/// [`BuildError`] if the addresses mix families or the frame does not fit an IP packet.
pub fn tcp_in_place(frame: &mut [u8], h: &TcpHeader) -> Result<(), BuildError> {
    let v6 = match h.addrs {
        (IpAddr::V4(_), IpAddr::V4(_)) => false,
        (IpAddr::V6(_), IpAddr::V6(_)) => true,
        _ => return Err(BuildError::WrongFamily),
    };
    let hdr = tcp_headers_len(v6);
    if frame.len() < hdr {
        return Err(BuildError::TooLarge(frame.len()));
    }
    let ip_len = frame.len() - ETHERNET_HEADER_LEN;
    let tcp_len = ip_len - if v6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN };
    let eth = EthernetRepr {
        src_addr: h.macs.0,
        dst_addr: h.macs.1,
        ethertype: if v6 {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        },
    };
    let mut eth_frame = EthernetFrame::new_unchecked(&mut *frame);
    eth.emit(&mut eth_frame);
    let l3 = eth_frame.payload_mut();
    let pseudo = match h.addrs {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = u16::try_from(ip_len).map_err(|_| BuildError::TooLarge(ip_len))?;
            let mut ip = Ipv4Packet::new_unchecked(&mut *l3);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_dscp(0);
            ip.set_ecn(0);
            ip.set_total_len(total);
            ip.set_ident(0);
            ip.clear_flags();
            ip.set_dont_frag(true);
            ip.set_frag_offset(0);
            ip.set_hop_limit(DEFAULT_TTL);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.fill_checksum();
            checksum::add(
                checksum::sum(&[src.octets(), dst.octets()].concat()),
                checksum::sum(
                    &[[0, 6], u16::try_from(tcp_len).unwrap_or(0).to_be_bytes()].concat(),
                ),
            )
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let payload = u16::try_from(tcp_len).map_err(|_| BuildError::TooLarge(tcp_len))?;
            let mut ip = Ipv6Packet::new_unchecked(&mut *l3);
            ip.set_version(6);
            ip.set_traffic_class(0);
            ip.set_flow_label(0);
            ip.set_payload_len(payload);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_hop_limit(DEFAULT_TTL);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            let len = u32::try_from(tcp_len).unwrap_or(u32::MAX).to_be_bytes();
            checksum::add(
                checksum::add(checksum::sum(&src.octets()), checksum::sum(&dst.octets())),
                checksum::sum(&[len[0], len[1], len[2], len[3], 0, 0, 0, 6]),
            )
        }
        _ => return Err(BuildError::WrongFamily),
    };
    let l4 = l3
        .get_mut(if v6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN }..)
        .ok_or(BuildError::TooLarge(ip_len))?;
    let mut tcp = TcpPacket::new_unchecked(&mut *l4);
    tcp.set_src_port(h.ports.0);
    tcp.set_dst_port(h.ports.1);
    tcp.set_seq_number(super::TcpSeqNumber(h.seq.cast_signed()));
    tcp.set_ack_number(super::TcpSeqNumber(h.ack.cast_signed()));
    // Data offset 5 words, ACK plus the caller's flags.
    tcp.set_header_len(20);
    tcp.clear_flags();
    tcp.set_ack(true);
    tcp.set_fin(h.flags & TCP_FIN != 0);
    tcp.set_psh(h.flags & TCP_PSH != 0);
    tcp.set_window_len(h.window);
    tcp.set_checksum(0);
    tcp.set_urgent_at(0);
    let sum = checksum::add(pseudo, checksum::sum(l4));
    TcpPacket::new_unchecked(l4).set_checksum(!sum);
    Ok(())
}

/// Splits `frame`, an Ethernet frame carrying one IPv4 or IPv6 packet (no IP options or
/// extension headers, as this module builds them) larger than `mtu`, into fragments of at
/// most `mtu` bytes of IP, queued on `out` in order. Returns the number of fragments.
/// IPv4 fragments carry the low 16 bits of `ident`; IPv6 ones a Fragment header (RFC 8200
/// §4.5) with all of it.
pub fn fragment(frame: &[u8], mtu: usize, ident: u32, out: &mut crate::frames::Queue) -> u64 {
    let Some(eth) = frame.get(..ETHERNET_HEADER_LEN) else {
        return 0;
    };
    let v6 = frame.get(12..14) == Some(&[0x86, 0xdd][..]);
    let ip_hdr = if v6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN };
    let Some(header) = frame.get(ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + ip_hdr) else {
        return 0;
    };
    let body = frame
        .get(ETHERNET_HEADER_LEN + ip_hdr..)
        .unwrap_or_default();
    let frag_hdr = if v6 { 8 } else { 0 };
    let chunk = mtu.saturating_sub(ip_hdr + frag_hdr) & !7;
    if chunk == 0 {
        return 0;
    }
    let next_header = header.get(6).copied().unwrap_or(0);
    let mut count = 0;
    for (i, piece) in body.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let more = offset + piece.len() < body.len();
        let Ok(offset16) = u16::try_from(offset) else {
            break;
        };
        let mut buf = out.buffer();
        buf.extend_from_slice(eth);
        buf.extend_from_slice(header);
        if v6 {
            let mut ip =
                Ipv6Packet::new_unchecked(buf.get_mut(ETHERNET_HEADER_LEN..).unwrap_or_default());
            ip.set_payload_len(u16::try_from(8 + piece.len()).unwrap_or(u16::MAX));
            ip.set_next_header(IpProtocol::Ipv6Frag);
            buf.push(next_header);
            buf.push(0);
            buf.extend_from_slice(&(offset16 | u16::from(more)).to_be_bytes());
            buf.extend_from_slice(&ident.to_be_bytes());
            buf.extend_from_slice(piece);
        } else {
            buf.extend_from_slice(piece);
            let mut ip =
                Ipv4Packet::new_unchecked(buf.get_mut(ETHERNET_HEADER_LEN..).unwrap_or_default());
            ip.set_total_len(u16::try_from(IPV4_HEADER_LEN + piece.len()).unwrap_or(u16::MAX));
            ip.set_ident((ident & 0xffff) as u16);
            ip.clear_flags();
            ip.set_more_frags(more);
            ip.set_frag_offset(offset16);
            ip.fill_checksum();
        }
        out.push(buf);
        count += 1;
    }
    count
}

/// FIN flag for [`TcpHeader::flags`].
pub const TCP_FIN: u8 = 0x01;
/// PSH flag for [`TcpHeader::flags`].
pub const TCP_PSH: u8 = 0x08;
/// TTL / hop limit of packets forwarder originates.
pub const DEFAULT_TTL: u8 = 64;
/// Length of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
const TCP_HEADER_LEN: usize = 20;

/// Encodes an NDP Recursive DNS Server option (RFC 8106 §5.1).
pub fn rdnss_option(out: &mut Vec<u8>, lifetime_s: u32, servers: &[Ipv6Addr]) {
    if servers.is_empty() {
        return;
    }
    // Length in units of 8 octets: 8 bytes of header plus 16 per address. At most 127
    // addresses fit the one-byte length; more are not advertised.
    let servers = servers.get(..servers.len().min(127)).unwrap_or(servers);
    let units = 1 + 2 * servers.len();
    out.push(NDP_OPTION_RDNSS);
    out.push(u8::try_from(units).unwrap_or(u8::MAX));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&lifetime_s.to_be_bytes());
    for server in servers {
        out.extend_from_slice(&server.octets());
    }
}

/// Encodes an NDP DNS Search List option (RFC 8106 §5.2): the names in DNS wire format,
/// zero-padded to a multiple of 8 octets. Names past the option's size limit are left out.
pub fn dnssl_option(out: &mut Vec<u8>, lifetime_s: u32, names: &[String]) {
    let mut encoded = Vec::new();
    for name in names {
        let mut one = Vec::new();
        super::dhcp::dns_name(name, &mut one);
        // The length byte counts 8-octet units: at most 255 × 8 bytes with the header.
        if 8 + encoded.len() + one.len() > 255 * 8 {
            break;
        }
        encoded.extend_from_slice(&one);
    }
    if encoded.is_empty() {
        return;
    }
    while (8 + encoded.len()) % 8 != 0 {
        encoded.push(0);
    }
    out.push(NDP_OPTION_DNSSL);
    out.push(u8::try_from((8 + encoded.len()) / 8).unwrap_or(u8::MAX));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&lifetime_s.to_be_bytes());
    out.extend_from_slice(&encoded);
}

fn emit_udp(
    body: &mut [u8],
    (src, dst): (&IpAddress, &IpAddress),
    src_port: u16,
    dst_port: u16,
    data: &[u8],
) {
    let repr = UdpRepr { src_port, dst_port };
    repr.emit(
        &mut UdpPacket::new_unchecked(body),
        src,
        dst,
        data.len(),
        |buf| buf.copy_from_slice(data),
        &ChecksumCapabilities::default(),
    );
}

fn reset(out: &mut Vec<u8>, len: usize) {
    out.clear();
    out.resize(len, 0);
}

/// NDP option type of the Recursive DNS Server option (RFC 8106).
pub const NDP_OPTION_RDNSS: u8 = 25;
/// NDP option type of the DNS Search List option (RFC 8106).
pub const NDP_OPTION_DNSSL: u8 = 31;

/// Builds the ICMP/ICMPv6 echo request a ping socket sends (header + data, no IP header).
/// The kernel sets the identifier and the checksum of ping-socket messages.
pub fn echo_request(out: &mut Vec<u8>, v6: bool, seq_no: u16, data: &[u8]) {
    if v6 {
        let repr = Icmpv6Repr::EchoRequest {
            ident: 0,
            seq_no,
            data,
        };
        reset(out, repr.buffer_len());
        let unspecified = Ipv6Addr::UNSPECIFIED;
        repr.emit(
            &unspecified,
            &unspecified,
            &mut Icmpv6Packet::new_unchecked(&mut out[..]),
            &ChecksumCapabilities::ignored(),
        );
    } else {
        let repr = Icmpv4Repr::EchoRequest {
            ident: 0,
            seq_no,
            data,
        };
        reset(out, repr.buffer_len());
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(&mut out[..]),
            &ChecksumCapabilities::ignored(),
        );
    }
}
