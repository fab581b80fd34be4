//! # Theory of operation
//!
//! The one flow table (STYLE A2). A flow is a conversation the namespace started, seen from
//! both ends: the **initiating side** (on the tap: the guest's address and port or echo id)
//! and the **target side** (on the host: the remote address and port the host socket talks
//! to). Today it tracks ICMP/ICMPv6 echo flows; the TCP and UDP translation adds its
//! per-protocol state next to the common fields kept here.
//!
//! ## State
//!
//! Common fields, owned here and nowhere else: protocol, the two sides, the lifecycle
//! [`State`], and the last time the flow carried traffic. Flows are found by their tap-side
//! [`Key`] (what a frame from the guest names) and by their [`FlowId`] (what a host socket's
//! event names). Ids are never reused, so an event for a flow that has gone is recognised as
//! stale rather than delivered to a newer flow in the same slot.
//!
//! ## Lifecycle
//!
//! `Opening` (host socket requested) → `Active` (first traffic through) → removed on idle
//! timeout ([`ICMP_IDLE`] for echo). The engine sweeps the table once per
//! [`SWEEP_INTERVAL`]; the sweep is O(flows), bounded by the table size.
//!
//! ## Limits
//!
//! At most `max_flows` entries (`--max-flows`); a new flow beyond that is refused and the
//! engine counts `flow_table_full`. Existing flows are never evicted to make room.

use std::collections::HashMap;
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
    /// Traffic has passed.
    Active,
}

/// A tracked flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Protocol.
    pub protocol: Protocol,
    /// Initiating side (tap) and target side (host).
    pub sides: [Side; 2],
    /// Lifecycle state.
    pub state: State,
    /// Last time traffic passed in either direction.
    pub last_seen: Instant,
}

impl Flow {
    /// The initiating (tap) side.
    #[must_use]
    pub fn initiator(&self) -> &Side {
        &self.sides[INITIATOR]
    }

    /// The target (host) side.
    #[must_use]
    pub fn target(&self) -> &Side {
        &self.sides[TARGET]
    }
}

/// The table is at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow table full ({0} flows)")]
pub struct Full(pub usize);

/// The flow table.
#[derive(Debug)]
pub struct Table {
    flows: HashMap<FlowId, (Key, Flow)>,
    by_key: HashMap<Key, FlowId>,
    next_id: u64,
    max: usize,
}

impl Table {
    /// An empty table holding at most `max` flows.
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self {
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            max,
        }
    }

    /// The flow a tap-side key names.
    #[must_use]
    pub fn lookup(&self, key: &Key) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// Adds a flow in state `Opening`.
    ///
    /// # Errors
    ///
    /// [`Full`] when the table is at its bound.
    pub fn insert(&mut self, now: Instant, key: Key) -> Result<FlowId, Full> {
        if self.flows.len() >= self.max {
            return Err(Full(self.max));
        }
        let id = FlowId(self.next_id);
        self.next_id += 1;
        let flow = Flow {
            protocol: key.protocol,
            sides: [
                Side {
                    iface: Interface::Tap,
                    addr: key.guest_addr,
                    port: key.guest_port,
                },
                Side {
                    iface: Interface::Host,
                    addr: key.remote_addr,
                    port: key.remote_port,
                },
            ],
            state: State::Opening,
            last_seen: now,
        };
        self.flows.insert(id, (key, flow));
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// The flow with this id, if it still exists.
    #[must_use]
    pub fn get(&self, id: FlowId) -> Option<&Flow> {
        self.flows.get(&id).map(|(_, f)| f)
    }

    /// Records traffic on a flow: it becomes `Active` and its idle timer restarts.
    pub fn touch(&mut self, id: FlowId, now: Instant) {
        if let Some((_, flow)) = self.flows.get_mut(&id) {
            flow.state = State::Active;
            flow.last_seen = now;
        }
    }

    /// Removes a flow.
    pub fn remove(&mut self, id: FlowId) -> Option<Flow> {
        let (key, flow) = self.flows.remove(&id)?;
        self.by_key.remove(&key);
        Some(flow)
    }

    /// Removes every flow idle for longer than its protocol's timeout, returning their ids.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<FlowId>) {
        let before = out.len();
        out.extend(self.flows.iter().filter_map(|(id, (_, flow))| {
            (now.saturating_duration_since(flow.last_seen) >= idle_timeout(flow.protocol))
                .then_some(*id)
        }));
        for id in out.iter().skip(before) {
            self.remove(*id);
        }
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
}

/// How long a flow may be idle before it is removed.
#[must_use]
pub fn idle_timeout(protocol: Protocol) -> Duration {
    match protocol {
        Protocol::Icmp => ICMP_IDLE,
    }
}

/// Index of the initiating side in [`Flow::sides`].
pub const INITIATOR: usize = 0;
/// Index of the target side in [`Flow::sides`].
pub const TARGET: usize = 1;
/// Idle timeout of echo flows (Linux's ping socket lifetime is the process's; 60 s matches
/// the conntrack default for ICMP, 30 s, doubled for slow `ping -i`).
pub const ICMP_IDLE: Duration = Duration::from_secs(60);
/// How often the engine sweeps the table for idle flows.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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

    #[test]
    fn insert_lookup_touch_expire() {
        let t0 = Instant::now();
        let mut table = Table::new(8);
        let id = table.insert(t0, key(1)).unwrap();
        assert_eq!(table.lookup(&key(1)), Some(id));
        assert_eq!(table.get(id).unwrap().state, State::Opening);
        assert_eq!(table.get(id).unwrap().target().addr, key(1).remote_addr);
        table.touch(id, t0 + Duration::from_secs(30));
        assert_eq!(table.get(id).unwrap().state, State::Active);
        let mut out = Vec::new();
        table.expire(t0 + Duration::from_secs(60), &mut out);
        assert!(out.is_empty(), "touched flow expired early");
        table.expire(t0 + Duration::from_secs(90), &mut out);
        assert_eq!(out, vec![id]);
        assert!(table.is_empty());
        assert_eq!(table.lookup(&key(1)), None);
    }

    #[test]
    fn bounded_and_ids_not_reused() {
        let t0 = Instant::now();
        let mut table = Table::new(2);
        let a = table.insert(t0, key(1)).unwrap();
        table.insert(t0, key(2)).unwrap();
        assert_eq!(table.insert(t0, key(3)), Err(Full(2)));
        table.remove(a);
        let c = table.insert(t0, key(3)).unwrap();
        assert_ne!(a, c);
        assert!(table.get(a).is_none());
    }
}
