//! Frame builders: representations in, complete Ethernet frames with valid checksums out.
//!
//! Every builder clears the output buffer, sizes it exactly and fills it, so buffers can be
//! reused from a pool without leaking old bytes. Sizes come from the representations'
//! `buffer_len()`, which is what makes the emitting views in bounds.

use std::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{ETHERNET_HEADER_LEN, IPV6_HEADER_LEN};

use super::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet,
    Ipv4Repr, Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
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
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Icmpv4(repr) => repr.buffer_len(),
            Self::Icmpv6 { repr, options } => repr.buffer_len() + options.len(),
            Self::Udp { data, .. } => smoltcp::wire::UDP_HEADER_LEN + data.len(),
        }
    }

    fn protocol(&self) -> IpProtocol {
        match self {
            Self::Icmpv4(_) => IpProtocol::Icmp,
            Self::Icmpv6 { .. } => IpProtocol::Icmpv6,
            Self::Udp { .. } => IpProtocol::Udp,
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
        Payload::Icmpv4(_) => return Err(BuildError::WrongFamily),
    }
    Ok(())
}

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
