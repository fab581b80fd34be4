//! The engine's [`Host`] over real sockets: [`Sockets`] (every `impl` of it is here) with
//! its per-flow sockets (TCP with `SO_PEEK_OFF`, connected UDP, ping sockets), the
//! forwarded-port sockets it serves, what a kernel flow's reservation sends, and the TCP
//! socket operations the translation needs — among them the send space the window is built
//! from, a lower bound read from `SO_MEMINFO` ([`payload_space`]; `flow::tcp`, "Flow
//! control"). See the theory of operation in `io`.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, Shutdown, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    SockaddrStorage, connect, getsockopt, recvmsg, send, setsockopt, shutdown, socket, sockopt,
};

use super::listen::{ListenSocket, Listener};
use super::{Outbound, TCP_SNDBUF, fastpath, new_socket, splice, token};
use crate::engine::Host;
use crate::flow::{FlowId, tcp};
use crate::{sys, wire};

/// The flows' host sockets: the engine's [`Host`](crate::engine::Host).
pub struct Sockets {
    pub(super) registry: Registry,
    pub(super) map: HashMap<FlowId, Sock>,
    pub(super) outbound: Outbound,
    /// Forwarded-port sockets by key (see `token`), with the
    /// forward each belongs to.
    pub(super) listeners: HashMap<usize, (u32, Listener)>,
    pub(super) next_listener: usize,
    pub(super) accepted: Option<OwnedFd>,
    pub(super) relays: HashMap<usize, splice::Relay>,
    pub(super) next_relay: usize,
    /// The kernel's fast path (`--ebpf`), when it runs.
    pub(super) fast: Option<fastpath::FastPath>,
    /// The frame being handled was claimed by the fast path: send it again.
    pub(super) reinject: bool,
    /// Where echo requests are built before they are sent.
    pub(super) echo_buf: Vec<u8>,
}

impl Sockets {
    /// Registers the sockets of forward `id`.
    pub(super) fn add_forward(&mut self, id: u32, listeners: Vec<Listener>) -> std::io::Result<()> {
        for l in listeners {
            let key = self.next_listener;
            self.next_listener += 1;
            self.registry.register(
                &mut SourceFd(&l.raw_fd()),
                token::listener(key),
                Interest::READABLE,
            )?;
            self.listeners.insert(key, (id, l));
        }
        Ok(())
    }

    /// Closes the sockets of forward `id`.
    pub(super) fn remove_forward(&mut self, id: u32) {
        let keys: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, (f, _))| *f == id)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some((_, l)) = self.listeners.remove(&key) {
                let _ = self.registry.deregister(&mut SourceFd(&l.raw_fd()));
            }
        }
    }
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets")
            .field("sockets", &self.map.len())
            .finish_non_exhaustive()
    }
}

pub(super) enum Sock {
    Echo {
        fd: OwnedFd,
        v6: bool,
    },
    Tcp(TcpSock),
    Udp(OwnedFd),
    /// An inbound UDP flow: replies leave through forwarded-port socket `listener`.
    UdpVia {
        listener: usize,
        peer: SocketAddr,
    },
}

pub(super) struct TcpSock {
    fd: OwnedFd,
    /// The kernel's `SO_PEEK_OFF`, or `None` when the kernel lacks it for TCP.
    peek_off: Option<usize>,
    scratch: Vec<u8>,
}

impl Sockets {
    /// `flow`'s connected UDP socket: a userspace flow's own, or a kernel flow's
    /// reservation (`fastpath`).
    pub(super) fn udp_fd(&self, flow: FlowId) -> Option<&OwnedFd> {
        match self.map.get(&flow) {
            Some(Sock::Udp(fd)) => Some(fd),
            Some(_) => None,
            None => self.fast.as_ref()?.udp_socket(flow),
        }
    }

    pub(super) fn register(
        &self,
        flow: FlowId,
        fd: &OwnedFd,
        interest: Interest,
    ) -> std::io::Result<()> {
        self.registry
            .register(&mut SourceFd(&fd.as_raw_fd()), token::flow(flow), interest)
    }

    pub(super) fn new_socket(&self, target: SocketAddr, ty: SockType) -> std::io::Result<OwnedFd> {
        new_socket(&self.outbound, target, ty)
    }

    /// Makes `fd` (connecting or accepted) `flow`'s TCP socket: buffers, peek offset,
    /// registration.
    pub(super) fn adopt_tcp(&mut self, flow: FlowId, fd: OwnedFd) -> std::io::Result<()> {
        // A fixed, large send buffer: the window the guest sees is its free space, and an
        // autotuned buffer only grows once it has been filled — which a window that tracks
        // free space never does, so after a loss the guest would stay at two segments in
        // flight. Forced past `wmem_max` where allowed, else capped by it (pasta does the same).
        if setsockopt(&fd, sockopt::SndBufForce, &TCP_SNDBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::SndBuf, &TCP_SNDBUF);
        }
        let peek_off = sys::set_peek_off(&fd, 0).ok().map(|()| 0);
        self.register(flow, &fd, Interest::READABLE | Interest::WRITABLE)?;
        self.map.insert(
            flow,
            Sock::Tcp(TcpSock {
                fd,
                peek_off,
                scratch: Vec::new(),
            }),
        );
        Ok(())
    }

    pub(super) fn close(&mut self, flow: FlowId, abort: bool) {
        let Some(sock) = self.map.remove(&flow) else {
            return;
        };
        let fd = match &sock {
            Sock::Echo { fd, .. } | Sock::Udp(fd) => fd,
            Sock::Tcp(t) => &t.fd,
            // The forwarded-port socket stays: other clients use it.
            Sock::UdpVia { .. } => return,
        };
        let _ = self.registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
        if abort && matches!(sock, Sock::Tcp(_)) {
            reset(fd);
        }
    }
}

impl Host for Sockets {
    fn echo_open(&mut self, flow: FlowId, remote: IpAddr) -> std::io::Result<()> {
        let fd = open_ping(remote)?;
        self.register(flow, &fd, Interest::READABLE)?;
        self.map.insert(
            flow,
            Sock::Echo {
                fd,
                v6: remote.is_ipv6(),
            },
        );
        Ok(())
    }

    fn echo_send(&mut self, flow: FlowId, seq: u16, data: &[u8]) -> std::io::Result<()> {
        let Some(Sock::Echo { fd, v6 }) = self.map.get(&flow) else {
            return Err(std::io::ErrorKind::NotFound.into());
        };
        wire::build::echo_request(&mut self.echo_buf, *v6, seq, data);
        send(fd.as_raw_fd(), &self.echo_buf, MsgFlags::MSG_DONTWAIT)?;
        Ok(())
    }

    fn fast_path(
        &mut self,
        flow: FlowId,
        key: &crate::flow::Key,
        guest_mac: wire::EthernetAddress,
    ) -> Option<SocketAddr> {
        let host = self
            .fast
            .as_mut()
            .and_then(|f| f.claim(flow, key, guest_mac.0));
        self.reinject |= host.is_some();
        host
    }

    fn tcp_connect(&mut self, flow: FlowId, target: SocketAddr) -> std::io::Result<()> {
        let fd = self.new_socket(target, SockType::Stream)?;
        let _ = setsockopt(&fd, sockopt::TcpNoDelay, &true);
        match connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
            Ok(()) | Err(Errno::EINPROGRESS) => {}
            Err(err) => return Err(err.into()),
        }
        self.adopt_tcp(flow, fd)
    }

    fn tcp_connect_result(&mut self, flow: FlowId) -> std::io::Result<()> {
        let Some(Sock::Tcp(t)) = self.map.get(&flow) else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        match getsockopt(&t.fd, sockopt::SocketError)? {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }

    fn tcp_socket(&mut self, flow: FlowId) -> Option<&mut dyn tcp::HostSocket> {
        match self.map.get_mut(&flow) {
            Some(Sock::Tcp(t)) => Some(t),
            _ => None,
        }
    }

    fn udp_open(&mut self, flow: FlowId, target: SocketAddr) -> std::io::Result<()> {
        let fd = self.new_socket(target, SockType::Datagram)?;
        connect(fd.as_raw_fd(), &SockaddrStorage::from(target))?;
        self.register(flow, &fd, Interest::READABLE)?;
        self.map.insert(flow, Sock::Udp(fd));
        Ok(())
    }

    fn udp_send(&mut self, flow: FlowId, data: &[u8]) -> std::io::Result<()> {
        // A kernel flow's datagram reaching userspace (the guest fragmented it) leaves from
        // its reservation, with the flow's address and port.
        if let Some(fd) = self.udp_fd(flow) {
            send(fd.as_raw_fd(), data, MsgFlags::MSG_DONTWAIT)?;
            return Ok(());
        }
        match self.map.get(&flow) {
            Some(Sock::UdpVia { listener, peer }) => {
                let Some((
                    _,
                    Listener {
                        socket: ListenSocket::Udp(u),
                        ..
                    },
                )) = self.listeners.get(listener)
                else {
                    return Err(std::io::ErrorKind::NotConnected.into());
                };
                u.send_to(data, peer)?;
                Ok(())
            }
            _ => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    fn tcp_accepted(&mut self, flow: FlowId) -> std::io::Result<()> {
        let fd = self
            .accepted
            .take()
            .ok_or(std::io::ErrorKind::NotConnected)?;
        self.adopt_tcp(flow, fd)
    }

    fn udp_reply_via(&mut self, flow: FlowId, listener: usize, peer: SocketAddr) {
        self.map.insert(flow, Sock::UdpVia { listener, peer });
    }

    fn close(&mut self, flow: FlowId, abort: bool) {
        Sockets::close(self, flow, abort);
    }
}

impl tcp::HostSocket for TcpSock {
    fn send(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match send(
            self.fd.as_raw_fd(),
            data,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN) => Ok(0),
            Err(err) => Err(err.into()),
        }
    }

    fn peek(&mut self, offset: usize, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        if let Some(current) = self.peek_off {
            if current != offset {
                let off = i32::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
                sys::set_peek_off(&self.fd, off)?;
                self.peek_off = Some(offset);
            }
            let n = recvmsg::<()>(self.fd.as_raw_fd(), bufs, None, flags)?.bytes;
            self.peek_off = Some(offset + n);
            return Ok(n);
        }
        // No SO_PEEK_OFF for TCP on this kernel: peek the bytes before `offset` into a
        // scratch buffer in front of the real ones.
        self.scratch.resize(offset, 0);
        let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(bufs.len() + 1);
        iov.push(IoSliceMut::new(&mut self.scratch));
        for b in bufs.iter_mut() {
            iov.push(IoSliceMut::new(b));
        }
        let n = recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, None, flags)?.bytes;
        Ok(n.saturating_sub(offset))
    }

    fn discard(&mut self, n: usize) {
        let mut left = n;
        while left > 0 {
            match sys::discard(&self.fd, left) {
                Ok(0) | Err(_) => break,
                Ok(k) => left = left.saturating_sub(k),
            }
        }
        if let Some(off) = &mut self.peek_off {
            *off = off.saturating_sub(n - left);
        }
    }

    fn shutdown_write(&mut self) {
        let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Write);
    }

    fn send_space(&mut self) -> usize {
        let queued = sys::outq(&self.fd).ok();
        match sys::send_memory(&self.fd) {
            // An unknown queue is converted at the kernel's own assumption (as if empty).
            Ok((limit, used)) => payload_space(limit, used, queued.unwrap_or(0)),
            Err(_) => {
                let size = getsockopt(&self.fd, sockopt::SndBuf).unwrap_or(0);
                size.saturating_sub(queued.unwrap_or(size)) / 2
            }
        }
    }
}

/// The payload bytes a TCP socket will still take, from its send memory `limit` and `used`
/// (`SO_MEMINFO`, in the kernel's accounting: whole buffers) and the payload it holds
/// (`queued`, `SIOCOUTQ`). The kernel refuses a write once `used` reaches `limit`, and
/// `used` grows faster than the payload by the buffers' overhead: the free memory is
/// converted at the ratio the queue shows now (an empty queue at the kernel's own
/// assumption, half, which is why it doubles `SO_SNDBUF`), less one segment's worth for a
/// newer buffer that is emptier than the average. Never more than the truth, so what the
/// window promises the socket takes (`flow::tcp`, "Flow control").
fn payload_space(limit: usize, used: usize, queued: usize) -> usize {
    let free = limit.saturating_sub(used);
    let space = if used == 0 || queued == 0 {
        free / 2
    } else {
        // free × queued / used, in 128 bits (each factor fits 64).
        let scaled = (free as u128) * (queued.min(used) as u128) / (used as u128);
        usize::try_from(scaled).unwrap_or(usize::MAX)
    };
    space.saturating_sub(SPACE_MARGIN)
}

/// What [`payload_space`] keeps back: one 64 KiB buffer's overhead and then some.
const SPACE_MARGIN: usize = 64 << 10;

/// Makes the close of `fd` send a RST (`SO_LINGER {1, 0}`).
pub(super) fn reset(fd: &OwnedFd) {
    let _ = setsockopt(
        fd,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

pub(super) fn open_ping(remote: IpAddr) -> nix::Result<OwnedFd> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    match remote {
        IpAddr::V4(a) => {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Datagram,
                flags,
                SockProtocol::Icmp,
            )?;
            connect(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(a, 0)))?;
            Ok(fd)
        }
        IpAddr::V6(a) => {
            let fd = socket(
                AddressFamily::Inet6,
                SockType::Datagram,
                flags,
                SockProtocol::IcmpV6,
            )?;
            connect(
                fd.as_raw_fd(),
                &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, 0)),
            )?;
            Ok(fd)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SPACE_MARGIN, payload_space};

    #[test]
    fn send_space_is_free_memory_at_the_queue_s_payload_ratio_less_a_margin() {
        // An empty socket: half its memory, as the kernel itself assumes.
        assert_eq!(payload_space(8 << 20, 0, 0), (4 << 20) - SPACE_MARGIN);
        // 1 MiB of payload taking 1.5 MiB of memory: 6.5 MiB free is 4.33 MiB of payload.
        let (limit, used, queued) = (8 << 20, 3 << 19, 1 << 20);
        let want = (limit - used) * 2 / 3 - SPACE_MARGIN;
        assert_eq!(payload_space(limit, used, queued), want);
        // Full, or over its limit (the kernel lets one buffer overshoot): nothing.
        assert_eq!(payload_space(8 << 20, 8 << 20, 5 << 20), 0);
        assert_eq!(payload_space(8 << 20, 9 << 20, 5 << 20), 0);
        // The old reading, limit − payload, would have promised 7 MiB here.
        assert!(payload_space(8 << 20, 2 << 20, 1 << 20) < (7 << 20) / 2);
    }
}
