//! # Theory of operation
//!
//! `tap_egress` (TC egress on the tap, in the namespace) sees every frame the namespace's
//! stack sends to forwarder before it is queued to the tap fd. It answers the two neighbour
//! questions that need no state — ARP requests and IPv6 neighbour solicitations — exactly as
//! the userspace services would (`services::arp`, `services::ndp`; a differential test holds
//! the bytes equal): it rewrites the request into the reply in place and redirects it to the
//! tap's ingress (`bpf_redirect(tap, BPF_F_INGRESS)`), so the namespace receives it as if
//! forwarder had written it. Everything else, and every case the program does not handle
//! byte-for-byte like userspace, returns `TC_ACT_OK` untouched: userspace reads it from the
//! tap as before.
//!
//! ## What is answered
//!
//! * ARP: a 42-byte Ethernet/IPv4 request whose target is not the guest's own address, the
//!   sender's address, unspecified, broadcast or multicast.
//! * NDP: an 86-byte neighbour solicitation (with its source link-layer option: Linux always
//!   sends one unless the source is unspecified) with a valid checksum, hop limit 255, from a
//!   specified source, for a target that is not the guest's own, multicast or unspecified.
//!   DAD probes (source `::`) stay with userspace, which defends only its own addresses.
//!
//! ## Rules
//!
//! All packet bytes are read and written through [`read`] and [`write`]: the kernel's
//! `bpf_skb_load_bytes`/`bpf_skb_store_bytes`, bounds-checked against the packet's length,
//! so a truncated frame is an `Err` and passes untouched. Counters are per-CPU
//! (`STATS`, indices [`Counter`]); aya-log is used only when the configuration is missing,
//! never per packet.
#![allow(unsafe_code)]

use aya_ebpf::bindings::{BPF_F_INGRESS, TC_ACT_OK};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::error;
use forwarder_ebpf::{COUNTERS, Config, Counter, FEAT_ARP, FEAT_NDP};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

const ARP_LEN: usize = 42;
const NS_LEN: usize = 86;

#[classifier]
pub fn tap_egress(ctx: TcContext) -> i32 {
    count(Counter::TapEgressFrames);
    let action = answer(&ctx).unwrap_or(TC_ACT_OK as i32);
    if action == TC_ACT_OK as i32 {
        count(Counter::Passed);
    }
    action
}

fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot of this map; no other program instance runs on this CPU
        // at the same time.
        unsafe { *p += 1 };
    }
}

/// Reads `N` bytes at `off`; `Err` when the packet is shorter.
#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, off: usize) -> Result<[u8; N], ()> {
    ctx.load::<[u8; N]>(off).map_err(|_| ())
}

/// Writes `N` bytes at `off`; `Err` when the packet is shorter.
#[inline(always)]
fn write<const N: usize>(ctx: &TcContext, off: usize, bytes: &[u8; N]) -> Result<(), ()> {
    ctx.store(off, bytes, 0).map_err(|_| ())
}

fn answer(ctx: &TcContext) -> Result<i32, ()> {
    let Some(cfg) = CONFIG.get(0) else {
        error!(ctx, "forwarder: CONFIG map is empty");
        return Ok(TC_ACT_OK as i32);
    };
    let ethertype: [u8; 2] = read(ctx, 12)?;
    let len = ctx.len() as usize;
    if ethertype == [0x08, 0x06] && cfg.flags & FEAT_ARP != 0 && len == ARP_LEN {
        return arp(ctx, cfg);
    }
    if ethertype == [0x86, 0xdd] && cfg.flags & FEAT_NDP != 0 && len == NS_LEN {
        return ndp(ctx, cfg);
    }
    Ok(TC_ACT_OK as i32)
}

fn redirect(cfg: &Config, what: Counter) -> i32 {
    count(what);
    // SAFETY: a plain helper call; the kernel checks the interface index.
    unsafe { bpf_redirect(cfg.tap_ifindex, BPF_F_INGRESS as u64) as i32 }
}

fn arp(ctx: &TcContext, cfg: &Config) -> Result<i32, ()> {
    // Ethernet / IPv4, hardware length 6, protocol length 4, request.
    let head: [u8; 8] = read(ctx, 14)?;
    if head != [0, 1, 8, 0, 6, 4, 0, 1] {
        return Ok(TC_ACT_OK as i32);
    }
    let eth_src: [u8; 6] = read(ctx, 6)?;
    let sha: [u8; 6] = read(ctx, 22)?;
    let spa: [u8; 4] = read(ctx, 28)?;
    let tpa: [u8; 4] = read(ctx, 38)?;
    if tpa == cfg.guest4
        || tpa == spa
        || tpa == [0, 0, 0, 0]
        || tpa == [255, 255, 255, 255]
        || tpa[0] & 0xf0 == 0xe0
    {
        return Ok(TC_ACT_OK as i32);
    }
    let m = cfg.gw_mac;
    // Ethernet: to the requester, from us; ARP reply from the target address, with our MAC.
    write(ctx, 0, &eth_src)?;
    write(ctx, 6, &m)?;
    write(ctx, 20, &[0u8, 2])?;
    write(ctx, 22, &m)?;
    write(ctx, 28, &tpa)?;
    write(ctx, 32, &sha)?;
    write(ctx, 38, &spa)?;
    Ok(redirect(cfg, Counter::ArpAnswered))
}

/// Adds the 16-bit big-endian words of `b` to `sum`.
#[inline(always)]
fn add_words<const N: usize>(mut sum: u32, b: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += (u32::from(b[i]) << 8) | u32::from(b[i + 1]);
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[inline(always)]
fn is_zero(b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if b[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

fn ndp(ctx: &TcContext, cfg: &Config) -> Result<i32, ()> {
    // IPv6, payload 32 bytes of ICMPv6, hop limit 255.
    let ip: [u8; 8] = read(ctx, 14)?;
    if ip[0] >> 4 != 6 || ip[4] != 0 || ip[5] != 32 || ip[6] != 58 || ip[7] != 255 {
        return Ok(TC_ACT_OK as i32);
    }
    // Neighbour solicitation, code 0, with one source link-layer address option.
    let icmp: [u8; 8] = read(ctx, 54)?;
    let option: [u8; 8] = read(ctx, 78)?;
    if icmp[0] != 135 || icmp[1] != 0 || option[0] != 1 || option[1] != 1 {
        return Ok(TC_ACT_OK as i32);
    }
    let src: [u8; 16] = read(ctx, 22)?;
    let dst: [u8; 16] = read(ctx, 38)?;
    let target: [u8; 16] = read(ctx, 62)?;
    // A solicitation with a bad checksum is dropped by userspace's parser: leave it to it.
    let mut sum = 32 + 58;
    sum = add_words(sum, &src);
    sum = add_words(sum, &dst);
    sum = add_words(sum, &icmp);
    sum = add_words(sum, &target);
    sum = add_words(sum, &option);
    if fold(sum) != 0xffff {
        return Ok(TC_ACT_OK as i32);
    }
    if is_zero(&src) || is_zero(&target) || target[0] == 0xff || same(&target, &cfg.guest6) {
        return Ok(TC_ACT_OK as i32);
    }
    let m = cfg.gw_mac;
    let eth_src: [u8; 6] = read(ctx, 6)?;
    // Advertisement: router, solicited, override; target unchanged at the same offset;
    // target link-layer address option with our MAC.
    let na_option = [2u8, 1, m[0], m[1], m[2], m[3], m[4], m[5]];
    let mut sum = 32 + 58;
    sum = add_words(sum, &target);
    sum = add_words(sum, &src);
    sum = add_words(sum, &[136u8, 0, 0, 0, 0xe0, 0, 0, 0]);
    sum = add_words(sum, &target);
    sum = add_words(sum, &na_option);
    let csum = !fold(sum);
    write(ctx, 0, &eth_src)?;
    write(ctx, 6, &m)?;
    write(ctx, 14, &[0x60u8, 0, 0, 0, 0, 32, 58, 255])?;
    write(ctx, 22, &target)?;
    write(ctx, 38, &src)?;
    write(
        ctx,
        54,
        &[136u8, 0, (csum >> 8) as u8, csum as u8, 0xe0, 0, 0, 0],
    )?;
    write(ctx, 78, &na_option)?;
    Ok(redirect(cfg, Counter::NdpAnswered))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
