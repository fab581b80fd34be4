//! DHCPv4 and DHCPv6 message bodies.
//!
//! DHCPv4 uses smoltcp's checked `DhcpPacket` view and `DhcpRepr`; DHCPv6 uses `dhcproto`'s
//! typed messages. This module is the only place that turns them into or out of bytes.
//! Decoding is bounded by the UDP payload it is given (at most one frame), and every decode
//! error is a drop, never a panic: the property tests in `wire/tests.rs` feed arbitrary and
//! mutated bytes to both decoders.
//!
//! Why not `dhcproto` for DHCPv4 too: its v4 option decoder `debug_assert!`s option lengths
//! (bulk-leasequery options 91–94), so a malformed DISCOVER from the guest panics a debug
//! build — found by `arbitrary_bytes_never_panic`. Its v6 decoder has no such assertions.

pub use dhcproto::Name;
pub use dhcproto::v6;
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
pub use smoltcp::wire::{DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr};

/// DHCPv4 server port (RFC 2131).
pub const DHCP4_SERVER_PORT: u16 = 67;
/// DHCPv4 client port (RFC 2131).
pub const DHCP4_CLIENT_PORT: u16 = 68;
/// DHCPv6 client port (RFC 8415 §7.2).
pub const DHCP6_CLIENT_PORT: u16 = 546;
/// DHCPv6 server/relay port (RFC 8415 §7.2).
pub const DHCP6_SERVER_PORT: u16 = 547;

/// Decodes a DHCPv4 message and hands its representation to `f`; `None` if it is not one.
pub fn with_v4<R>(payload: &[u8], f: impl FnOnce(&DhcpRepr<'_>) -> R) -> Option<R> {
    let packet = DhcpPacket::new_checked(payload).ok()?;
    let repr = DhcpRepr::parse(&packet).ok()?;
    Some(f(&repr))
}

/// Decodes a DHCPv6 client/server message, `None` if it is not one.
#[must_use]
pub fn decode_v6(payload: &[u8]) -> Option<v6::Message> {
    v6::Message::decode(&mut Decoder::new(payload)).ok()
}

/// Encodes a DHCPv4 message into `out` (cleared first).
///
/// # Errors
///
/// When an option is longer than 255 bytes.
pub fn encode_v4(repr: &DhcpRepr<'_>, out: &mut Vec<u8>) -> Result<(), smoltcp::wire::Error> {
    out.clear();
    out.resize(repr.buffer_len(), 0);
    repr.emit(&mut DhcpPacket::new_unchecked(&mut out[..]))
}

/// Encodes a DHCPv6 message into `out` (cleared first).
///
/// # Errors
///
/// The encoder's error if an option cannot be represented.
pub fn encode_v6(msg: &v6::Message, out: &mut Vec<u8>) -> Result<(), dhcproto::error::EncodeError> {
    out.clear();
    msg.encode(&mut Encoder::new(out))
}

/// Appends `name` in DNS wire format (RFC 1035 §3.1, uncompressed): each label with its
/// length, then the root's zero. The name must have passed `plan::dns_name_ok`.
pub fn dns_name(name: &str, out: &mut Vec<u8>) {
    for label in name.strip_suffix('.').unwrap_or(name).split('.') {
        let bytes = label.as_bytes();
        let bytes = bytes.get(..bytes.len().min(63)).unwrap_or(bytes);
        out.push(u8::try_from(bytes.len()).unwrap_or(63));
        out.extend_from_slice(bytes);
    }
    out.push(0);
}
