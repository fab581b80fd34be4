//! Forwarded ports' sockets: [`Listener`] (a bound `-t`/`-u` socket on the host, or a
//! `-T`/`-U` socket bound in the namespace) and the binding rules — all or nothing for
//! explicit ports ([`bind_forwards`]), best effort for `all` ([`bind_best_effort`]), one
//! dual-stack socket for a port without an address. The control plane binds (`control`,
//! with the namespace agent for the namespace side) and hands the listeners to the data
//! plane ([`super::Command::AddForward`]), which serves them.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result};
use nix::sys::socket::{SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt};
use tracing::{info, warn};

use super::family;

/// A bound forwarded-port socket (see `forward`).
#[derive(Debug)]
pub struct Listener {
    pub(super) socket: ListenSocket,
    pub(super) ns_port: u16,
    /// `-t`/`-u`: the namespace address clients go to (`None`: the guest's).
    pub(super) ns_addr: Option<std::net::IpAddr>,
}

#[derive(Debug)]
pub(super) enum ListenSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
    /// `-T`: bound in the namespace; connections are spliced to the host's loopback.
    NsTcp(std::net::TcpListener),
    /// `-U`: bound in the namespace; datagrams are relayed to the host's loopback.
    NsUdp(std::net::UdpSocket),
}

impl Listener {
    /// A `-T` listening socket (`udp`: a `-U` socket) bound in the namespace, relaying to
    /// host port `to`.
    #[must_use]
    pub fn namespace(fd: OwnedFd, to: u16, udp: bool) -> Self {
        let socket = if udp {
            ListenSocket::NsUdp(std::net::UdpSocket::from(fd))
        } else {
            ListenSocket::NsTcp(std::net::TcpListener::from(fd))
        };
        Self {
            socket,
            ns_port: to,
            ns_addr: None,
        }
    }

    /// A `-t` listening socket (`udp`: a `-u` socket) bound on the host, forwarding to
    /// namespace port `to`.
    fn host(fd: OwnedFd, to: crate::forward::Dest, udp: bool) -> Self {
        let socket = if udp {
            ListenSocket::Udp(std::net::UdpSocket::from(fd))
        } else {
            ListenSocket::Tcp(std::net::TcpListener::from(fd))
        };
        Self {
            socket,
            ns_port: to.port,
            ns_addr: to.addr,
        }
    }

    /// Where this port's clients go in the namespace.
    pub(super) fn dest(&self) -> crate::forward::Dest {
        crate::forward::Dest {
            addr: self.ns_addr,
            port: self.ns_port,
        }
    }

    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        match &self.socket {
            ListenSocket::Tcp(t) | ListenSocket::NsTcp(t) => t.as_raw_fd(),
            ListenSocket::Udp(u) | ListenSocket::NsUdp(u) => u.as_raw_fd(),
        }
    }
}

/// A non-blocking UDP socket bound to `addr` (IPv6 only for IPv6 addresses).
///
/// # Errors
///
/// The socket call that failed (e.g. the address is in use).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    bound_socket(addr, SockType::Datagram, true, None)
}

/// A non-blocking TCP listening socket on `addr` (IPv6 only for IPv6 addresses).
///
/// # Errors
///
/// The socket call that failed (e.g. the address is in use).
pub fn listen_tcp(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    bound_socket(addr, SockType::Stream, true, None)
}

/// Binds the forwarded ports `maps` (UDP with `udp`, else TCP), all or nothing: the first
/// port that cannot be bound is the error, and the sockets bound before it are closed when
/// the partial list is dropped.
///
/// # Errors
///
/// Naming the protocol, address and port that failed (e.g. already in use).
pub fn bind_forwards(maps: &[crate::forward::PortMap], udp: bool) -> Result<Vec<Listener>> {
    let name = if udp { "udp" } else { "tcp" };
    maps.iter()
        .map(|m| {
            let fd = bind_one(m, udp).with_context(|| {
                let on = match (m.bind, m.iface) {
                    (Some(a), Some(i)) => format!(" on {a}%{}", i.as_str()),
                    (Some(a), None) => format!(" on {a}"),
                    (None, Some(i)) => format!(" on %{}", i.as_str()),
                    (None, None) => String::new(),
                };
                format!("forward {name} port {}{on}", m.listen)
            })?;
            Ok(Listener::host(fd, m.dest(), udp))
        })
        .collect()
}

/// Binds what it can of `maps` (`all`): ports that fail are skipped and counted, and at
/// the open-file limit binding stops with what it has. Returns the sockets and the
/// forwards they serve.
///
/// # Errors
///
/// When not one port could be bound.
pub fn bind_best_effort(
    maps: &[crate::forward::PortMap],
    udp: bool,
) -> Result<(Vec<Listener>, Vec<crate::forward::PortMap>)> {
    let mut out = Vec::new();
    let mut bound = Vec::new();
    let mut skipped = 0usize;
    for m in maps {
        match bind_one(m, udp) {
            Ok(fd) => {
                out.push(Listener::host(fd, m.dest(), udp));
                bound.push(*m);
            }
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => {
                // Out of descriptors: forward what was bound (as pasta does), less
                // `FD_RESERVE` given back for the flows, the helpers and the control
                // sockets, and say so.
                let keep = out.len().saturating_sub(FD_RESERVE);
                out.truncate(keep);
                bound.truncate(keep);
                warn!(
                    bound = out.len(),
                    left = maps.len() - out.len() - skipped,
                    "all: the open-file limit is reached; the ports bound so far are forwarded (raise ulimit -Hn for more)"
                );
                break;
            }
            Err(_) => skipped += 1,
        }
    }
    if out.is_empty() && !maps.is_empty() {
        anyhow::bail!(
            "all: none of {} {} ports could be bound",
            maps.len(),
            if udp { "udp" } else { "tcp" }
        );
    }
    info!(
        bound = out.len(),
        skipped,
        proto = if udp { "udp" } else { "tcp" },
        "all: ports bound"
    );
    Ok((out, bound))
}

fn bind_one(m: &crate::forward::PortMap, udp: bool) -> std::io::Result<OwnedFd> {
    let ty = if udp {
        SockType::Datagram
    } else {
        SockType::Stream
    };
    let iface = m.iface.as_ref().map(crate::forward::IfName::as_str);
    match m.bind {
        Some(a) => bound_socket(SocketAddr::new(a, m.listen), ty, true, iface),
        // One dual-stack socket: IPv4 clients arrive as IPv4-mapped addresses; IPv4 only
        // where the host has no IPv6.
        None => match bound_socket(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, m.listen)),
            ty,
            false,
            iface,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => bound_socket(
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, m.listen)),
                ty,
                true,
                iface,
            ),
            other => other,
        },
    }
}

/// `--freebind`, for every forwarded-port socket bound from now on (a process-wide
/// setting, set once at start-up before the first bind).
static FREEBIND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns `--freebind` on or off.
pub fn set_freebind(on: bool) {
    FREEBIND.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether listening sockets can be bound to an interface here (`SO_BINDTODEVICE`
/// without privileges needs Linux 5.7): pasta's interface capability.
#[must_use]
pub fn can_bind_to_device() -> bool {
    socket(
        nix::sys::socket::AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .is_ok_and(|fd| setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from("lo")).is_ok())
}

/// A non-blocking socket bound to `addr` (and listening, for TCP), on interface `iface`
/// if given; an IPv6 socket takes IPv4-mapped clients unless `v6_only`.
fn bound_socket(
    addr: SocketAddr,
    ty: SockType,
    v6_only: bool,
    iface: Option<&str>,
) -> std::io::Result<OwnedFd> {
    let fd = socket(
        family(addr),
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &v6_only)?;
    }
    if let Some(name) = iface {
        setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(name))?;
    }
    // IP_FREEBIND is honoured by IPv6 sockets' bind too (Linux shares the flag).
    if FREEBIND.load(std::sync::atomic::Ordering::Relaxed) {
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
    }
    let stream = ty == SockType::Stream;
    if stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    if stream {
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(LISTEN_BACKLOG)?)?;
    }
    Ok(fd)
}

/// Descriptors `all` leaves free when it reaches the open-file limit: the flows' sockets,
/// the namespace helpers and the control sockets need them.
pub const FD_RESERVE: usize = 1024;

/// Connections accepted (or datagrams received) per forwarded port per wakeup.
pub const ACCEPT_BATCH: usize = 64;
/// Backlog of forwarded TCP ports.
pub const LISTEN_BACKLOG: i32 = 128;
