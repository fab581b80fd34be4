//! # Theory of operation
//!
//! Types shared between the TC programs and the agent. Every type crossing the user/kernel
//! boundary is `#[repr(C)]` with explicit padding and a compile-time size assertion, so the
//! two sides cannot silently disagree on layout. Fields that come from packets are kept in
//! network byte order (`[u8; N]`), so neither side converts them.
//!
//! The TC programs themselves (ARP/NDP answering, the established-flow fast path) are built
//! for `bpfel-unknown-none` by the eBPF toolchain step of `cargo xtask`; this crate's library
//! part builds on stable for any target and holds no code that runs.
#![no_std]

/// Feature bit in [`Config::flags`]: answer ARP requests in TC egress.
pub const FEAT_ARP: u32 = 1 << 0;
/// Feature bit in [`Config::flags`]: answer IPv6 neighbour solicitations in TC egress.
pub const FEAT_NDP: u32 = 1 << 1;

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
}

/// Number of entries in the `STATS` map.
pub const COUNTERS: u32 = 4;

const _: () = assert!(size_of::<Config>() == 36);
