//! # Theory of operation
//!
//! `tap_egress` (TC egress on the tap, in the namespace) sees every frame the namespace's
//! stack sends to forwarder before it is queued to the tap fd. It answers the two neighbour
//! questions that need no state — ARP requests and IPv6 neighbour solicitations — exactly as
//! the userspace services would (`services::arp`, `services::ndp`; a differential test holds
//! the bytes equal): it rewrites the request into the reply in place and redirects it to the
//! tap's ingress (`bpf_redirect(tap, BPF_F_INGRESS)`), so the namespace receives it as if
//! forwarder had written it. Everything else, and every case the program does not handle
//! byte-for-byte like userspace, is passed on untouched ([`PASS`]): userspace reads it from the
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
//! ## The flow fast path (`FEAT_FASTPATH`)
//!
//! Four programs carry the flows userspace decided at their first packet (the agent's
//! `fastpath` module inserts a `REVERSE` entry, then a `FLOWS` entry):
//!
//! * `tap_egress`, before ARP/NDP: an IPv4 (no options, not a fragment) or IPv6 (no
//!   extension header) TCP or UDP packet whose 5-tuple is in `FLOWS` gets its source
//!   rewritten to the host address and reserved port and is redirected to the hidden
//!   veth's namespace end. GSO super-packets pass whole.
//! * `fp_host_ingress` (the veth's host end): `bpf_fib_lookup` in forwarder's namespace
//!   (ingress semantics: forwarding is on for that device only), then `bpf_redirect` with
//!   the MACs it found, or `bpf_redirect_neigh` when the neighbour is not resolved yet;
//!   no route → dropped, counted `FastNoRoute`.
//! * `uplink_ingress` (every uplink): a packet whose 5-tuple is in `REVERSE` gets its
//!   destination rewritten to the guest's address and port, Ethernet from the gateway's MAC
//!   to the guest's, and goes with `bpf_redirect_peer` to the veth's namespace end. An ICMP
//!   error quoting a fast-path flow's packet is translated back the same way (outer
//!   destination, quoted source address and port; `icmp_error_in`). Every other packet
//!   continues to the host's stack untouched.
//! * `fp_ns_ingress`: what came from the gateway's MAC goes to the tap's ingress; nothing
//!   else enters.
//!
//! Checksums are updated incrementally with the kernel's helpers (`bpf_l3_csum_replace`,
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` for addresses, `bpf_csum_diff` for
//! IPv6's 16 bytes), which also handle offloaded (`CHECKSUM_PARTIAL`) and GSO packets; a
//! UDP checksum of 0 stays 0 (`BPF_F_MARK_MANGLED_0`). Each hit updates the entry's
//! `last_seen` and counters, and TCP FIN/RST set `SEEN_*` bits; a newly set bit is pushed
//! on the `EVENTS` ring buffer for userspace's lifecycle (lost events are counted, and
//! userspace also reads the entries every second). The counters are plain adds on shared
//! entries: statistics, racy across CPUs by design.
//!
//! ## Rules
//!
//! All packet bytes are read and written through [`read`] and [`write`]: the kernel's
//! `bpf_skb_load_bytes`/`bpf_skb_store_bytes`, bounds-checked against the packet's length,
//! so a truncated frame is an `Err` and passes untouched. Counters are per-CPU
//! (`STATS`, indices [`Counter`]); aya-log is used only when the configuration is missing,
//! never per packet.
#![allow(unsafe_code)]

use aya_ebpf::bindings::{
    BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
    BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup as FibParams,
};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::helpers::generated::{
    bpf_csum_diff, bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh, bpf_redirect_peer,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::error;
use forwarder_ebpf::{
    COUNTERS, Config, Counter, Event, FEAT_ARP, FEAT_FASTPATH, FEAT_NDP, FlowKey, FlowValue,
    MAX_FAST_FLOWS, ReverseValue, SEEN_FIN_IN, SEEN_FIN_OUT, SEEN_RST, SEEN_SYN,
};

/// What every program returns for a packet it leaves alone: `TCX_NEXT` (`TC_ACT_UNSPEC`
/// for netlink TC), so the next program on the hook runs, or the packet goes on as if no
/// program were there. `TC_ACT_OK` would end a TCX chain: another forwarder's (or
/// anyone's) program after ours on a shared uplink would never see the packet.
const PASS: i32 = -1;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Forward entries: the namespace's 5-tuple → the host address and reserved port.
/// Written only by userspace (reverse entry first), updated in place here.
#[map]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(MAX_FAST_FLOWS, 0);

/// Reverse entries: the host's view of the replies → the guest's address and port.
#[map]
static REVERSE: HashMap<FlowKey, ReverseValue> = HashMap::with_max_entries(MAX_FAST_FLOWS, 0);

/// FIN and RST seen on fast-path flows, for userspace's lifecycle.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

const ARP_LEN: usize = 42;
const NS_LEN: usize = 86;

#[classifier]
pub fn tap_egress(ctx: TcContext) -> i32 {
    count(Counter::TapEgressFrames);
    let action = answer(&ctx).unwrap_or(PASS);
    if action == PASS {
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
        return Ok(PASS);
    };
    let ethertype: [u8; 2] = read(ctx, 12)?;
    let len = ctx.len() as usize;
    if cfg.flags & FEAT_FASTPATH != 0
        && let Some(p) = parse(ctx, ethertype)?
        && let Some(action) = fast_out(ctx, cfg, &p)?
    {
        return Ok(action);
    }
    if ethertype == [0x08, 0x06] && cfg.flags & FEAT_ARP != 0 && len == ARP_LEN {
        return arp(ctx, cfg);
    }
    if ethertype == [0x86, 0xdd] && cfg.flags & FEAT_NDP != 0 && len == NS_LEN {
        return ndp(ctx, cfg);
    }
    Ok(PASS)
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
        return Ok(PASS);
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
        return Ok(PASS);
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
        return Ok(PASS);
    }
    // Neighbour solicitation, code 0, with one source link-layer address option.
    let icmp: [u8; 8] = read(ctx, 54)?;
    let option: [u8; 8] = read(ctx, 78)?;
    if icmp[0] != 135 || icmp[1] != 0 || option[0] != 1 || option[1] != 1 {
        return Ok(PASS);
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
        return Ok(PASS);
    }
    if is_zero(&src) || is_zero(&target) || target[0] == 0xff || same(&target, &cfg.guest6) {
        return Ok(PASS);
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

// ---- The fast path (eBPF part 2) ----

const ETH_IP4: [u8; 2] = [0x08, 0x00];
const ETH_IP6: [u8; 2] = [0x86, 0xdd];
const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const IP4_CSUM: usize = 14 + 10;

/// A TCP or UDP packet's 5-tuple and where its fields are.
struct Parsed {
    key: FlowKey,
    /// Offset of the transport header.
    l4: usize,
    /// Offset of the transport checksum.
    csum: usize,
    /// TCP flags (0 for UDP).
    flags: u8,
    /// IP length, for the byte counters.
    len: u64,
}

/// Parses an IPv4 (no options, not a fragment) or IPv6 (no extension header) TCP or UDP
/// packet after a 14-byte Ethernet header; `None` for anything else.
#[inline(always)]
fn parse(ctx: &TcContext, ethertype: [u8; 2]) -> Result<Option<Parsed>, ()> {
    let mut key = FlowKey::default();
    let (l4, len) = if ethertype == ETH_IP4 {
        let h: [u8; 20] = read(ctx, 14)?;
        if h[0] != 0x45 || h[6] & 0x3f != 0 || h[7] != 0 {
            return Ok(None);
        }
        key.proto = h[9];
        key.family = 4;
        key.saddr[..4].copy_from_slice(&h[12..16]);
        key.daddr[..4].copy_from_slice(&h[16..20]);
        (34, u64::from(u16::from_be_bytes([h[2], h[3]])))
    } else if ethertype == ETH_IP6 {
        let h: [u8; 40] = read(ctx, 14)?;
        if h[0] >> 4 != 6 {
            return Ok(None);
        }
        key.proto = h[6];
        key.family = 6;
        key.saddr.copy_from_slice(&h[8..24]);
        key.daddr.copy_from_slice(&h[24..40]);
        (54, 40 + u64::from(u16::from_be_bytes([h[4], h[5]])))
    } else {
        return Ok(None);
    };
    let csum = match key.proto {
        TCP => l4 + 16,
        UDP => l4 + 6,
        _ => return Ok(None),
    };
    let ports: [u8; 4] = read(ctx, l4)?;
    key.sport = [ports[0], ports[1]];
    key.dport = [ports[2], ports[3]];
    let flags = if key.proto == TCP {
        let f: [u8; 1] = read(ctx, l4 + 13)?;
        f[0]
    } else {
        0
    };
    Ok(Some(Parsed {
        key,
        l4,
        csum,
        flags,
        len,
    }))
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// The `SEEN_*` bits this packet carries: FIN as `fin`, RST.
#[inline(always)]
fn seen(p: &Parsed, fin: u32) -> u32 {
    let mut bits = 0;
    if p.flags & TCP_FIN != 0 {
        bits |= fin;
    }
    if p.flags & TCP_RST != 0 {
        bits |= SEEN_RST;
    }
    bits
}

/// Tells userspace about bits newly set on the flow with forward key `key`.
#[inline(always)]
fn report(key: &FlowKey, state: u32) {
    if EVENTS
        .output::<Event>(Event { key: *key, state }, 0)
        .is_err()
    {
        count(Counter::EventsLost);
    }
}

/// Replaces the address at `off` (4 or 16 bytes) and the port at `port_off`, fixing the
/// IPv4 header checksum and the transport checksum incrementally (pseudo-header for the
/// address). Works for GSO and checksum-offloaded packets: the kernel's helpers update only
/// the pseudo-header part of a partial checksum.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    p: &Parsed,
    (off, old, new): (usize, &[u8; 16], &[u8; 16]),
    (port_off, old_port, new_port): (usize, [u8; 2], [u8; 2]),
) -> Result<(), ()> {
    let mangled = if p.key.proto == UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if p.key.family == 4 {
        let (o, n) = (
            u32::from_ne_bytes([old[0], old[1], old[2], old[3]]),
            u32::from_ne_bytes([new[0], new[1], new[2], new[3]]),
        );
        if o != n {
            ctx.l4_csum_replace(
                p.csum,
                u64::from(o),
                u64::from(n),
                u64::from(BPF_F_PSEUDO_HDR) | 4 | mangled,
            )
            .map_err(|_| ())?;
            ctx.l3_csum_replace(IP4_CSUM, u64::from(o), u64::from(n), 4)
                .map_err(|_| ())?;
            write(ctx, off, &[new[0], new[1], new[2], new[3]])?;
        }
    } else if !same(old, new) {
        let mut from = words(old);
        let mut to = words(new);
        // SAFETY: both buffers are 16 bytes on this program's stack.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(
            p.csum,
            0,
            diff as u64,
            u64::from(BPF_F_PSEUDO_HDR) | mangled,
        )
        .map_err(|_| ())?;
        write(ctx, off, new)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            p.csum,
            u64::from(u16::from_ne_bytes(old_port)),
            u64::from(u16::from_ne_bytes(new_port)),
            2 | mangled,
        )
        .map_err(|_| ())?;
        write(ctx, port_off, &new_port)?;
    }
    Ok(())
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Offsets of the source address and of the destination address.
#[inline(always)]
fn addr_offsets(p: &Parsed) -> (usize, usize) {
    if p.key.family == 4 {
        (26, 30)
    } else {
        (22, 38)
    }
}

/// `tap_egress`, a forward hit: source NAT to the host address and reserved port, then to
/// the hidden veth (`fwdfp0`), whose host end routes it out.
fn fast_out(ctx: &TcContext, cfg: &Config, p: &Parsed) -> Result<Option<i32>, ()> {
    let Some(v) = FLOWS.get_ptr_mut(&p.key) else {
        return Ok(None);
    };
    // SAFETY: a pointer into the map's value for this key, valid for this program run;
    // concurrent updates of the counters may race (they are statistics).
    let (nat_addr, nat_port) = unsafe {
        (*v).last_seen = now();
        (*v).packets += 1;
        (*v).bytes += p.len;
        let bits = seen(p, SEEN_FIN_OUT);
        if p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN && (*v).state != 0 {
            // A new connection on a closing flow's tuple: open again.
            (*v).state = 0;
            report(&p.key, SEEN_SYN);
        } else if bits & !(*v).state != 0 {
            (*v).state |= bits;
            report(&p.key, bits);
        }
        ((*v).nat_addr, (*v).nat_port)
    };
    let (src, _) = addr_offsets(p);
    rewrite(
        ctx,
        p,
        (src, &p.key.saddr, &nat_addr),
        (p.l4, p.key.sport, nat_port),
    )?;
    count(Counter::FastOut);
    // SAFETY: a plain helper call; the kernel checks the interface index.
    Ok(Some(unsafe { bpf_redirect(cfg.fp_ns_ifindex, 0) as i32 }))
}

/// TC ingress on the hidden veth's host end: what `tap_egress` sent, routed out of the
/// host by its FIB (ingress semantics: `forwarding` is on for this device only).
#[classifier]
pub fn fp_host_ingress(ctx: TcContext) -> i32 {
    route_out(&ctx).unwrap_or(TC_ACT_SHOT)
}

fn route_out(ctx: &TcContext) -> Result<i32, ()> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(TC_ACT_SHOT);
    };
    let ethertype: [u8; 2] = read(ctx, 12)?;
    let Some(p) = parse(ctx, ethertype)? else {
        return Ok(TC_ACT_SHOT);
    };
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.l4_protocol = p.key.proto;
    fib.sport = u16::from_ne_bytes(p.key.sport);
    fib.dport = u16::from_ne_bytes(p.key.dport);
    fib.ifindex = cfg.fp_host_ifindex;
    if p.key.family == 4 {
        fib.family = 2;
        fib.__bindgen_anon_3.ipv4_src = words(&p.key.saddr)[0];
        fib.__bindgen_anon_4.ipv4_dst = words(&p.key.daddr)[0];
    } else {
        fib.family = 10;
        fib.__bindgen_anon_3.ipv6_src = words(&p.key.saddr);
        fib.__bindgen_anon_4.ipv6_dst = words(&p.key.daddr);
    }
    // SAFETY: the context's skb and a struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        let mut eth = [0u8; 12];
        eth[..6].copy_from_slice(&fib.dmac);
        eth[6..].copy_from_slice(&fib.smac);
        write(ctx, 0, &eth)?;
        // SAFETY: a plain helper call.
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) as i32 });
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // SAFETY: a plain helper call; no neighbour parameters.
        return Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) as i32 });
    }
    count(Counter::FastNoRoute);
    Ok(TC_ACT_SHOT)
}

/// TC ingress on every uplink: a reply of a fast-path flow (reverse hit) is translated
/// back and sent into the namespace through the hidden veth's peer; everything else goes
/// on to the host's stack untouched.
#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    fast_in(&ctx).unwrap_or(PASS)
}

fn fast_in(ctx: &TcContext) -> Result<i32, ()> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(PASS);
    };
    if cfg.flags & FEAT_FASTPATH == 0 {
        return Ok(PASS);
    }
    let ethertype: [u8; 2] = read(ctx, 12)?;
    let Some(p) = parse(ctx, ethertype)? else {
        return icmp_error_in(ctx, cfg, ethertype);
    };
    let Some(v) = REVERSE.get_ptr_mut(&p.key) else {
        return Ok(PASS);
    };
    // SAFETY: as in `fast_out`.
    let (guest_addr, guest_port, guest_mac) = unsafe {
        (*v).last_seen = now();
        (*v).packets += 1;
        (*v).bytes += p.len;
        let bits = seen(&p, SEEN_FIN_IN);
        if bits & !(*v).state != 0 {
            (*v).state |= bits;
            let fwd = FlowKey {
                saddr: (*v).guest_addr,
                daddr: p.key.saddr,
                sport: (*v).guest_port,
                dport: p.key.sport,
                proto: p.key.proto,
                family: p.key.family,
                _pad: [0; 2],
            };
            report(&fwd, bits);
        }
        ((*v).guest_addr, (*v).guest_port, (*v).guest_mac)
    };
    let (_, dst) = addr_offsets(&p);
    rewrite(
        ctx,
        &p,
        (dst, &p.key.daddr, &guest_addr),
        (p.l4 + 2, p.key.dport, guest_port),
    )?;
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&guest_mac);
    eth[6..].copy_from_slice(&cfg.gw_mac);
    write(ctx, 0, &eth)?;
    count(Counter::FastIn);
    // SAFETY: a plain helper call; the kernel checks the index and that it is a veth.
    Ok(unsafe { bpf_redirect_peer(cfg.fp_host_ifindex, 0) as i32 })
}

/// `uplink_ingress`, an ICMP error (IPv4 destination unreachable, time exceeded, parameter
/// problem; ICMPv6 1–4, packet too big included) quoting a packet of a fast-path flow: the
/// quoted packet left from the host address and reserved port, so the error is translated
/// back — outer destination, quoted source address and port — and sent into the namespace
/// like the flow's replies. The guest's stack then fails a connect at once, or learns the
/// path MTU, as on a routed path. Everything else passes.
fn icmp_error_in(ctx: &TcContext, cfg: &Config, ethertype: [u8; 2]) -> Result<i32, ()> {
    // Offsets: outer IP at 14; ICMP header; quoted IP header; quoted ports.
    let (icmp, quoted, ports, family) = if ethertype == ETH_IP4 {
        let h: [u8; 20] = read(ctx, 14)?;
        if h[0] != 0x45 || h[9] != 1 || h[6] & 0x3f != 0 || h[7] != 0 {
            return Ok(PASS);
        }
        (34, 42, 62, 4)
    } else if ethertype == ETH_IP6 {
        let h: [u8; 8] = read(ctx, 14)?;
        if h[0] >> 4 != 6 || h[6] != 58 {
            return Ok(PASS);
        }
        (54, 62, 102, 6)
    } else {
        return Ok(PASS);
    };
    let t: [u8; 1] = read(ctx, icmp)?;
    let error = if family == 4 {
        matches!(t[0], 3 | 11 | 12)
    } else {
        matches!(t[0], 1..=4)
    };
    if !error {
        return Ok(PASS);
    }
    let mut key = FlowKey {
        family,
        ..FlowKey::default()
    };
    // The quoted packet went host → remote; the reverse key is remote → host.
    let (qsrc, qcsum) = if family == 4 {
        let q: [u8; 20] = read(ctx, quoted)?;
        if q[0] != 0x45 {
            return Ok(PASS);
        }
        key.proto = q[9];
        key.daddr[..4].copy_from_slice(&q[12..16]);
        key.saddr[..4].copy_from_slice(&q[16..20]);
        (quoted + 12, Some(quoted + 10))
    } else {
        let q: [u8; 40] = read(ctx, quoted)?;
        key.proto = q[6];
        key.daddr.copy_from_slice(&q[8..24]);
        key.saddr.copy_from_slice(&q[24..40]);
        (quoted + 8, None)
    };
    if key.proto != TCP && key.proto != UDP {
        return Ok(PASS);
    }
    let p: [u8; 4] = read(ctx, ports)?;
    key.dport = [p[0], p[1]];
    key.sport = [p[2], p[3]];
    let Some(v) = REVERSE.get_ptr(&key) else {
        return Ok(PASS);
    };
    // SAFETY: a pointer into the map's value for this key, valid for this program run.
    let (guest_addr, guest_port, guest_mac) =
        unsafe { ((*v).guest_addr, (*v).guest_port, (*v).guest_mac) };
    let icmp_csum = icmp + 2;
    if family == 4 {
        let (host, guest) = (words(&key.daddr)[0], words(&guest_addr)[0]);
        if host != guest {
            // Outer destination: the IPv4 header's checksum compensates (ICMP has no
            // pseudo-header). Quoted source: the quoted header's checksum compensates, so
            // the ICMP checksum over it is unchanged.
            ctx.l3_csum_replace(IP4_CSUM, u64::from(host), u64::from(guest), 4)
                .map_err(|_| ())?;
            write(
                ctx,
                30,
                &[guest_addr[0], guest_addr[1], guest_addr[2], guest_addr[3]],
            )?;
            if let Some(off) = qcsum {
                ctx.l3_csum_replace(off, u64::from(host), u64::from(guest), 4)
                    .map_err(|_| ())?;
            }
            write(
                ctx,
                qsrc,
                &[guest_addr[0], guest_addr[1], guest_addr[2], guest_addr[3]],
            )?;
        }
    } else if !same(&key.daddr, &guest_addr) {
        // ICMPv6's checksum covers the pseudo-header (outer destination) and the quoted
        // source alike.
        let mut from = words(&key.daddr);
        let mut to = words(&guest_addr);
        // SAFETY: both buffers are 16 bytes on this program's stack.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(icmp_csum, 0, diff as u64, u64::from(BPF_F_PSEUDO_HDR))
            .map_err(|_| ())?;
        write(ctx, 38, &guest_addr)?;
        ctx.l4_csum_replace(icmp_csum, 0, diff as u64, 0)
            .map_err(|_| ())?;
        write(ctx, qsrc, &guest_addr)?;
    }
    // The quoted source port: only the ICMP checksum covers it here (the quoted transport
    // checksum is not checked by receivers of ICMP errors).
    if key.dport != guest_port {
        ctx.l4_csum_replace(
            icmp_csum,
            u64::from(u16::from_ne_bytes(key.dport)),
            u64::from(u16::from_ne_bytes(guest_port)),
            2,
        )
        .map_err(|_| ())?;
        write(ctx, ports, &guest_port)?;
    }
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&guest_mac);
    eth[6..].copy_from_slice(&cfg.gw_mac);
    write(ctx, 0, &eth)?;
    count(Counter::FastIcmpIn);
    // SAFETY: a plain helper call; the kernel checks the index and that it is a veth.
    Ok(unsafe { bpf_redirect_peer(cfg.fp_host_ifindex, 0) as i32 })
}

/// TC ingress on the hidden veth's namespace end: the replies `uplink_ingress` sent (from
/// the gateway's MAC) go to the tap's ingress, so the namespace receives them as if
/// forwarder had written them; nothing else enters here.
#[classifier]
pub fn fp_ns_ingress(ctx: TcContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_SHOT;
    };
    let Ok(src) = read::<6>(&ctx, 6) else {
        return TC_ACT_SHOT;
    };
    if src != cfg.gw_mac {
        return TC_ACT_SHOT;
    }
    // SAFETY: a plain helper call.
    unsafe { bpf_redirect(cfg.tap_ifindex, BPF_F_INGRESS as u64) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
