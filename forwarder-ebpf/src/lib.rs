//! # Theory of operation
//!
//! Types shared between the TC programs and the agent. Every type crossing the user/kernel
//! boundary is `#[repr(C)]` with explicit padding and a compile-time size assertion, so the
//! two sides cannot silently disagree on layout. Fields that come from packets are kept in
//! network byte order (`[u8; N]`), so neither side converts them.
//!
//! The TC programs themselves (`src/main.rs`, `src/programs.rs`) are built for
//! `bpfel-unknown-none` by the agent's build script; this library builds on stable for any
//! target. With the `user` feature the agent gets `aya::Pod` for the map types.
#![no_std]

/// Feature bit in [`Config::flags`]: answer ARP requests in TC egress.
pub const FEAT_ARP: u32 = 1 << 0;
/// Feature bit in [`Config::flags`]: answer IPv6 neighbour solicitations in TC egress.
pub const FEAT_NDP: u32 = 1 << 1;
/// Feature bit in [`Config::flags`]: carry the flows in `FLOWS`/`REVERSE` in the kernel.
pub const FEAT_FASTPATH: u32 = 1 << 2;

/// Per-device configuration, the single entry of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Interface index of the tap in the namespace.
    pub tap_ifindex: u32,
    /// `FEAT_*` bits.
    pub flags: u32,
    /// MAC address forwarder answers with (the gateway's).
    pub gw_mac: [u8; 6],
    /// Explicit padding: keeps the layout identical on both sides.
    pub _pad0: [u8; 2],
    /// IPv4 address of the guest (never answered for), network order.
    pub guest4: [u8; 4],
    /// IPv6 address of the guest (never answered for).
    pub guest6: [u8; 16],
    /// Interface index of the hidden veth's namespace end (`fwdfp0`), in the namespace.
    pub fp_ns_ifindex: u32,
    /// Interface index of the hidden veth's host end, in forwarder's namespace.
    pub fp_host_ifindex: u32,
}

/// TCP state bits in [`FlowValue::state`] and [`ReverseValue::state`], and in
/// [`Event::state`]: what the programs have seen of a fast-path flow.
pub const SEEN_FIN_OUT: u32 = 1 << 0;
/// A FIN from the remote side.
pub const SEEN_FIN_IN: u32 = 1 << 1;
/// A RST from either side.
pub const SEEN_RST: u32 = 1 << 2;
/// In an [`Event`] only: a SYN (without ACK) from the guest on a flow with bits set — the
/// guest opened a new connection on a closing flow's tuple; the forward entry's bits were
/// cleared.
pub const SEEN_SYN: u32 = 1 << 3;

/// A flow's 5-tuple. Forward entries (`FLOWS`) are keyed as the namespace sends
/// (guest → remote); reverse entries (`REVERSE`) as the host receives the replies
/// (remote → host address and reserved port). IPv4 addresses fill the first 4 bytes, the
/// rest is zero; ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Source port, network order.
    pub sport: [u8; 2],
    /// Destination port, network order.
    pub dport: [u8; 2],
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 2],
}

/// What `tap_egress` does to a forward hit: the source becomes the host address and the
/// reserved port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Host address the flow leaves from.
    pub nat_addr: [u8; 16],
    /// Reserved host port, network order.
    pub nat_port: [u8; 2],
    /// Explicit padding.
    pub _pad: [u8; 2],
    /// `SEEN_*` bits.
    pub state: u32,
    /// `bpf_ktime_get_ns` of the last packet (CLOCK_MONOTONIC).
    pub last_seen: u64,
    /// Packets carried.
    pub packets: u64,
    /// Bytes carried (IP length, GSO packets whole).
    pub bytes: u64,
}

/// What `uplink_ingress` does to a reverse hit: the destination becomes the guest's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseValue {
    /// The guest's address.
    pub guest_addr: [u8; 16],
    /// The guest's port, network order.
    pub guest_port: [u8; 2],
    /// The guest's MAC (Ethernet destination towards the tap).
    pub guest_mac: [u8; 6],
    /// `SEEN_*` bits.
    pub state: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen: u64,
    /// Packets carried.
    pub packets: u64,
    /// Bytes carried.
    pub bytes: u64,
}

/// A ring-buffer event: a `SEEN_*` bit newly set on a flow (its forward key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The flow's forward key.
    pub key: FlowKey,
    /// The bit(s) newly seen.
    pub state: u32,
}

/// Counter indices in the per-CPU `STATS` array map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Frames seen by the tap egress program.
    TapEgressFrames = 0,
    /// ARP requests answered in the kernel.
    ArpAnswered = 1,
    /// Neighbour solicitations answered in the kernel.
    NdpAnswered = 2,
    /// Frames passed to userspace untouched.
    Passed = 3,
    /// Packets carried from the namespace by the fast path (forward hits).
    FastOut = 4,
    /// Packets carried to the namespace by the fast path (reverse hits).
    FastIn = 5,
    /// Packets the host end could not route (FIB lookup failed): dropped.
    FastNoRoute = 6,
    /// Events lost because the ring buffer was full (the 1 s scan still sees the state).
    EventsLost = 7,
    /// ICMP errors about fast-path flows translated into the namespace.
    FastIcmpIn = 8,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; 9] = [
        Self::TapEgressFrames,
        Self::ArpAnswered,
        Self::NdpAnswered,
        Self::Passed,
        Self::FastOut,
        Self::FastIn,
        Self::FastNoRoute,
        Self::EventsLost,
        Self::FastIcmpIn,
    ];

    /// Name in forwarder's statistics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::TapEgressFrames => "bpf_tap_egress_frames",
            Self::ArpAnswered => "bpf_arp_answered",
            Self::NdpAnswered => "bpf_ndp_answered",
            Self::Passed => "bpf_passed",
            Self::FastOut => "bpf_fast_out",
            Self::FastIn => "bpf_fast_in",
            Self::FastNoRoute => "bpf_fast_no_route",
            Self::EventsLost => "bpf_events_lost",
            Self::FastIcmpIn => "bpf_fast_icmp_in",
        }
    }
}

/// Number of entries in the `STATS` map.
pub const COUNTERS: u32 = 9;

/// Name of the tap egress program in the object.
pub const TAP_EGRESS: &str = "tap_egress";
/// Name of the configuration map.
pub const CONFIG_MAP: &str = "CONFIG";
/// Name of the per-CPU counters map.
pub const STATS_MAP: &str = "STATS";
/// Names of the fast path's programs.
pub const FP_NS_INGRESS: &str = "fp_ns_ingress";
/// The host end of the hidden veth.
pub const FP_HOST_INGRESS: &str = "fp_host_ingress";
/// Every uplink's ingress.
pub const UPLINK_INGRESS: &str = "uplink_ingress";
/// Forward flow map.
pub const FLOWS_MAP: &str = "FLOWS";
/// Reverse flow map.
pub const REVERSE_MAP: &str = "REVERSE";
/// Event ring buffer.
pub const EVENTS_MAP: &str = "EVENTS";
/// Entries in each flow map; a full map sends new flows to userspace.
pub const MAX_FAST_FLOWS: u32 = 65_536;

#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: `Config` is `#[repr(C)]`, `Copy`, made only of byte arrays and `u32`s with explicit
// padding (size asserted below), so every bit pattern is valid and there is no implicit padding.
unsafe impl aya::Pod for Config {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: as for `Config`: `#[repr(C)]`, byte arrays and integers, explicit padding.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: as for `Config`.
unsafe impl aya::Pod for FlowValue {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: as for `Config`.
unsafe impl aya::Pod for ReverseValue {}
#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: as for `Config`.
unsafe impl aya::Pod for Event {}

const _: () = assert!(size_of::<Config>() == 44);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<FlowValue>() == 48);
const _: () = assert!(size_of::<ReverseValue>() == 56);
const _: () = assert!(size_of::<Event>() == 44);
