//! # Theory of operation
//!
//! UDP translation. A UDP flow is keyed by both ends (guest address and port, remote address
//! and port) and owns one host socket, `connect()`ed to the target, so the kernel filters
//! replies by source for us and each `recv()` is one datagram: boundaries are kept both
//! ways. Datagrams from the guest are `send()` as they are; datagrams the socket receives
//! become frames from the remote's address and port to the guest's, fragmented to the tap
//! MTU when larger (`wire::build::fragment`).
//!
//! ## Errors
//!
//! A connected UDP socket reports ICMP errors for its destination as the next `send` or
//! `recv` error (`ECONNREFUSED` for port unreachable, `EHOSTUNREACH`, `ENETUNREACH`,
//! `EMSGSIZE`). [`icmp_for`] maps them to the ICMP error the guest would have received on a
//! real path; the error quotes the IP and UDP header of the flow's last datagram
//! ([`Conn::last_len`]), as RFC 792/4443 require a quote of the offending packet.
//!
//! ## Timers and limits
//!
//! A flow is removed after `--udp-timeout` (default [`DEFAULT_IDLE`], pasta's
//! `UDP_CONN_TIMEOUT`) without a datagram either way. The table bounds the number of flows;
//! the socket's own buffers bound what waits in it.

use std::io;
use std::time::Duration;

/// Per-flow UDP state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conn {
    /// Length of the last datagram's payload sent to the host (for ICMP error quotes).
    pub last_len: u16,
}

/// The ICMP error a host socket error stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Port unreachable (ICMPv4 3/3, ICMPv6 1/4).
    Port,
    /// Host unreachable (ICMPv4 3/1, ICMPv6 1/3).
    Host,
    /// Network unreachable (ICMPv4 3/0, ICMPv6 1/0).
    Net,
    /// Administratively prohibited (ICMPv4 3/13, ICMPv6 1/1): denied by policy.
    Prohibited,
}

/// Maps a host socket error to the ICMP error the guest gets, `None` for errors a real path
/// would not report (e.g. `ENOBUFS`).
#[must_use]
pub fn icmp_for(err: &io::Error) -> Option<Unreachable> {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Some(Unreachable::Port),
        Some(libc::EHOSTUNREACH) => Some(Unreachable::Host),
        Some(libc::ENETUNREACH) => Some(Unreachable::Net),
        Some(libc::EACCES | libc::EPERM) => Some(Unreachable::Prohibited),
        _ => None,
    }
}

/// Idle timeout of UDP flows unless `--udp-timeout` says otherwise.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(180);
/// The largest UDP payload (65535 - 8 - 20, IPv4's limit; IPv6 jumbograms are not used).
pub const MAX_PAYLOAD: usize = 65507;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_icmp() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(icmp_for(&e(libc::ECONNREFUSED)), Some(Unreachable::Port));
        assert_eq!(icmp_for(&e(libc::EHOSTUNREACH)), Some(Unreachable::Host));
        assert_eq!(icmp_for(&e(libc::ENETUNREACH)), Some(Unreachable::Net));
        assert_eq!(icmp_for(&e(libc::ENOBUFS)), None);
    }
}
