//! # Theory of operation
//!
//! The UDP side of the splice bypass (`-U/--udp-ns`): datagrams sent to a port bound on the
//! namespace's loopback reach the same-family loopback port on the host, and the answers go
//! back, with no L2 translation. As in pasta, datagrams move in batches: `recvmmsg(2)` takes
//! up to [`BATCH`] datagrams from a socket in one call and `sendmmsg(2)` passes a run of
//! them on in one call.
//!
//! ## Relays
//!
//! A relay is one namespace client (the bound socket's key plus the client's address and
//! port) and one host socket `connect()`ed to the target, so the host service sees one
//! stable peer per namespace client, and its answers come back on that socket: they are sent
//! to the client from the namespace socket with `sendmmsg` and explicit addresses. A relay
//! idle for `--udp-timeout` is closed (checked at most once a second by the data plane).
//!
//! ## Limits
//!
//! At most [`MAX_UDP_RELAYS`] relays; beyond that, datagrams from new clients are dropped
//! (logged at debug) until idle relays expire. A datagram larger than [`MAX_DATAGRAM`] is
//! truncated by the kernel (the buffer is the largest UDP payload, so none is).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use nix::sys::socket::{
    MsgFlags, MultiHeaders, SockType, SockaddrStorage, connect, recvmmsg, sendmmsg,
};
use tracing::debug;

use super::listen::{ListenSocket, Listener};
use super::{Outbound, new_socket, std_addr, token};

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 32;
/// Largest datagram relayed.
pub const MAX_DATAGRAM: usize = 65535;
/// Relays at once.
pub const MAX_UDP_RELAYS: usize = 4096;
/// How often idle relays are looked for.
const SWEEP: Duration = Duration::from_secs(1);

/// The `-U` relays of the data plane.
#[derive(Debug, Default)]
pub struct Relays {
    map: HashMap<usize, Relay>,
    by_peer: HashMap<(usize, SocketAddr), usize>,
    next: usize,
    bufs: Vec<Vec<u8>>,
    last_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Relay {
    fd: OwnedFd,
    listener: usize,
    peer: SocketAddr,
    last: Instant,
}

/// Receives up to [`BATCH`] datagrams into `bufs`; returns each one's length and sender.
fn recv_batch(fd: RawFd, bufs: &mut [Vec<u8>]) -> nix::Result<Vec<(usize, Option<SocketAddr>)>> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(b.as_mut_slice())])
        .collect();
    let got = recvmmsg(
        fd,
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    Ok(got
        .map(|m| (m.bytes, m.address.as_ref().and_then(std_addr)))
        .collect())
}

/// Sends `datagrams` (to `to`, or on a connected socket with `None`) in one call; returns
/// how many the kernel took.
fn send_batch(fd: RawFd, datagrams: &[&[u8]], to: Option<SocketAddr>) -> nix::Result<usize> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(datagrams.len(), None);
    let iovs: Vec<[IoSlice<'_>; 1]> = datagrams.iter().map(|d| [IoSlice::new(d)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = datagrams
        .iter()
        .map(|_| to.map(SockaddrStorage::from))
        .collect();
    let sent = sendmmsg(
        fd,
        &mut headers,
        iovs.iter(),
        addrs,
        [],
        MsgFlags::MSG_DONTWAIT,
    )?;
    Ok(sent.count())
}

/// What the relays use but do not own: the forwarded-port sockets (by key), the poller's
/// registry and the outbound binding of host sockets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ends<'a> {
    pub listeners: &'a HashMap<usize, (u32, Listener)>,
    pub registry: &'a Registry,
    pub outbound: &'a Outbound,
}

impl Relays {
    fn take_bufs(&mut self) -> Vec<Vec<u8>> {
        let mut bufs = std::mem::take(&mut self.bufs);
        if bufs.is_empty() {
            bufs = (0..BATCH).map(|_| vec![0; MAX_DATAGRAM]).collect();
        }
        bufs
    }

    /// A `-U` socket in the namespace is readable: relay what it holds to the host.
    pub(super) fn handle_namespace(&mut self, ends: Ends<'_>, now: Instant, key: usize) {
        let mut bufs = self.take_bufs();
        for _ in 0..(super::UDP_BATCH / BATCH).max(1) {
            let Some((_, l)) = ends.listeners.get(&key) else {
                break;
            };
            let ListenSocket::NsUdp(sock) = &l.socket else {
                break;
            };
            let to = l.ns_port;
            let got = match recv_batch(sock.as_raw_fd(), &mut bufs) {
                Ok(got) => got,
                Err(err) => {
                    if err != nix::errno::Errno::EAGAIN {
                        debug!(%err, "-U: receive in the namespace");
                    }
                    break;
                }
            };
            let full = got.len() == BATCH;
            // Runs of datagrams from one client go out with one sendmmsg.
            let mut i = 0;
            while let Some(&(_, Some(peer))) = got.get(i) {
                let run = got
                    .get(i..)
                    .unwrap_or_default()
                    .iter()
                    .take_while(|(_, p)| *p == Some(peer))
                    .count();
                let datagrams: Vec<&[u8]> = got
                    .get(i..i + run)
                    .unwrap_or_default()
                    .iter()
                    .zip(bufs.get(i..).unwrap_or_default())
                    .map(|((n, _), b)| b.get(..*n).unwrap_or_default())
                    .collect();
                if let Some(fd) = self.relay_for(ends, now, key, peer, to)
                    && let Err(err) = send_batch(fd, &datagrams, None)
                {
                    debug!(%err, %peer, "-U: send to the host");
                }
                i += run;
            }
            if !full {
                break;
            }
        }
        self.bufs = bufs;
    }

    /// The host socket of the relay for `peer` on listener `key`, opened on first use.
    fn relay_for(
        &mut self,
        ends: Ends<'_>,
        now: Instant,
        key: usize,
        peer: SocketAddr,
        to: u16,
    ) -> Option<RawFd> {
        if let Some(id) = self.by_peer.get(&(key, peer)) {
            let relay = self.map.get_mut(id)?;
            relay.last = now;
            return Some(relay.fd.as_raw_fd());
        }
        if self.map.len() >= MAX_UDP_RELAYS {
            debug!(%peer, "-U: too many relays, dropping a datagram");
            return None;
        }
        let target = if peer.is_ipv6() {
            SocketAddr::from((Ipv6Addr::LOCALHOST, to))
        } else {
            SocketAddr::from((Ipv4Addr::LOCALHOST, to))
        };
        let fd = match new_socket(ends.outbound, target, SockType::Datagram) {
            Ok(fd) => fd,
            Err(err) => {
                debug!(%err, "-U: host socket");
                return None;
            }
        };
        if let Err(err) = connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
            debug!(%err, %target, "-U: connect");
            return None;
        }
        let id = self.next;
        self.next = (id + 1) % (1 << 30);
        if let Err(err) = ends.registry.register(
            &mut SourceFd(&fd.as_raw_fd()),
            token::udp_relay(id),
            Interest::READABLE,
        ) {
            debug!(%err, "-U: register");
            return None;
        }
        let raw = fd.as_raw_fd();
        debug!(relay = id, %peer, %target, "-U relay");
        self.by_peer.insert((key, peer), id);
        self.map.insert(
            id,
            Relay {
                fd,
                listener: key,
                peer,
                last: now,
            },
        );
        Some(raw)
    }

    /// A relay's host socket is readable: pass the answers back to the namespace client.
    pub(super) fn handle_host(&mut self, ends: Ends<'_>, now: Instant, id: usize) {
        let mut bufs = self.take_bufs();
        for _ in 0..(super::UDP_BATCH / BATCH).max(2) {
            let Some(relay) = self.map.get_mut(&id) else {
                break;
            };
            relay.last = now;
            let (peer, key) = (relay.peer, relay.listener);
            let got = match recv_batch(relay.fd.as_raw_fd(), &mut bufs) {
                Ok(got) => got,
                Err(err) => {
                    if err != nix::errno::Errno::EAGAIN {
                        // E.g. ECONNREFUSED: nothing listens on the host port (yet).
                        debug!(%err, relay = id, "-U: receive from the host");
                        continue;
                    }
                    break;
                }
            };
            let full = got.len() == BATCH;
            let Some((_, l)) = ends.listeners.get(&key) else {
                break;
            };
            let ListenSocket::NsUdp(sock) = &l.socket else {
                break;
            };
            let datagrams: Vec<&[u8]> = got
                .iter()
                .zip(&bufs)
                .map(|((n, _), b)| b.get(..*n).unwrap_or_default())
                .collect();
            if let Err(err) = send_batch(sock.as_raw_fd(), &datagrams, Some(peer)) {
                debug!(%err, %peer, "-U: send in the namespace");
            }
            if !full {
                break;
            }
        }
        self.bufs = bufs;
    }

    /// Closes relays idle for longer than `--udp-timeout`, and those whose namespace socket
    /// was removed.
    pub(super) fn expire(&mut self, ends: Ends<'_>, now: Instant, idle: Duration) {
        let relays = self;
        if relays.map.is_empty()
            || relays
                .last_sweep
                .is_some_and(|t| now.saturating_duration_since(t) < SWEEP)
        {
            return;
        }
        relays.last_sweep = Some(now);
        let listeners = ends.listeners;
        let gone: Vec<usize> = relays
            .map
            .iter()
            .filter(|(_, r)| {
                now.saturating_duration_since(r.last) >= idle
                    || !listeners.contains_key(&r.listener)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(r) = relays.map.remove(&id) {
                relays.by_peer.remove(&(r.listener, r.peer));
                let _ = ends.registry.deregister(&mut SourceFd(&r.fd.as_raw_fd()));
                debug!(relay = id, "-U relay closed");
            }
        }
    }
}
