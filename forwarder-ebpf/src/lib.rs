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

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; 4] = [
        Self::TapEgressFrames,
        Self::ArpAnswered,
        Self::NdpAnswered,
        Self::Passed,
    ];

    /// Name in forwarder's statistics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::TapEgressFrames => "bpf_tap_egress_frames",
            Self::ArpAnswered => "bpf_arp_answered",
            Self::NdpAnswered => "bpf_ndp_answered",
            Self::Passed => "bpf_passed",
        }
    }
}

/// Number of entries in the `STATS` map.
pub const COUNTERS: u32 = 4;

/// Name of the tap egress program in the object.
pub const TAP_EGRESS: &str = "tap_egress";
/// Name of the configuration map.
pub const CONFIG_MAP: &str = "CONFIG";
/// Name of the per-CPU counters map.
pub const STATS_MAP: &str = "STATS";

#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: `Config` is `#[repr(C)]`, `Copy`, made only of byte arrays and `u32`s with explicit
// padding (size asserted below), so every bit pattern is valid and there is no implicit padding.
unsafe impl aya::Pod for Config {}

const _: () = assert!(size_of::<Config>() == 36);
