//! # Theory of operation
//!
//! The one flow table (STYLE A2). A flow is a conversation the namespace started, seen from
//! both ends: the **tap side** (the guest's address and port or echo id) and the **host
//! side** (the address and port the host socket talks to, which differs from what the guest
//! named when the destination is mapped, e.g. the gateway to the host's loopback). Its
//! **origin** says which side started it: the tap for what the namespace opens, the host for
//! inbound port forwards (then the host side is the real client). TCP, UDP and ICMP echo
//! flows all live here.
//!
//! ## State
//!
//! Common fields, owned here and nowhere else: the tap-side [`Key`], the two [`Side`]s, the
//! lifecycle [`State`], the last time the flow carried traffic, and the flow's next
//! deadline. They are private: others read them through accessors and move the state only
//! by the transitions [`Flow::activate`] and [`Flow::mark_closing`]. Per-protocol state (the TCP translation's sequence space, a UDP flow's last
//! datagram) is the type parameter `T`, owned by the protocol module (`flow::tcp`,
//! `flow::udp`) through [`Flow::ext`]. Flows are found by their tap-side [`Key`] (what a
//! frame from the guest names) and by their [`FlowId`] (what a host socket's event names).
//! Ids are never reused, so an event for a flow that has gone is recognised as stale rather
//! than delivered to a newer flow in the same slot.
//!
//! ## Lifecycle
//!
//! `Opening` (host socket requested, e.g. a TCP connect in progress) → `Active` (traffic
//! passes both ways) → `Closing` (one side has finished: a FIN seen, an error being
//! reported) → removed. Removal is immediate once both sides are done; nothing lingers in a
//! TIME_WAIT (the host kernel keeps the host socket's TIME_WAIT, the guest kernel its own).
//! The state is a small enum and the key five plain fields so that the eBPF maps of the fast
//! path can mirror them.
//!
//! ## Timers
//!
//! Each flow has at most one deadline, set by its protocol module ([`Table::set_deadline`]):
//! the earliest of its retransmission, connect and idle timers. The table keeps a min-heap
//! of `(deadline, id)`; an entry is pushed only when a flow's deadline moves *earlier* than
//! the entry already queued for it, so a deadline that moves later on every packet (an idle
//! timer) costs nothing per packet: when its old entry comes due, [`Table::pop_due`] sees
//! the later deadline and re-queues it. Entries for removed flows or superseded deadlines are
//! discarded when they surface. When stale entries outnumber flows by [`HEAP_SLACK`] the heap
//! is rebuilt from the flows, so its size stays O(flows).
//!
//! ## Limits
//!
//! At most `max_flows` entries (`--max-flows`, default [`DEFAULT_MAX_FLOWS`]);
//! a new flow beyond that is refused (TCP gets a RST, UDP and echo are dropped) and the
//! engine counts `flow_table_full`. Existing flows are never evicted to make room.

pub mod tcp;
pub mod udp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A flow's identity for host events. Never reused within a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// ICMP or ICMPv6 echo (the "port" is the echo identifier).
    Icmp,
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

impl Protocol {
    /// Stable lowercase name for logs and listings.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Icmp => "icmp",
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// Where one side of a flow lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interface {
    /// The namespace's tap.
    Tap,
    /// A host socket.
    Host,
}

/// One end of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Side {
    /// Which interface this side is on.
    pub iface: Interface,
    /// Address of the peer on that interface.
    pub addr: IpAddr,
    /// Port (or echo identifier).
    pub port: u16,
}

/// The tap-side identity of a flow: what a frame from the guest names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Protocol.
    pub protocol: Protocol,
    /// The guest's address.
    pub guest_addr: IpAddr,
    /// The guest's port or echo identifier.
    pub guest_port: u16,
    /// The destination address the guest used.
    pub remote_addr: IpAddr,
    /// The destination port (0 for echo).
    pub remote_port: u16,
}

/// Lifecycle state of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host side has been requested but has carried nothing yet.
    Opening,
    /// Traffic passes both ways.
    Active,
    /// One side has finished; the flow goes once the other has too.
    Closing,
}

impl State {
    /// Stable lowercase name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Opening => "opening",
            Self::Active => "active",
            Self::Closing => "closing",
        }
    }
}

/// A tracked flow: the common fields, plus the protocol module's own state `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow<T> {
    key: Key,
    sides: [Side; 2],
    origin: Interface,
    state: State,
    last_seen: Instant,
    /// Per-protocol state, owned by the protocol's module.
    pub ext: T,
    deadline: Option<Instant>,
    queued: Option<Instant>,
}

impl<T> Flow<T> {
    /// The tap-side key.
    #[must_use]
    pub fn key(&self) -> Key {
        self.key
    }

    /// The side that started the flow: the tap for what the namespace opens, the host for
    /// inbound port forwards.
    #[must_use]
    pub fn origin(&self) -> Interface {
        self.origin
    }

    /// Lifecycle state.
    #[must_use]
    pub fn state(&self) -> State {
        self.state
    }

    /// Last time traffic passed in either direction.
    #[must_use]
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// Both sides carry traffic: `Opening` becomes `Active` (a later state stays).
    pub fn activate(&mut self) {
        if self.state == State::Opening {
            self.state = State::Active;
        }
    }

    /// One side has finished: the flow is `Closing` until it is removed.
    pub fn mark_closing(&mut self) {
        self.state = State::Closing;
    }

    /// The side that started the flow.
    #[must_use]
    pub fn initiator(&self) -> &Side {
        match self.origin {
            Interface::Tap => &self.sides[TAP],
            Interface::Host => &self.sides[HOST],
        }
    }

    /// The side the flow was opened toward.
    #[must_use]
    pub fn target(&self) -> &Side {
        match self.origin {
            Interface::Tap => &self.sides[HOST],
            Interface::Host => &self.sides[TAP],
        }
    }

    /// The flow's next deadline.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// The table is at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow table full ({0} flows)")]
pub struct Full(pub usize);

/// The flow table.
#[derive(Debug)]
pub struct Table<T> {
    flows: HashMap<FlowId, Flow<T>>,
    by_key: HashMap<Key, FlowId>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    next_id: u64,
    max: usize,
}

impl<T> Table<T> {
    /// An empty table holding at most `max` flows.
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self {
            flows: HashMap::new(),
            by_key: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
            max,
        }
    }

    /// The flow a tap-side key names.
    #[must_use]
    pub fn lookup(&self, key: &Key) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// Adds a flow in state `Opening`, started by the tap side, whose host side is `target`
    /// (the address and port the host socket talks to, after any mapping). Inbound flows set
    /// [`Flow::origin`] to the host afterwards.
    ///
    /// # Errors
    ///
    /// [`Full`] when the table is at its bound.
    pub fn insert(
        &mut self,
        now: Instant,
        key: Key,
        target: (IpAddr, u16),
        ext: T,
    ) -> Result<FlowId, Full> {
        self.insert_from(now, key, target, Interface::Tap, ext)
    }

    /// Inserts a flow a host-side client started (an inbound port forward): its host side
    /// is the client, the remote of `key`.
    ///
    /// # Errors
    ///
    /// [`Full`] when the table is at its bound.
    pub fn insert_inbound(&mut self, now: Instant, key: Key, ext: T) -> Result<FlowId, Full> {
        self.insert_from(
            now,
            key,
            (key.remote_addr, key.remote_port),
            Interface::Host,
            ext,
        )
    }

    fn insert_from(
        &mut self,
        now: Instant,
        key: Key,
        target: (IpAddr, u16),
        origin: Interface,
        ext: T,
    ) -> Result<FlowId, Full> {
        if self.flows.len() >= self.max {
            return Err(Full(self.max));
        }
        let id = FlowId(self.next_id);
        self.next_id += 1;
        let flow = Flow {
            key,
            sides: [
                Side {
                    iface: Interface::Tap,
                    addr: key.guest_addr,
                    port: key.guest_port,
                },
                Side {
                    iface: Interface::Host,
                    addr: target.0,
                    port: target.1,
                },
            ],
            origin,
            state: State::Opening,
            last_seen: now,
            ext,
            deadline: None,
            queued: None,
        };
        self.flows.insert(id, flow);
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// The flow with this id, if it still exists.
    #[must_use]
    pub fn get(&self, id: FlowId) -> Option<&Flow<T>> {
        self.flows.get(&id)
    }

    /// The flow with this id, mutably.
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow<T>> {
        self.flows.get_mut(&id)
    }

    /// Records traffic on a flow: it becomes `Active` (unless closing) and its idle timer
    /// restarts.
    pub fn touch(&mut self, id: FlowId, now: Instant) {
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.activate();
            flow.last_seen = now;
        }
    }

    /// Sets a flow's next deadline (`None`: no timer).
    pub fn set_deadline(&mut self, id: FlowId, deadline: Option<Instant>) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.deadline = deadline;
        if let Some(d) = deadline
            && flow.queued.is_none_or(|q| d < q)
        {
            flow.queued = Some(d);
            self.timers.push(Reverse((d, id)));
            if self.timers.len() > HEAP_SLACK * (self.flows.len() + 1) {
                self.rebuild_timers();
            }
        }
    }

    /// The earliest queued deadline (possibly a superseded one: waking early is harmless).
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// The next flow whose deadline has come, if any. Its deadline is cleared; the caller
    /// runs the flow's timers and sets the next one.
    pub fn pop_due(&mut self, now: Instant) -> Option<FlowId> {
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                return None;
            }
            self.timers.pop();
            let Some(flow) = self.flows.get_mut(&id) else {
                continue;
            };
            if flow.queued != Some(t) {
                continue;
            }
            flow.queued = None;
            match flow.deadline {
                Some(d) if d <= now => {
                    flow.deadline = None;
                    return Some(id);
                }
                Some(d) => {
                    flow.queued = Some(d);
                    self.timers.push(Reverse((d, id)));
                }
                None => {}
            }
        }
        None
    }

    /// Removes a flow.
    pub fn remove(&mut self, id: FlowId) -> Option<Flow<T>> {
        let flow = self.flows.remove(&id)?;
        self.by_key.remove(&flow.key);
        Some(flow)
    }

    /// Every flow, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &Flow<T>)> {
        self.flows.iter().map(|(id, f)| (*id, f))
    }

    /// Number of flows.
    #[must_use]
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether the table is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Number of queued timer entries (for tests of the heap bound).
    #[must_use]
    pub fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    fn rebuild_timers(&mut self) {
        self.timers.clear();
        for (id, flow) in &mut self.flows {
            flow.queued = flow.deadline;
            if let Some(d) = flow.deadline {
                self.timers.push(Reverse((d, *id)));
            }
        }
    }
}

/// Default bound on the flow table (`--max-flows`).
pub const DEFAULT_MAX_FLOWS: usize = 65536;
/// Index of the tap side among a flow's two sides.
pub const TAP: usize = 0;
/// Index of the host side among a flow's two sides.
pub const HOST: usize = 1;
/// Idle timeout of echo flows (Linux's ping socket lifetime is the process's; 60 s matches
/// the conntrack default for ICMP, 30 s, doubled for slow `ping -i`).
pub const ICMP_IDLE: Duration = Duration::from_secs(60);
/// Queued timer entries allowed per flow before the heap is rebuilt.
pub const HEAP_SLACK: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> Key {
        Key {
            protocol: Protocol::Icmp,
            guest_addr: "198.51.100.2".parse().unwrap(),
            guest_port: port,
            remote_addr: "203.0.113.1".parse().unwrap(),
            remote_port: 0,
        }
    }

    fn insert(table: &mut Table<()>, now: Instant, port: u16) -> Result<FlowId, Full> {
        let k = key(port);
        table.insert(now, k, (k.remote_addr, k.remote_port), ())
    }

    #[test]
    fn insert_lookup_touch_remove() {
        let t0 = Instant::now();
        let mut table = Table::new(8);
        let id = insert(&mut table, t0, 1).unwrap();
        assert_eq!(table.lookup(&key(1)), Some(id));
        assert_eq!(table.get(id).unwrap().state, State::Opening);
        assert_eq!(table.get(id).unwrap().target().addr, key(1).remote_addr);
        table.touch(id, t0 + Duration::from_secs(30));
        assert_eq!(table.get(id).unwrap().state, State::Active);
        table.remove(id);
        assert!(table.is_empty());
        assert_eq!(table.lookup(&key(1)), None);
    }

    #[test]
    fn bounded_and_ids_not_reused() {
        let t0 = Instant::now();
        let mut table = Table::new(2);
        let a = insert(&mut table, t0, 1).unwrap();
        insert(&mut table, t0, 2).unwrap();
        assert_eq!(insert(&mut table, t0, 3), Err(Full(2)));
        table.remove(a);
        let c = insert(&mut table, t0, 3).unwrap();
        assert_ne!(a, c);
        assert!(table.get(a).is_none());
    }

    #[test]
    fn deadlines_fire_in_order_and_later_deadlines_are_requeued() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut table = Table::new(8);
        let a = insert(&mut table, t0, 1).unwrap();
        let b = insert(&mut table, t0, 2).unwrap();
        table.set_deadline(a, Some(t0 + s(10)));
        table.set_deadline(b, Some(t0 + s(5)));
        // a's deadline moves later: no new entry, the old one is re-queued when it surfaces.
        table.set_deadline(a, Some(t0 + s(20)));
        assert_eq!(table.timer_entries(), 2);
        assert_eq!(table.next_deadline(), Some(t0 + s(5)));
        assert_eq!(table.pop_due(t0 + s(4)), None);
        assert_eq!(table.pop_due(t0 + s(12)), Some(b));
        assert_eq!(table.pop_due(t0 + s(12)), None, "a was re-queued for 20 s");
        assert_eq!(table.next_deadline(), Some(t0 + s(20)));
        assert_eq!(table.pop_due(t0 + s(20)), Some(a));
        assert_eq!(table.pop_due(t0 + s(99)), None);
    }

    #[test]
    fn removed_and_cleared_flows_do_not_fire() {
        let t0 = Instant::now();
        let mut table = Table::new(8);
        let a = insert(&mut table, t0, 1).unwrap();
        let b = insert(&mut table, t0, 2).unwrap();
        table.set_deadline(a, Some(t0));
        table.set_deadline(b, Some(t0));
        table.remove(a);
        table.set_deadline(b, None);
        assert_eq!(table.pop_due(t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn heap_stays_proportional_to_flows() {
        let t0 = Instant::now();
        let mut table = Table::new(8);
        let a = insert(&mut table, t0, 1).unwrap();
        // A deadline that keeps moving earlier pushes each time; the heap is rebuilt.
        for i in (0..1000u64).rev() {
            table.set_deadline(a, Some(t0 + Duration::from_millis(i)));
        }
        assert!(table.timer_entries() <= HEAP_SLACK * 2 + 1);
        assert_eq!(table.pop_due(t0), Some(a));
    }
}
