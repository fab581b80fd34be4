//! # Theory of operation
//!
//! The packet layer: the only place in the agent that indexes bytes (STYLE A4). Everything
//! above it works on the parsed representations this module returns.
//!
//! ## Scope
//!
//! * **Parsing** ([`parse`]): one Ethernet frame from the namespace becomes a [`Frame`]:
//!   Ethernet header, then ARP, IPv4 or IPv6 (extension headers walked and skipped), then
//!   ICMPv4, ICMPv6 (including NDP), UDP or TCP (with options). Every length, checksum and
//!   version is checked before a field is read; a frame that fails a check becomes a
//!   [`DropReason`], which the engine counts. Nothing here can panic on any input: the
//!   views come from smoltcp's `new_checked` constructors, after which its accessors are
//!   in bounds, and the few places that slice by hand check the length first.
//! * **Building** ([`build`]): replies and translated packets are emitted from
//!   representations into a caller-provided buffer, with full checksums.
//! * **DHCP** ([`dhcp`]): DHCPv4 and DHCPv6 message bodies (carried in UDP payloads).
//! * **Checksums** ([`checksum`]): full Internet checksums and RFC 1624 incremental updates.
//!
//! ## Crates
//!
//! L2–L4 views and representations come from `smoltcp::wire` (the model STYLE.md names: checked
//! `Packet<T>` views plus `Repr` types that parse and emit); only its `wire` module is used,
//! never its sockets or interface. DHCP bodies come from `dhcproto` (DHCPv4 and DHCPv6 with
//! typed options, which smoltcp lacks for v6). Why these and not `etherparse` or `pnet`:
//! `docs/dependencies.md`.
//!
//! ## Limits
//!
//! * At most [`MAX_IPV6_EXT_HEADERS`] extension headers are walked; more is a drop
//!   (a chain the guest controls must not cost unbounded work).
//! * IPv4 and IPv6 fragments are returned as [`L4::Fragment`]; reassembly is the engine's
//!   job (`engine::reassembly`), which then parses the whole payload with [`parse_l4`].
//!
//! ## References
//!
//! RFC 826 (ARP), RFC 791 (IPv4), RFC 8200 (IPv6), RFC 792/4443 (ICMP), RFC 4861 (NDP),
//! RFC 768 (UDP), RFC 9293 (TCP), RFC 2131 (DHCP), RFC 8415 (DHCPv6), RFC 1071/1624 (checksum).

pub mod build;
pub mod checksum;
pub mod dhcp;

use smoltcp::phy::ChecksumCapabilities;
pub use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr,
    Icmpv6DstUnreachable, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6ExtHeader, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags,
    NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags, RawHardwareAddress,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// Why a frame from the namespace was not processed. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than the header it claims to carry.
    Truncated,
    /// A length field disagrees with the bytes present, or a field has an impossible value.
    Malformed,
    /// An IP, ICMP, UDP or TCP checksum does not verify.
    BadChecksum,
    /// An Ethernet type this forwarder does not handle (e.g. 802.1Q, LLDP).
    UnknownEthertype,
    /// An IPv4 or IPv6 fragment that cannot be reassembled (overlap, too large, too many
    /// datagrams in reassembly at once, or timed out).
    Fragment,
    /// More IPv6 extension headers than [`MAX_IPV6_EXT_HEADERS`].
    TooManyExtHeaders,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; 6] = [
        Self::Truncated,
        Self::Malformed,
        Self::BadChecksum,
        Self::UnknownEthertype,
        Self::Fragment,
        Self::TooManyExtHeaders,
    ];

    /// Stable snake-case name, used in logs and statistics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::BadChecksum => "bad_checksum",
            Self::UnknownEthertype => "unknown_ethertype",
            Self::Fragment => "fragment",
            Self::TooManyExtHeaders => "too_many_ext_headers",
        }
    }
}

/// A parsed Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The Ethernet header.
    pub eth: EthernetRepr,
    /// What the frame carries.
    pub l3: L3<'a>,
}

/// The network-layer content of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L3<'a> {
    /// An ARP packet (Ethernet/IPv4 only).
    Arp(ArpRepr),
    /// An IPv4 packet.
    Ipv4 {
        /// The header. `payload_len` is the length of `l4`'s bytes.
        ip: Ipv4Repr,
        /// The transport content.
        l4: L4<'a>,
    },
    /// An IPv6 packet.
    Ipv6 {
        /// The header, with `next_header` set to the upper-layer protocol found after the
        /// extension headers and `payload_len` to the upper-layer length.
        ip: Ipv6Repr,
        /// The transport content.
        l4: L4<'a>,
    },
}

/// The transport-layer content of an IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4<'a> {
    /// ICMPv4 message of a type this forwarder understands.
    Icmpv4(Icmpv4Repr<'a>),
    /// ICMPv6 message of a type this forwarder understands (echo, errors, NDP).
    Icmpv6(Icmpv6Repr<'a>),
    /// A UDP datagram.
    Udp {
        /// Ports.
        udp: UdpRepr,
        /// The datagram's payload.
        payload: &'a [u8],
    },
    /// A TCP segment, options parsed.
    Tcp(TcpRepr<'a>),
    /// A fragment of a larger datagram (no transport header checked yet).
    Fragment(Fragment<'a>),
    /// Any other protocol or ICMP type: checked for length and checksum where it has one,
    /// otherwise passed up raw.
    Other {
        /// The IP protocol number.
        protocol: IpProtocol,
        /// For ICMP/ICMPv6 the message type, else 0.
        icmp_type: u8,
        /// The upper-layer bytes.
        payload: &'a [u8],
    },
}

/// One IPv4 or IPv6 fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// The datagram's identification (16 bits for IPv4, 32 for IPv6).
    pub ident: u32,
    /// Byte offset of this piece.
    pub offset: usize,
    /// More fragments follow.
    pub more: bool,
    /// The upper-layer protocol of the whole datagram.
    pub protocol: IpProtocol,
    /// This piece's bytes.
    pub payload: &'a [u8],
}

/// Parses a reassembled upper-layer payload of `protocol` between `src` and `dst`, with the
/// same checks as a whole packet.
///
/// # Errors
///
/// A [`DropReason`] when it fails them.
pub fn parse_l4<'a>(
    protocol: IpProtocol,
    body: &'a [u8],
    src: IpAddress,
    dst: IpAddress,
) -> Result<L4<'a>, DropReason> {
    match (protocol, src, dst) {
        (IpProtocol::Icmp, IpAddress::Ipv4(_), _) => parse_icmpv4(body),
        (IpProtocol::Icmpv6, IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            let ip = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Icmpv6,
                payload_len: body.len(),
                hop_limit: 64,
            };
            parse_icmpv6(body, &ip)
        }
        (IpProtocol::Udp, _, _) => parse_udp(body, &src, &dst),
        (IpProtocol::Tcp, _, _) => parse_tcp(body, &src, &dst),
        (protocol, _, _) => Ok(L4::Other {
            protocol,
            icmp_type: 0,
            payload: body,
        }),
    }
}

/// Parses one Ethernet frame from the namespace.
///
/// # Errors
///
/// A [`DropReason`] when any layer fails its checks.
pub fn parse(frame: &[u8]) -> Result<Frame<'_>, DropReason> {
    let eth_frame = EthernetFrame::new_checked(frame).map_err(|_| DropReason::Truncated)?;
    let eth = EthernetRepr::parse(&eth_frame).map_err(|_| DropReason::Truncated)?;
    let payload = eth_frame.payload();
    let l3 = match eth.ethertype {
        EthernetProtocol::Arp => L3::Arp(parse_arp(payload)?),
        EthernetProtocol::Ipv4 => parse_ipv4(payload)?,
        EthernetProtocol::Ipv6 => parse_ipv6(payload)?,
        EthernetProtocol::Unknown(_) => return Err(DropReason::UnknownEthertype),
    };
    Ok(Frame { eth, l3 })
}

/// The guest-side view of checksum verification: everything is verified.
fn verify_all() -> ChecksumCapabilities {
    ChecksumCapabilities::default()
}

fn parse_arp(payload: &[u8]) -> Result<ArpRepr, DropReason> {
    let packet = ArpPacket::new_checked(payload).map_err(|_| DropReason::Truncated)?;
    ArpRepr::parse(&packet).map_err(|_| DropReason::Malformed)
}

fn parse_ipv4(payload: &[u8]) -> Result<L3<'_>, DropReason> {
    let packet = Ipv4Packet::new_checked(payload).map_err(|_| DropReason::Truncated)?;
    if packet.version() != 4 {
        return Err(DropReason::Malformed);
    }
    if !packet.verify_checksum() {
        return Err(DropReason::BadChecksum);
    }
    if packet.more_frags() || packet.frag_offset() != 0 {
        // smoltcp's repr refuses fragments; read the header fields directly (the checked
        // view guarantees they are in bounds).
        let ip = Ipv4Repr {
            src_addr: packet.src_addr(),
            dst_addr: packet.dst_addr(),
            next_header: packet.next_header(),
            payload_len: packet.payload().len(),
            hop_limit: packet.hop_limit(),
        };
        let fragment = Fragment {
            ident: u32::from(packet.ident()),
            offset: usize::from(packet.frag_offset()),
            more: packet.more_frags(),
            protocol: packet.next_header(),
            payload: packet.payload(),
        };
        return Ok(L3::Ipv4 {
            ip,
            l4: L4::Fragment(fragment),
        });
    }
    let ip = Ipv4Repr::parse(&packet, &verify_all()).map_err(|_| DropReason::Malformed)?;
    let body = packet.payload();
    let src = IpAddress::Ipv4(ip.src_addr);
    let dst = IpAddress::Ipv4(ip.dst_addr);
    let l4 = match ip.next_header {
        IpProtocol::Icmp => parse_icmpv4(body)?,
        IpProtocol::Udp => parse_udp(body, &src, &dst)?,
        IpProtocol::Tcp => parse_tcp(body, &src, &dst)?,
        protocol => L4::Other {
            protocol,
            icmp_type: 0,
            payload: body,
        },
    };
    Ok(L3::Ipv4 { ip, l4 })
}

fn parse_ipv6(payload: &[u8]) -> Result<L3<'_>, DropReason> {
    let packet = Ipv6Packet::new_checked(payload).map_err(|_| DropReason::Truncated)?;
    let mut ip = Ipv6Repr::parse(&packet).map_err(|_| DropReason::Malformed)?;
    let mut next = ip.next_header;
    let mut body = packet.payload();
    let mut walked = 0;
    loop {
        match next {
            IpProtocol::HopByHop | IpProtocol::Ipv6Route | IpProtocol::Ipv6Opts => {
                if walked == MAX_IPV6_EXT_HEADERS {
                    return Err(DropReason::TooManyExtHeaders);
                }
                walked += 1;
                let header = Ipv6ExtHeader::new_checked(body).map_err(|_| DropReason::Truncated)?;
                next = header.next_header();
                // An extension header is 8 octets plus `header_len` more units of 8.
                let len = 8 + 8 * usize::from(header.header_len());
                body = body.get(len..).ok_or(DropReason::Truncated)?;
            }
            IpProtocol::Ipv6Frag => {
                // RFC 8200 §4.5: next header, reserved, offset (13 bits) | M, ident (32).
                let &[nh, _, off_hi, off_lo, i0, i1, i2, i3] =
                    body.get(..8).ok_or(DropReason::Truncated)?
                else {
                    return Err(DropReason::Truncated);
                };
                let off = u16::from_be_bytes([off_hi, off_lo]);
                let ident = u32::from_be_bytes([i0, i1, i2, i3]);
                let payload = body.get(8..).unwrap_or_default();
                ip.next_header = IpProtocol::from(nh);
                ip.payload_len = payload.len();
                let fragment = Fragment {
                    ident,
                    offset: usize::from(off & 0xfff8),
                    more: off & 1 == 1,
                    protocol: IpProtocol::from(nh),
                    payload,
                };
                return Ok(L3::Ipv6 {
                    ip,
                    l4: L4::Fragment(fragment),
                });
            }
            _ => break,
        }
    }
    ip.next_header = next;
    ip.payload_len = body.len();
    let src = IpAddress::Ipv6(ip.src_addr);
    let dst = IpAddress::Ipv6(ip.dst_addr);
    let l4 = match next {
        IpProtocol::Icmpv6 => parse_icmpv6(body, &ip)?,
        IpProtocol::Udp => parse_udp(body, &src, &dst)?,
        IpProtocol::Tcp => parse_tcp(body, &src, &dst)?,
        protocol => L4::Other {
            protocol,
            icmp_type: 0,
            payload: body,
        },
    };
    Ok(L3::Ipv6 { ip, l4 })
}

fn parse_icmpv4(body: &[u8]) -> Result<L4<'_>, DropReason> {
    let packet = Icmpv4Packet::new_checked(body).map_err(|_| DropReason::Truncated)?;
    if !packet.verify_checksum() {
        return Err(DropReason::BadChecksum);
    }
    match packet.msg_type() {
        Icmpv4Message::EchoRequest
        | Icmpv4Message::EchoReply
        | Icmpv4Message::DstUnreachable
        | Icmpv4Message::TimeExceeded => Icmpv4Repr::parse(&packet, &verify_all())
            .map(L4::Icmpv4)
            .map_err(|_| DropReason::Malformed),
        other => Ok(L4::Other {
            protocol: IpProtocol::Icmp,
            icmp_type: other.into(),
            payload: body,
        }),
    }
}

fn parse_icmpv6<'a>(body: &'a [u8], ip: &Ipv6Repr) -> Result<L4<'a>, DropReason> {
    let packet = Icmpv6Packet::new_checked(body).map_err(|_| DropReason::Truncated)?;
    if !packet.verify_checksum(&ip.src_addr, &ip.dst_addr) {
        return Err(DropReason::BadChecksum);
    }
    match packet.msg_type() {
        Icmpv6Message::EchoRequest
        | Icmpv6Message::EchoReply
        | Icmpv6Message::DstUnreachable
        | Icmpv6Message::PktTooBig
        | Icmpv6Message::TimeExceeded
        | Icmpv6Message::RouterSolicit
        | Icmpv6Message::RouterAdvert
        | Icmpv6Message::NeighborSolicit
        | Icmpv6Message::NeighborAdvert => {
            Icmpv6Repr::parse(&ip.src_addr, &ip.dst_addr, &packet, &verify_all())
                .map(L4::Icmpv6)
                .map_err(|_| DropReason::Malformed)
        }
        other => Ok(L4::Other {
            protocol: IpProtocol::Icmpv6,
            icmp_type: other.into(),
            payload: body,
        }),
    }
}

fn parse_udp<'a>(body: &'a [u8], src: &IpAddress, dst: &IpAddress) -> Result<L4<'a>, DropReason> {
    let packet = UdpPacket::new_checked(body).map_err(|_| DropReason::Truncated)?;
    let checksum_ok = packet.verify_checksum(src, dst)
        || (matches!(src, IpAddress::Ipv4(_)) && packet.checksum() == 0);
    if !checksum_ok {
        return Err(DropReason::BadChecksum);
    }
    let udp =
        UdpRepr::parse(&packet, src, dst, &verify_all()).map_err(|_| DropReason::Malformed)?;
    Ok(L4::Udp {
        udp,
        payload: packet.payload(),
    })
}

fn parse_tcp<'a>(body: &'a [u8], src: &IpAddress, dst: &IpAddress) -> Result<L4<'a>, DropReason> {
    let packet = TcpPacket::new_checked(body).map_err(|_| DropReason::Truncated)?;
    if !packet.verify_checksum(src, dst) {
        return Err(DropReason::BadChecksum);
    }
    TcpRepr::parse(&packet, src, dst, &verify_all())
        .map(L4::Tcp)
        .map_err(|_| DropReason::Malformed)
}

/// The most IPv6 extension headers walked before the packet is dropped.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Parses what a ping socket returns (an ICMP/ICMPv6 message without IP header): the
/// sequence number and data of an echo reply, `None` for anything else. The kernel has
/// verified the checksum.
#[must_use]
pub fn parse_echo_reply(bytes: &[u8], v6: bool) -> Option<(u16, &[u8])> {
    if v6 {
        let packet = Icmpv6Packet::new_checked(bytes).ok()?;
        (packet.msg_type() == Icmpv6Message::EchoReply)
            .then(|| (packet.echo_seq_no(), packet.payload()))
    } else {
        let packet = Icmpv4Packet::new_checked(bytes).ok()?;
        (packet.msg_type() == Icmpv4Message::EchoReply)
            .then(|| (packet.echo_seq_no(), packet.data()))
    }
}

#[cfg(test)]
mod tests;
