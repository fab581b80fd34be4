//! # Theory of operation
//!
//! The fast path's userspace half (`--ebpf`, eBPF part 2): it decides each new flow's first
//! packet, owns the reserved host ports, and ends the kernel's entries. It lives in the
//! data plane's thread, next to the engine's host sockets (`io::Sockets`), because the
//! decision is taken while the engine handles the first packet. The kernel half is
//! `forwarder-ebpf/src/programs.rs`; the set-up (veth, programs, uplinks) and the maps' key
//! layout are `ebpf`.
//!
//! The flows themselves are the engine's: a kernel flow is an entry of the one flow table
//! (`engine::Detail::Kernel`, same [`FlowId`]), the maps are its projection into the
//! kernel, and this module keeps per flow only what the kernel side needs — the two map
//! keys, the reservation socket, the state bits seen — like `io::Sockets` keeps a
//! userspace flow's socket. It reports closing and release to the engine
//! (`KernelEvent`), which updates and removes the flow.
//!
//! ## The decision (at the first packet, never later)
//!
//! The engine asks ([`crate::engine::Host::fast_path`]) for a TCP SYN or the first UDP
//! datagram of a flow whose policy target is the destination itself — not mapped (gateway →
//! host loopback, `--remote-forward`, DNS forward), not refused, not the guest's or
//! forwarder's own. Here it is refused too when:
//!
//! * the destination is a host-local address: the route to it leaves through loopback,
//!   which a connected UDP probe shows by choosing the destination itself as source (its
//!   replies would never cross an uplink's ingress);
//! * `--outbound-if` binds outbound sockets to a device (the kernel path follows the FIB);
//! * the kernel carries `--ebpf-max-flows` flows already (at most [`MAX_FLOWS`], the
//!   maps' size; each holds one reservation socket), or a map insert fails (map full): the
//!   flow stays in userspace, counted `fast_declined_full`. (Kernel flows are entries of
//!   the engine's one table too, so `--max-flows` bounds them with the rest.)
//!
//! Otherwise the host port is reserved by binding a real socket of the flow's protocol to
//! (source address the route picks — or `--outbound`'s —, port 0): the kernel chooses a
//! port P that nothing else on the host can bind or autobind while the socket lives. The
//! socket is never listened on or connected for TCP; for UDP the connected probe socket is
//! the reservation. Then the reverse entry (remote → host address:P) is inserted, then the
//! forward one (guest 5-tuple → host address:P), both `BPF_NOEXIST`, and the shell
//! re-injects the frame on an `AF_PACKET` socket bound to the tap: it goes through the
//! tap's TC egress again, hits, and is carried from the first byte. A TCP flow that began
//! in userspace never moves (the translation terminates two connections with different
//! sequence numbers); the engine only asks for SYNs.
//!
//! ## Lifecycle
//!
//! The programs set `SEEN_FIN_OUT`, `SEEN_FIN_IN` and `SEEN_RST` in the entries and push an
//! event on the ring buffer when a bit is new. [`FastPath::poll`] drains the events; once
//! per second [`FastPath::scan`] also reads each entry (events can be lost when the ring is
//! full) and:
//!
//! * a TCP flow with FIN both ways, or a RST, is *closing*: after the grace period
//!   (`--ebpf-grace`, default 60 s, the TIME_WAIT of the two ends) its forward entry, then
//!   its reverse entry are deleted, and only then is its port released (socket closed);
//! * a flow idle longer than its timeout (TCP [`TCP_IDLE`], UDP `--udp-timeout`) is ended
//!   the same way, at once, and so is a TCP flow the remote has not answered at all
//!   [`NO_REPLY_TIMEOUT`] after its SYN;
//! * a flow whose host address is no longer the host's (a socket cannot be bound to it) is
//!   ended at once: the guest's next packet reaches userspace, and a TCP one gets a RST.
//!
//! A new connection on a closing flow's tuple (the guest reusing its port): `tap_egress`
//! sees the SYN hit, clears the forward entry's bits and reports `SEEN_SYN`; the flow is
//! open again here and its reverse entry's bits are cleared.
//!
//! ## ICMP errors
//!
//! `uplink_ingress` translates ICMP errors that quote a fast-path flow and sends them to
//! the guest. One it cannot parse (a quoted IPv4 header with options) reaches the host's
//! stack: for UDP the reservation is a socket connected to the remote, so the kernel queues
//! the error on it; the socket is registered with the poller (a reservation token of
//! `io::token`, by flow) and read like a userspace UDP flow's socket
//! ([`FastPath::udp_socket`]): the engine sends the guest the same ICMP error the userspace
//! path would. A TCP reservation is not connected: such an error about a TCP flow is lost.
//!
//! ## Fragments
//!
//! The programs pass IP fragments on. A datagram the guest fragmented reaches the engine
//! reassembled, and goes out from the flow's reservation ([`FastPath::udp_socket`]): the
//! host's stack fragments it again, from the flow's address and port. Fragmented replies
//! are reassembled by the host's stack and queued on the same socket, which the data plane
//! drains into the engine like any UDP flow's; the engine sends them to the guest
//! (fragmenting beyond the MTU).
//!
//! ## Counters
//!
//! Here: `fast_declined_local`, `fast_declined_full`, `fast_failed` (socket errors),
//! `fast_closed`, `fast_expired`, `fast_events`; the engine counts `fast_tcp_flows`,
//! `fast_udp_flows`, `fast_flows` (now) and `fast_stray`; per-flow packets and bytes come
//! from the entries ([`FastPath::counters_of`]).
//!
//! ## Limits
//!
//! At most `--ebpf-max-flows` (≤ [`MAX_FLOWS`]) flows, one reservation socket each; the
//! events read per wakeup are bounded by the ring buffer's 256 KiB; the scan reads two
//! entries per flow per [`SCAN_INTERVAL`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use forwarder_ebpf::{
    Event, FlowKey, FlowValue, MAX_FAST_FLOWS, ReverseValue, SEEN_FIN_IN, SEEN_FIN_OUT, SEEN_RST,
    SEEN_SYN,
};
use nix::sys::socket::{SockFlag, SockType, SockaddrStorage, bind, connect, getsockname, socket};
use tracing::debug;

use crate::ebpf::{FastMaps, addr_bytes, forward_key};
use crate::engine::KernelEvent;
use crate::flow::{FlowId, Key, Protocol};

/// Flows carried by the kernel at once (the maps' size).
pub const MAX_FLOWS: usize = MAX_FAST_FLOWS as usize;
/// Idle timeout of an established fast-path TCP flow (no packet either way).
pub const TCP_IDLE: Duration = Duration::from_secs(7200);
/// A TCP flow with no packet from the remote this long after its SYN is ended (Linux gives
/// up a connect after about 127 s of SYN retries).
pub const NO_REPLY_TIMEOUT: Duration = Duration::from_secs(135);
/// Default grace period between a TCP flow's close and the release of its port.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// How often entries are read for state and idleness.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

const BPF_NOEXIST: u64 = 1;

/// The fast path's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Grace period after a TCP close before the entries and port go.
    pub grace: Duration,
    /// Idle timeout of UDP flows.
    pub udp_idle: Duration,
    /// Source address for IPv4 flows (`--outbound`).
    pub source4: Option<std::net::Ipv4Addr>,
    /// Source address for IPv6 flows.
    pub source6: Option<std::net::Ipv6Addr>,
    /// `--outbound-if` is set: nothing goes to the fast path.
    pub bound_to_device: bool,
    /// `--ebpf-max-flows`: how many flows the kernel carries at once (at most
    /// [`MAX_FLOWS`], the maps' size).
    pub max_flows: usize,
}

/// The fast path's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// First packets left in userspace: host-local destination.
    pub declined_local: u64,
    /// First packets left in userspace: table or map full.
    pub declined_full: u64,
    /// Reservation failed (socket error).
    pub failed: u64,
    /// Flows ended after a close and the grace period.
    pub closed: u64,
    /// Flows ended idle.
    pub expired: u64,
    /// Events read from the ring buffer.
    pub events: u64,
}

/// The kernel side of one fast-path flow: its entries' keys and its reservation. The
/// flow itself is the engine's (`Detail::Kernel`), keyed by the same [`FlowId`].
struct Entry {
    protocol: Protocol,
    forward: FlowKey,
    reverse: FlowKey,
    host: SocketAddr,
    /// The reservation: closing it frees the port.
    reserve: OwnedFd,
    state: u32,
    closing: Option<Instant>,
    created: Instant,
}

/// The userspace half of the fast path (see the module's theory of operation).
pub struct FastPath {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    reverse: BpfHashMap<MapData, FlowKey, ReverseValue>,
    events: RingBuf<MapData>,
    inject: OwnedFd,
    table: HashMap<FlowId, Entry>,
    /// The flow of each forward key, for the ring buffer's events.
    by_key: HashMap<FlowKey, FlowId>,
    settings: Settings,
    next_scan: Instant,
    registry: Option<mio::Registry>,
    /// Counters.
    pub counters: Counters,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("flows", &self.table.len())
            .finish_non_exhaustive()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
    })
}

impl FastPath {
    /// Takes the maps and socket `ebpf::start` prepared.
    ///
    /// # Errors
    ///
    /// A map of the wrong type (a build mismatch).
    pub fn new(maps: FastMaps, settings: Settings, now: Instant) -> anyhow::Result<Self> {
        Ok(Self {
            flows: BpfHashMap::try_from(maps.flows)?,
            reverse: BpfHashMap::try_from(maps.reverse)?,
            events: RingBuf::try_from(maps.events)?,
            inject: maps.inject,
            table: HashMap::new(),
            by_key: HashMap::new(),
            settings,
            next_scan: now + SCAN_INTERVAL,
            registry: None,
            counters: Counters::default(),
        })
    }

    /// The poller UDP reservations register with (their ICMP errors are relayed).
    pub fn set_registry(&mut self, registry: mio::Registry) {
        self.registry = Some(registry);
    }

    /// The ring buffer's descriptor, for the poller.
    #[must_use]
    pub fn events_fd(&self) -> std::os::fd::RawFd {
        self.events.as_raw_fd()
    }

    /// Whether no flow is carried by the kernel.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Decides the first packet of new flow `flow` with key `key` (see the theory of
    /// operation): the host address and port it leaves from when the kernel carries it
    /// from now on (the frame must then be re-injected), `None` when it stays in userspace.
    pub fn claim(&mut self, flow: FlowId, key: &Key, guest_mac: [u8; 6]) -> Option<SocketAddr> {
        if self.settings.bound_to_device || key.protocol == Protocol::Icmp {
            return None;
        }
        let fwd = forward_key(key);
        if self.by_key.contains_key(&fwd) {
            // The engine's table has no flow for this key (it asked), so this is stale.
            return None;
        }
        if self.table.len() >= self.settings.max_flows.min(MAX_FLOWS) {
            self.counters.declined_full += 1;
            return None;
        }
        let remote = SocketAddr::new(key.remote_addr, key.remote_port);
        let (reserve, host) = match self.reserve(key.protocol, remote) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.counters.declined_local += 1;
                return None;
            }
            Err(err) => {
                debug!(%err, %remote, "fast path: reserving a port failed");
                self.counters.failed += 1;
                return None;
            }
        };
        let reverse = FlowKey {
            saddr: fwd.daddr,
            daddr: addr_bytes(host.ip()),
            sport: fwd.dport,
            dport: host.port().to_be_bytes(),
            proto: fwd.proto,
            family: fwd.family,
            _pad: [0; 2],
        };
        let rev_value = ReverseValue {
            guest_addr: fwd.saddr,
            guest_port: fwd.sport,
            guest_mac,
            last_seen: monotonic_ns(),
            ..ReverseValue::default()
        };
        let fwd_value = FlowValue {
            nat_addr: reverse.daddr,
            nat_port: reverse.dport,
            last_seen: monotonic_ns(),
            ..FlowValue::default()
        };
        // Reverse first: a reply can never find a forward entry without its way back.
        if let Err(err) = self.reverse.insert(reverse, rev_value, BPF_NOEXIST) {
            debug!(%err, "fast path: reverse entry refused");
            self.counters.declined_full += 1;
            return None;
        }
        if let Err(err) = self.flows.insert(fwd, fwd_value, BPF_NOEXIST) {
            debug!(%err, "fast path: forward entry refused");
            let _ = self.reverse.remove(&reverse);
            self.counters.declined_full += 1;
            return None;
        }
        if key.protocol == Protocol::Udp {
            // Errors the programs do not translate, and fragmented replies, are queued on it.
            if let Some(r) = &self.registry
                && let Err(err) = r.register(
                    &mut mio::unix::SourceFd(&reserve.as_raw_fd()),
                    super::token::reservation(flow),
                    mio::Interest::READABLE,
                )
            {
                debug!(%err, "fast path: ICMP errors of this flow are not relayed");
            }
        }
        debug!(flow = flow.0, guest = %SocketAddr::new(key.guest_addr, key.guest_port), %remote, %host, "new kernel flow");
        self.by_key.insert(fwd, flow);
        self.table.insert(
            flow,
            Entry {
                protocol: key.protocol,
                forward: fwd,
                reverse,
                host,
                reserve,
                state: 0,
                closing: None,
                created: Instant::now(),
            },
        );
        Some(host)
    }

    /// Reserves a host port for a flow to `remote`: `None` when `remote` is host-local.
    fn reserve(
        &self,
        protocol: Protocol,
        remote: SocketAddr,
    ) -> std::io::Result<Option<(OwnedFd, SocketAddr)>> {
        let family = super::family(remote);
        let source: Option<IpAddr> = match remote.ip() {
            IpAddr::V4(_) => self.settings.source4.map(IpAddr::V4),
            IpAddr::V6(_) => self.settings.source6.map(IpAddr::V6),
        };
        // The route's choice of source, from a connected UDP socket (no packet is sent).
        let probe = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        if let Some(src) = source {
            bind(
                probe.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(src, 0)),
            )?;
        }
        connect(probe.as_raw_fd(), &SockaddrStorage::from(remote))?;
        let local = sockaddr(&getsockname::<SockaddrStorage>(probe.as_raw_fd())?)?;
        if local.ip() == remote.ip() || local.ip().is_loopback() {
            return Ok(None);
        }
        if protocol == Protocol::Udp {
            return Ok(Some((probe, local)));
        }
        let reserve = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        bind(
            reserve.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(local.ip(), 0)),
        )?;
        let host = sockaddr(&getsockname::<SockaddrStorage>(reserve.as_raw_fd())?)?;
        Ok(Some((reserve, host)))
    }

    /// Sends the first frame again through the tap's TC egress, where it now hits.
    pub fn reinject(&self, frame: &[u8]) {
        if let Err(err) = nix::sys::socket::send(
            self.inject.as_raw_fd(),
            frame,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            debug!(%err, "fast path: re-injecting a first frame failed");
        }
    }

    /// The reservation socket of kernel UDP flow `flow`. Connected to the remote, it is the
    /// flow's socket on the host: a datagram of the flow that reached userspace (the guest
    /// fragmented it) leaves through it, and what the host's stack queues on it (fragmented
    /// replies, ICMP errors the programs did not translate) is read from it, as from a
    /// userspace UDP flow's socket. `None` for any other flow.
    #[must_use]
    pub fn udp_socket(&self, flow: FlowId) -> Option<&OwnedFd> {
        let e = self.table.get(&flow)?;
        (e.protocol == Protocol::Udp).then_some(&e.reserve)
    }

    /// Packets and bytes out of and into the namespace of flow `flow`, read from its
    /// entries.
    #[must_use]
    pub fn counters_of(&self, flow: FlowId) -> Option<[u64; 4]> {
        let e = self.table.get(&flow)?;
        let f = self.flows.get(&e.forward, 0).unwrap_or_default();
        let r = self.reverse.get(&e.reverse, 0).unwrap_or_default();
        Some([f.packets, f.bytes, r.packets, r.bytes])
    }

    /// Drains the ring buffer, and at most once per [`SCAN_INTERVAL`] scans the entries;
    /// returns what the engine must learn: flows now closing, flows ended.
    pub fn poll(&mut self, now: Instant) -> Vec<(FlowId, KernelEvent)> {
        let mut out = Vec::new();
        // At most the ring's size in events (256 KiB of 48-byte records).
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            events.extend(parse_event(&item));
        }
        for event in events {
            self.counters.events += 1;
            let Some(flow) = self.by_key.get(&event.key).copied() else {
                continue;
            };
            if event.state & SEEN_SYN != 0 {
                self.reopen(flow);
                continue;
            }
            if let Some(e) = self.table.get_mut(&flow) {
                e.state |= event.state;
                if closed(e.state) && e.closing.is_none() {
                    e.closing = Some(now);
                    out.push((flow, KernelEvent::Closing));
                }
            }
        }
        if now >= self.next_scan {
            self.next_scan = now + SCAN_INTERVAL;
            self.scan(now, &mut out);
        }
        out
    }

    /// The guest opened a connection again on a closing flow's tuple (the program saw its
    /// SYN and cleared the forward entry's bits): the flow is open again.
    fn reopen(&mut self, flow: FlowId) {
        let Some(e) = self.table.get_mut(&flow) else {
            return;
        };
        e.state = 0;
        e.closing = None;
        if let Ok(mut v) = self.reverse.get(&e.reverse, 0) {
            v.state = 0;
            let _ = self.reverse.insert(e.reverse, v, 0);
        }
    }

    /// Reads every entry's state and last packet; ends closed flows after the grace
    /// period, idle and unanswered ones at once.
    fn scan(&mut self, now: Instant, out: &mut Vec<(FlowId, KernelEvent)>) {
        let mono = monotonic_ns();
        let mut end = Vec::new();
        // A host address that is gone (the interface lost it): its flows cannot work any
        // more; ending them now lets the guest's next packet get a RST from userspace.
        let mut gone: Vec<IpAddr> = Vec::new();
        let mut checked: Vec<IpAddr> = Vec::new();
        for e in self.table.values() {
            let ip = e.host.ip();
            if !checked.contains(&ip) {
                checked.push(ip);
                if !is_local(ip) {
                    gone.push(ip);
                }
            }
        }
        for (flow, e) in &mut self.table {
            if gone.contains(&e.host.ip()) {
                end.push((*flow, false));
                continue;
            }
            let (f, r) = (
                self.flows.get(&e.forward, 0).ok(),
                self.reverse.get(&e.reverse, 0).ok(),
            );
            let (Some(f), Some(r)) = (f, r) else {
                // Deleted behind our back: nothing carries it any more.
                end.push((*flow, false));
                continue;
            };
            e.state |= f.state | r.state;
            if closed(e.state) && e.closing.is_none() {
                e.closing = Some(now);
                out.push((*flow, KernelEvent::Closing));
            }
            let seen = Seen {
                closing_for: e.closing.map(|t| now.saturating_duration_since(t)),
                idle_for: Duration::from_nanos(mono.saturating_sub(f.last_seen.max(r.last_seen))),
                age: now.saturating_duration_since(e.created),
                replies: r.packets,
            };
            match fate(e.protocol, &seen, &self.settings) {
                Fate::Keep => {}
                Fate::Closed => end.push((*flow, true)),
                Fate::Expired => end.push((*flow, false)),
            }
        }
        for (flow, was_closed) in end {
            self.remove(flow);
            out.push((flow, KernelEvent::Ended));
            if was_closed {
                self.counters.closed += 1;
            } else {
                self.counters.expired += 1;
            }
        }
    }

    /// Ends a flow: forward entry, reverse entry, then the port.
    fn remove(&mut self, flow: FlowId) {
        if let Some(e) = self.table.remove(&flow) {
            self.by_key.remove(&e.forward);
            let _ = self.flows.remove(&e.forward);
            let _ = self.reverse.remove(&e.reverse);
            if e.protocol == Protocol::Udp
                && let Some(r) = &self.registry
            {
                let _ = r.deregister(&mut mio::unix::SourceFd(&e.reserve.as_raw_fd()));
            }
            debug!(flow = flow.0, host = %e.host, "kernel flow released");
        }
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        let flows: Vec<FlowId> = self.table.keys().copied().collect();
        for flow in flows {
            self.remove(flow);
        }
    }
}

/// Whether `ip` is still an address of this host: a socket can be bound to it.
fn is_local(ip: IpAddr) -> bool {
    let family = super::family(SocketAddr::new(ip, 0));
    let Ok(probe) = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None) else {
        return true;
    };
    !matches!(
        bind(
            probe.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(ip, 0))
        ),
        Err(nix::errno::Errno::EADDRNOTAVAIL)
    )
}

/// What the scan knows of a flow.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// How long since it was seen closed (FIN both ways or RST), if it was.
    closing_for: Option<Duration>,
    /// How long since its last packet either way.
    idle_for: Duration,
    /// How long since it was handed to the kernel.
    age: Duration,
    /// Packets from the remote so far.
    replies: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    /// Closed and past the grace period.
    Closed,
    /// Idle, or never answered.
    Expired,
}

/// The scan's rule for one flow: closed flows go after the grace period, idle ones after
/// their protocol's timeout, and a TCP flow the remote never answered after
/// [`NO_REPLY_TIMEOUT`] (its SYN retries are over; without this rule a guest sending SYNs to
/// silent addresses would hold ports and entries for [`TCP_IDLE`]).
fn fate(protocol: Protocol, seen: &Seen, settings: &Settings) -> Fate {
    if seen.closing_for.is_some_and(|d| d >= settings.grace) {
        return Fate::Closed;
    }
    let idle = match protocol {
        Protocol::Tcp => TCP_IDLE,
        _ => settings.udp_idle,
    };
    if seen.idle_for >= idle
        || (protocol == Protocol::Tcp && seen.replies == 0 && seen.age >= NO_REPLY_TIMEOUT)
    {
        return Fate::Expired;
    }
    Fate::Keep
}

/// FIN both ways, or a RST.
fn closed(state: u32) -> bool {
    state & SEEN_RST != 0 || state & (SEEN_FIN_OUT | SEEN_FIN_IN) == (SEEN_FIN_OUT | SEEN_FIN_IN)
}

fn sockaddr(s: &SockaddrStorage) -> std::io::Result<SocketAddr> {
    super::std_addr(s).ok_or_else(|| std::io::ErrorKind::InvalidData.into())
}

/// An [`Event`] from its bytes (`#[repr(C)]`: key 40 bytes, then the state, native order).
fn parse_event(bytes: &[u8]) -> Option<Event> {
    let mut key = FlowKey::default();
    key.saddr.copy_from_slice(bytes.get(0..16)?);
    key.daddr.copy_from_slice(bytes.get(16..32)?);
    key.sport.copy_from_slice(bytes.get(32..34)?);
    key.dport.copy_from_slice(bytes.get(34..36)?);
    key.proto = *bytes.get(36)?;
    key.family = *bytes.get(37)?;
    let state = u32::from_ne_bytes(bytes.get(40..44)?.try_into().ok()?);
    Some(Event { key, state })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_ipv4_in_the_first_four_bytes_and_ports_in_network_order() {
        let key = Key {
            protocol: Protocol::Tcp,
            guest_addr: "198.51.100.2".parse().unwrap(),
            guest_port: 40000,
            remote_addr: "203.0.113.1".parse().unwrap(),
            remote_port: 5201,
        };
        let k = forward_key(&key);
        assert_eq!(&k.saddr[..4], &[198, 51, 100, 2]);
        assert!(k.saddr[4..].iter().all(|b| *b == 0));
        assert_eq!(k.dport, [0x14, 0x51]);
        assert_eq!((k.proto, k.family), (6, 4));
        let k6 = forward_key(&Key {
            protocol: Protocol::Udp,
            guest_addr: "2001:db8:1::2".parse().unwrap(),
            remote_addr: "2001:db8:2::1".parse().unwrap(),
            ..key
        });
        assert_eq!((k6.proto, k6.family), (17, 6));
        assert_eq!(
            k6.daddr,
            "2001:db8:2::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn events_parse_from_their_repr_c_bytes_and_short_ones_are_refused() {
        let mut bytes = vec![0u8; 44];
        bytes[0] = 198;
        bytes[36] = 6;
        bytes[37] = 4;
        bytes[40..44].copy_from_slice(&SEEN_RST.to_ne_bytes());
        let e = parse_event(&bytes).unwrap();
        assert_eq!((e.key.saddr[0], e.key.proto, e.state), (198, 6, SEEN_RST));
        assert!(parse_event(&bytes[..43]).is_none());
    }

    #[test]
    fn the_scan_ends_closed_idle_and_unanswered_flows_and_keeps_the_rest() {
        let settings = Settings {
            grace: Duration::from_secs(60),
            udp_idle: Duration::from_secs(180),
            ..Settings::default()
        };
        let s = |closing: Option<u64>, idle: u64, age: u64, replies: u64| Seen {
            closing_for: closing.map(Duration::from_secs),
            idle_for: Duration::from_secs(idle),
            age: Duration::from_secs(age),
            replies,
        };
        let tcp = |seen| fate(Protocol::Tcp, &seen, &settings);
        let udp = |seen| fate(Protocol::Udp, &seen, &settings);
        assert_eq!(tcp(s(None, 0, 10, 5)), Fate::Keep);
        assert_eq!(
            tcp(s(Some(59), 59, 100, 5)),
            Fate::Keep,
            "within the grace period"
        );
        assert_eq!(tcp(s(Some(60), 60, 100, 5)), Fate::Closed);
        assert_eq!(tcp(s(None, 7199, 8000, 5)), Fate::Keep, "idle under 2 h");
        assert_eq!(tcp(s(None, 7200, 8000, 5)), Fate::Expired);
        assert_eq!(
            tcp(s(None, 1, 134, 0)),
            Fate::Keep,
            "SYN retries still running"
        );
        assert_eq!(tcp(s(None, 1, 135, 0)), Fate::Expired, "never answered");
        assert_eq!(udp(s(None, 1, 1000, 0)), Fate::Keep, "UDP needs no answer");
        assert_eq!(udp(s(None, 180, 1000, 3)), Fate::Expired);
    }

    #[test]
    fn a_flow_is_closed_by_fin_both_ways_or_rst() {
        assert!(!closed(0));
        assert!(!closed(SEEN_FIN_OUT));
        assert!(!closed(SEEN_FIN_IN));
        assert!(closed(SEEN_FIN_OUT | SEEN_FIN_IN));
        assert!(closed(SEEN_RST));
    }
}
