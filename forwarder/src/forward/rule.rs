//! # Theory of operation
//!
//! pasta's forwarding *rules*: the unit its runtime protocol (pesto, [`super::pesto`])
//! lists, adds and deletes, and what a `-t`/`-u`/`-T`/`-U` spec becomes when forwarder
//! serves that protocol (`-c/--conf-path`).
//!
//! ## The record
//!
//! A [`Rule`] is pasta's 56-byte `struct fwd_rule`, kept as the bytes it arrived in: pesto
//! deletes a rule by building it again from the spec and comparing all 56 bytes, so the
//! server must give back exactly what it stored (junk after an interface name's NUL
//! included), and its own command-line parser must build exactly what pesto's builds. The
//! layout (big-endian ports; addresses as IPv6, IPv4 as `::ffff:a.b.c.d`):
//!
//! | bytes | field |
//! |---|---|
//! | 0–15 | listening address (`::` with [`DUAL_STACK_ANY`]: every address of both families) |
//! | 16–31 | target address (unspecified: the default target) |
//! | 32–47 | interface name, NUL-terminated |
//! | 48–53 | first and last listening port, target of the first |
//! | 54, 55 | IP protocol (6, 17), flags ([`DUAL_STACK_ANY`], [`WEAK`], [`SCAN`]) |
//!
//! ## From a spec ([`parse`])
//!
//! pasta's rules, checked against its `fwd_rule_parse()` by dumping the real pasta's tables
//! (`research/pesto.md` §3.2): an optional address part `ADDR[%IF]/`, `*[%IF]/`, `%IF/` or
//! `/`; comma-separated chunks `A[-B][:TARGET]` (TARGET `TADDR/C[-D]`, `TADDR` or `C[-D]`,
//! a range the same length as the source), exclusions `~A[-B]`, `auto` and `all[:TADDR]`.
//! Each include chunk becomes one rule per maximal run of ports not excluded. A spec of only
//! exclusions, `all` or a bare `auto` covers 1–65535 minus the exclusions and minus the
//! ephemeral range, as [`WEAK`] rules (plus [`SCAN`] for `auto`). Without an address both
//! families are one dual-stack rule when both are enabled. `-T`/`-U` rules take no address;
//! as forwarder reports no interface-binding capability they are two rule sets, on
//! 127.0.0.1 and ::1 (pasta's own fallback), for the enabled families.
//!
//! ## Checks ([`Table::add`])
//!
//! What pasta's `fwd_rule_add()` refuses, in the same order of concerns: bad ports, unknown
//! flags, a family, protocol or flag the server's capabilities do not include, an
//! interface name without its NUL, a target address that is multicast or of the other
//! family, a conflict with a rule already in the table (same protocol, overlapping ports,
//! matching addresses), more than [`MAX_RULES`] rules or [`MAX_TABLE_PORTS`] ports.
//!
//! ## What forwarder does with a rule ([`Rule::realize`])
//!
//! A rule becomes one forward of `control`'s table: its ports as [`PortMap`]s (bound all or
//! nothing, or best effort when [`WEAK`]), or, with [`SCAN`], an `auto` restricted to its
//! range. What forwarder cannot serve yet is refused there, naming the rule: a target
//! address, an interface name (other than `lo` on the namespace side), a [`SCAN`] rule
//! whose target port differs from its first port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Auto, Kind, PortMap, SpecError};

/// A dual-stack rule: one `[::]` socket for both families.
pub const DUAL_STACK_ANY: u8 = 0x01;
/// Best effort: ports that cannot be bound are skipped.
pub const WEAK: u8 = 0x02;
/// Only ports bound on the other side (`auto`).
pub const SCAN: u8 = 0x04;
const FLAGS: u8 = DUAL_STACK_ANY | WEAK | SCAN;

/// Rules in one table at most (pasta's limit).
pub const MAX_RULES: usize = 255;
/// Ports in one table at most, counted over its rules (pasta's limit).
pub const MAX_TABLE_PORTS: u32 = 5 * 65536;

/// The size of a rule on the wire.
pub const RULE_SIZE: usize = 56;

/// What the server can do (pesto's capability bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps(pub u32);

impl Caps {
    /// IPv4 is enabled.
    pub const IPV4: u32 = 0x01;
    /// IPv6 is enabled.
    pub const IPV6: u32 = 0x02;
    /// TCP is forwarded.
    pub const TCP: u32 = 0x04;
    /// UDP is forwarded.
    pub const UDP: u32 = 0x08;
    /// `auto` is allowed.
    pub const SCAN: u32 = 0x10;
    /// Listening sockets can be bound to an interface.
    pub const IFNAME: u32 = 0x20;

    /// Whether every bit of `bits` is set.
    #[must_use]
    pub fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
}

/// TCP or UDP, by IP protocol number.
pub const TCP: u8 = 6;
/// UDP's IP protocol number.
pub const UDP: u8 = 17;

/// One rule, as its 56 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule(pub [u8; RULE_SIZE]);

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rule({self})")
    }
}

/// An address in a rule's encoding.
fn encode(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A rule's address, IPv4-mapped ones as IPv4.
fn decode(b: [u8; 16]) -> IpAddr {
    let a = Ipv6Addr::from(b);
    a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
}

impl Rule {
    /// A rule from its fields.
    #[must_use]
    pub fn new(
        addr: IpAddr,
        taddr: Option<IpAddr>,
        ifname: &str,
        (first, last, to): (u16, u16, u16),
        proto: u8,
        flags: u8,
    ) -> Self {
        let mut raw = [0u8; RULE_SIZE];
        raw[0..16].copy_from_slice(&encode(addr));
        if let Some(t) = taddr {
            raw[16..32].copy_from_slice(&encode(t));
        }
        for (dst, src) in raw[32..47].iter_mut().zip(ifname.bytes()) {
            *dst = src;
        }
        raw[48..50].copy_from_slice(&first.to_be_bytes());
        raw[50..52].copy_from_slice(&last.to_be_bytes());
        raw[52..54].copy_from_slice(&to.to_be_bytes());
        raw[54] = proto;
        raw[55] = flags;
        Self(raw)
    }

    /// The listening address (`::` for a dual-stack rule).
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        decode(self.addr_bytes())
    }

    fn addr_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.0[0..16]);
        b
    }

    /// The target address, `None` when unspecified.
    #[must_use]
    pub fn taddr(&self) -> Option<IpAddr> {
        let mut b = [0u8; 16];
        b.copy_from_slice(&self.0[16..32]);
        Some(decode(b)).filter(|a| !a.is_unspecified())
    }

    /// The interface name (up to its NUL).
    #[must_use]
    pub fn ifname(&self) -> String {
        let name = &self.0[32..48];
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(name.get(..end).unwrap_or_default()).into_owned()
    }

    /// First, last (inclusive) and the target of the first port.
    #[must_use]
    pub fn ports(&self) -> (u16, u16, u16) {
        let [.., f0, f1, l0, l1, t0, t1, _, _] = self.0;
        (
            u16::from_be_bytes([f0, f1]),
            u16::from_be_bytes([l0, l1]),
            u16::from_be_bytes([t0, t1]),
        )
    }

    /// The IP protocol number.
    #[must_use]
    pub fn proto(&self) -> u8 {
        self.0[54]
    }

    /// The flags.
    #[must_use]
    pub fn flags(&self) -> u8 {
        self.0[55]
    }

    fn dual(&self) -> bool {
        self.flags() & DUAL_STACK_ANY != 0
    }

    /// How many ports the rule listens on.
    #[must_use]
    pub fn width(&self) -> u32 {
        let (first, last, _) = self.ports();
        u32::from(last.saturating_sub(first)) + 1
    }

    /// What pasta's `fwd_rule_add()` refuses in one rule on its own, against `caps`.
    ///
    /// # Errors
    ///
    /// The reason, naming the rule.
    pub fn check(&self, caps: Caps) -> Result<(), SpecError> {
        let bad = |why: &str| Err(SpecError(format!("rule {self}: {why}")));
        let (first, last, to) = self.ports();
        if first == 0 || to == 0 || first > last {
            return bad("bad port range");
        }
        if u32::from(to) + u32::from(last - first) > u32::from(u16::MAX) {
            return bad("the target range goes past port 65535");
        }
        if self.flags() & !FLAGS != 0 {
            return bad("unknown flags");
        }
        if self.0[47] != 0 {
            return bad("the interface name is not terminated");
        }
        match self.proto() {
            TCP if caps.has(Caps::TCP) => {}
            UDP if caps.has(Caps::UDP) => {}
            TCP | UDP => return bad("that protocol is disabled"),
            _ => return bad("not TCP or UDP"),
        }
        let addr = self.addr();
        if self.dual() {
            if self.addr_bytes() != [0; 16] {
                return bad("a dual-stack rule must listen on ::");
            }
            if !caps.has(Caps::IPV4 | Caps::IPV6) {
                return bad("dual-stack, but not both IPv4 and IPv6 are enabled");
            }
        } else if addr.is_ipv4() && !caps.has(Caps::IPV4) {
            return bad("IPv4 is disabled");
        } else if addr.is_ipv6() && !caps.has(Caps::IPV6) {
            return bad("IPv6 is disabled");
        }
        if self.flags() & SCAN != 0 && !caps.has(Caps::SCAN) {
            return bad("auto is not allowed here");
        }
        if !self.ifname().is_empty() && !caps.has(Caps::IFNAME) && self.ifname() != "lo" {
            return bad("binding to an interface is not supported");
        }
        if let Some(t) = self.taddr() {
            if t.is_multicast() {
                return bad("the target address is multicast");
            }
            if self.dual() {
                return bad("a dual-stack rule cannot have a target address");
            }
            if t.is_ipv4() != addr.is_ipv4() {
                return bad("the target address is of the other family");
            }
        }
        Ok(())
    }

    /// Whether two rules cannot both be in one table (pasta's `fwd_rule_conflicts()`).
    #[must_use]
    pub fn conflicts(&self, other: &Self) -> bool {
        let (a1, b1, _) = self.ports();
        let (a2, b2, _) = other.ports();
        if self.proto() != other.proto() || b1 < a2 || b2 < a1 {
            return false;
        }
        let (x, y) = (self.addr(), other.addr());
        self.dual()
            || other.dual()
            || x == y
            || ((x.is_unspecified() || y.is_unspecified()) && x.is_ipv4() == y.is_ipv4())
    }

    /// What forwarder does with the rule, from `pif`'s table.
    ///
    /// # Errors
    ///
    /// What forwarder cannot serve yet, naming the rule.
    pub fn realize(&self, pif: Pif) -> Result<Realize, SpecError> {
        let bad = |why: &str| Err(SpecError(format!("rule {self}: {why}")));
        let udp = self.proto() == UDP;
        let kind = match (pif, udp) {
            (Pif::Host, false) => Kind::Tcp,
            (Pif::Host, true) => Kind::Udp,
            (Pif::Splice, false) => Kind::TcpNs,
            (Pif::Splice, true) => Kind::UdpNs,
        };
        let ifname = self.ifname();
        let iface = match pif {
            // The namespace side listens on loopback only: `lo` is what it does anyway.
            Pif::Splice if ifname.is_empty() || ifname == "lo" => None,
            Pif::Splice => return bad("the namespace side listens on lo only"),
            Pif::Host if ifname.is_empty() => None,
            Pif::Host => match super::IfName::new(&ifname) {
                Some(n) => Some(n),
                None => return bad("not an interface name"),
            },
        };
        let to_addr = self.taddr();
        if pif == Pif::Splice && to_addr.is_some() {
            return bad("the namespace side forwards to the host's loopback only");
        }
        let addr = self.addr();
        let bind = match pif {
            _ if self.dual() => None,
            // The namespace side listens on loopback only: "any" is its loopback.
            Pif::Splice if addr.is_unspecified() => Some(match addr {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            }),
            _ => Some(addr),
        };
        let (first, last, to) = self.ports();
        if self.flags() & SCAN != 0 {
            if to != first || to_addr.is_some() || iface.is_some() {
                return bad(
                    "auto forwards each port to the same port, without an interface or target address",
                );
            }
            return Ok(Realize::Scan(
                kind,
                Auto {
                    include: vec![(first, last)],
                    exclude: Vec::new(),
                    bind,
                },
            ));
        }
        let maps = (first..=last)
            .map(|p| PortMap {
                bind,
                iface,
                listen: p,
                to: to.wrapping_add(p - first),
                to_addr,
            })
            .collect();
        Ok(Realize::Ports {
            kind,
            maps,
            weak: self.flags() & WEAK != 0,
        })
    }
}

/// pesto's line for a rule (`fwd_rule_fmt()`): `TCP [*]%lo:1-32767  =>  1-32767 `, then
/// ` (best effort)` and ` (auto-scan)` as flagged.
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto() {
            TCP => "TCP".to_string(),
            UDP => "UDP".to_string(),
            n => format!("proto {n}"),
        };
        let addr = if self.dual() {
            "*".to_string()
        } else {
            self.addr().to_string()
        };
        let ifname = self.ifname();
        let ifname = if ifname.is_empty() {
            String::new()
        } else {
            format!("%{ifname}")
        };
        let (first, last, to) = self.ports();
        let range = |a: u16, b: u16| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        };
        let taddr = self.taddr().map(|t| format!("{t}:")).unwrap_or_default();
        let to_last = to.saturating_add(last.saturating_sub(first));
        write!(
            f,
            "{proto} [{addr}]{ifname}:{}  =>  {taddr}{} ",
            range(first, last),
            range(to, to_last)
        )?;
        if self.flags() & WEAK != 0 {
            write!(f, " (best effort)")?;
        }
        if self.flags() & SCAN != 0 {
            write!(f, " (auto-scan)")?;
        }
        Ok(())
    }
}

/// The tables pesto knows (pasta's pif ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pif {
    /// Listening on the host (`-t`/`-u`).
    Host,
    /// Listening in the namespace (`-T`/`-U`).
    Splice,
}

impl Pif {
    /// Both, in the order they are sent.
    pub const ALL: [Self; 2] = [Self::Host, Self::Splice];

    /// The id on the wire.
    #[must_use]
    pub fn id(self) -> u8 {
        match self {
            Self::Host => 1,
            Self::Splice => 3,
        }
    }

    /// The pif with wire id `id`.
    #[must_use]
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.id() == id)
    }

    /// Its name on the wire.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "HOST",
            Self::Splice => "SPLICE",
        }
    }

    /// The table a forward kind's rules go in.
    #[must_use]
    pub fn of(kind: Kind) -> Self {
        if kind.in_namespace() {
            Self::Splice
        } else {
            Self::Host
        }
    }
}

/// Every table's rules, in order: what an update sets, and what the command line gives.
pub type Tables = Vec<(Pif, Vec<Rule>)>;

/// What a rule is, in forwarder's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Realize {
    /// Listen on these ports (best effort when `weak`).
    Ports {
        /// Which way and protocol.
        kind: Kind,
        /// The ports.
        maps: Vec<PortMap>,
        /// Skip ports that cannot be bound.
        weak: bool,
    },
    /// Follow the ports bound on the other side, within the range.
    Scan(Kind, Auto),
}

/// One pif's table: rules in the order they came, checked as they are added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    rules: Vec<Rule>,
    ports: u32,
}

impl Table {
    /// The rules, in order.
    #[must_use]
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Adds `rule` after [`Rule::check`], refusing a conflict and the table's limits.
    ///
    /// # Errors
    ///
    /// The reason, naming the rule (and the rule it conflicts with).
    pub fn add(&mut self, rule: Rule, caps: Caps) -> Result<(), SpecError> {
        rule.check(caps)?;
        if let Some(old) = self.rules.iter().find(|r| r.conflicts(&rule)) {
            return Err(SpecError(format!(
                "forwarding configuration conflict: {rule}conflicts with {old}"
            )));
        }
        if self.rules.len() >= MAX_RULES {
            return Err(SpecError(format!(
                "more than {MAX_RULES} forwarding rules in one table"
            )));
        }
        let ports = self.ports + rule.width();
        if ports > MAX_TABLE_PORTS {
            return Err(SpecError(format!(
                "more than {MAX_TABLE_PORTS} forwarded ports in one table"
            )));
        }
        self.ports = ports;
        self.rules.push(rule);
        Ok(())
    }
}

/// Which side a spec is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    /// `-T`/`-U` (no listening address; loopback).
    pub splice: bool,
    /// UDP, not TCP.
    pub udp: bool,
}

/// Parses one `-t`/`-u`/`-T`/`-U` spec into pasta's rules, with the server's `caps` and
/// the host's ephemeral port range (`net.ipv4.ip_local_port_range`).
///
/// # Errors
///
/// [`SpecError`] naming the part that is wrong.
pub fn parse(
    spec: &str,
    side: Side,
    caps: Caps,
    ephemeral: (u16, u16),
) -> Result<Vec<Rule>, SpecError> {
    let err = |why: String| SpecError(format!("{spec:?}: {why}"));
    if spec == "none" {
        return Ok(Vec::new());
    }
    let proto = if side.udp { UDP } else { TCP };
    let (addr_part, ports) = match spec.split_once('/') {
        Some((a, p)) => (Some(a), p),
        None => (None, spec),
    };
    let (addr, ifname) = match addr_part {
        None | Some("") => (None, ""),
        Some(part) => {
            if side.splice {
                return Err(err("a listening address is not allowed for -T/-U".into()));
            }
            let (a, ifname) = part.split_once('%').unwrap_or((part, ""));
            if part.contains('%') {
                if ifname.is_empty() || ifname.len() > 15 || ifname == "." || ifname == ".." {
                    return Err(err(format!("{ifname:?} is not an interface name")));
                }
                if !caps.has(Caps::IFNAME) {
                    return Err(err(format!(
                        "%{ifname}: binding to an interface is not supported"
                    )));
                }
            }
            let addr = match a {
                "" | "*" => None,
                a => Some(ip(a).ok_or_else(|| err(format!("{a:?} is not an IP address")))?),
            };
            (addr, ifname)
        }
    };
    // Pass 1: exclusions, `auto`, `all`.
    let mut excluded = vec![false; 65536];
    let (mut scan, mut all, mut all_taddr, mut includes) = (false, false, None, Vec::new());
    for chunk in ports.split(',') {
        if chunk == "auto" {
            if !caps.has(Caps::SCAN) {
                return Err(err("auto is only allowed for pasta".into()));
            }
            scan = true;
        } else if let Some(ex) = chunk.strip_prefix('~') {
            let (a, b) = range(ex).map_err(err)?;
            for p in a..=b {
                if let Some(slot) = excluded.get_mut(usize::from(p)) {
                    *slot = true;
                }
            }
        } else if chunk == "all" || chunk.starts_with("all:") {
            all = true;
            if let Some(t) = chunk.strip_prefix("all:") {
                all_taddr = Some(ip(t).ok_or_else(|| err(format!("{t:?} is not an IP address")))?);
            }
        } else {
            includes.push(chunk);
        }
    }
    if all && (scan || !includes.is_empty()) {
        return Err(err("all cannot be combined with auto or ports".into()));
    }
    let mut runs: Vec<(u16, u16, u16, Option<IpAddr>, u8)> = Vec::new();
    if includes.is_empty() {
        // Every port but the excluded and the ephemeral ones, best effort.
        let flags = WEAK | if scan { SCAN } else { 0 };
        let mut p: u32 = 1;
        while p <= 65535 {
            let free = |p: u32| {
                let port = u16::try_from(p).unwrap_or(0);
                !excluded.get(usize::from(port)).copied().unwrap_or(true)
                    && !(ephemeral.0..=ephemeral.1).contains(&port)
            };
            if !free(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < 65535 && free(p + 1) {
                p += 1;
            }
            let (a, b) = (
                u16::try_from(start).unwrap_or(1),
                u16::try_from(p).unwrap_or(65535),
            );
            runs.push((a, b, a, all_taddr, flags));
            p += 1;
        }
    } else {
        let flags = if scan { SCAN } else { 0 };
        for chunk in includes {
            let (src, target) = match chunk.split_once(':') {
                Some((s, t)) => (s, Some(t)),
                None => (chunk, None),
            };
            let (a, b) = range(src).map_err(err)?;
            let (taddr, to) = match target {
                None => (None, (a, b)),
                Some(t) => target_of(t, (a, b)).map_err(|why| err(format!("{chunk:?}: {why}")))?,
            };
            if to.1 - to.0 != b - a {
                return Err(err(format!(
                    "{chunk:?}: the target range is not as long as the source"
                )));
            }
            let mut p = a;
            loop {
                if !excluded.get(usize::from(p)).copied().unwrap_or(false) {
                    let start = p;
                    while p < b && !excluded.get(usize::from(p) + 1).copied().unwrap_or(false) {
                        p += 1;
                    }
                    runs.push((start, p, to.0 + (start - a), taddr, flags));
                }
                if p >= b {
                    break;
                }
                p += 1;
            }
        }
    }
    // Addresses: the spec's, or each enabled family's "any" (one dual-stack rule when both).
    let v4 = caps.has(Caps::IPV4);
    let v6 = caps.has(Caps::IPV6);
    let mut listen: Vec<(IpAddr, &str, u8)> = Vec::new();
    match addr {
        Some(a) => listen.push((a, ifname, 0)),
        None if side.splice && !caps.has(Caps::IFNAME) => {
            if v4 {
                listen.push((IpAddr::V4(Ipv4Addr::LOCALHOST), "", 0));
            }
            if v6 {
                listen.push((IpAddr::V6(Ipv6Addr::LOCALHOST), "", 0));
            }
        }
        None => {
            let ifname = if side.splice { "lo" } else { ifname };
            if v4 && v6 {
                listen.push((IpAddr::V6(Ipv6Addr::UNSPECIFIED), ifname, DUAL_STACK_ANY));
            } else if v4 {
                listen.push((IpAddr::V4(Ipv4Addr::UNSPECIFIED), ifname, 0));
            } else {
                listen.push((IpAddr::V6(Ipv6Addr::UNSPECIFIED), ifname, 0));
            }
        }
    }
    let mut out = Vec::new();
    for (laddr, ifname, dual) in listen {
        for (a, b, to, taddr, flags) in &runs {
            if dual != 0 && taddr.is_some() {
                return Err(err(
                    "a target address needs a listening address of its family (0.0.0.0/ or [::]/)"
                        .into(),
                ));
            }
            out.push(Rule::new(
                laddr,
                *taddr,
                ifname,
                (*a, *b, *to),
                proto,
                flags | dual,
            ));
        }
    }
    Ok(out)
}

/// A target: `TADDR/C[-D]`, `TADDR` (the source ports) or `C[-D]`.
fn target_of(t: &str, src: (u16, u16)) -> Result<(Option<IpAddr>, (u16, u16)), String> {
    if let Some((a, ports)) = t.rsplit_once('/') {
        let addr = ip(a).ok_or_else(|| format!("{a:?} is not an IP address"))?;
        return Ok((Some(addr), range(ports)?));
    }
    if let Some(addr) = ip(t) {
        return Ok((Some(addr), src));
    }
    Ok((None, range(t)?))
}

/// An address, bracketed or bare.
fn ip(s: &str) -> Option<IpAddr> {
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s)
        .parse()
        .ok()
}

fn range(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("range {s:?} is reversed"));
            }
            Ok((a, b))
        }
        None => port(s).map(|p| (p, p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_CAPS: Caps = Caps(0x1f);
    const EPHEMERAL: (u16, u16) = (32768, 60999);
    const HOST_TCP: Side = Side {
        splice: false,
        udp: false,
    };

    fn hex(spec: &str, side: Side) -> Vec<String> {
        parse(spec, side, ALL_CAPS, EPHEMERAL)
            .unwrap()
            .iter()
            .map(|r| r.0.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .collect()
    }

    /// A rule's hex, as the live dumps of the real pasta (2026-07) printed it:
    /// addr, taddr, ifname, first, last, to, proto, flags.
    fn live(
        addr: &str,
        taddr: &str,
        ifname: &str,
        ports: (u16, u16, u16),
        proto: u8,
        flags: u8,
    ) -> String {
        let mut name = ifname
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        while name.len() < 32 {
            name.push('0');
        }
        format!(
            "{addr}{taddr}{name}{:04x}{:04x}{:04x}{proto:02x}{flags:02x}",
            ports.0, ports.1, ports.2
        )
    }

    const ZERO: &str = "00000000000000000000000000000000";

    #[test]
    fn specs_give_the_real_pastas_bytes() {
        // Each expectation is a rule the real pasta dumped for the same spec.
        for (spec, want) in [
            ("8080", vec![live(ZERO, ZERO, "", (8080, 8080, 8080), 6, 1)]),
            (
                "auto",
                vec![
                    live(ZERO, ZERO, "", (1, 32767, 1), 6, 7),
                    live(ZERO, ZERO, "", (61000, 65535, 61000), 6, 7),
                ],
            ),
            (
                "127.0.0.1/80",
                vec![live(
                    "00000000000000000000ffff7f000001",
                    ZERO,
                    "",
                    (80, 80, 80),
                    6,
                    0,
                )],
            ),
            (
                "[::1]/80",
                vec![live(
                    "00000000000000000000000000000001",
                    ZERO,
                    "",
                    (80, 80, 80),
                    6,
                    0,
                )],
            ),
            (
                "80-82:90-92",
                vec![live(ZERO, ZERO, "", (80, 82, 90), 6, 1)],
            ),
            (
                "10-20,~15",
                vec![
                    live(ZERO, ZERO, "", (10, 14, 10), 6, 1),
                    live(ZERO, ZERO, "", (16, 20, 16), 6, 1),
                ],
            ),
            (
                "0.0.0.0/5000:192.0.2.5/6000",
                vec![live(
                    "00000000000000000000ffff00000000",
                    "00000000000000000000ffffc0000205",
                    "",
                    (5000, 5000, 6000),
                    6,
                    0,
                )],
            ),
            (
                "::1/auto",
                vec![
                    live(
                        "00000000000000000000000000000001",
                        ZERO,
                        "",
                        (1, 32767, 1),
                        6,
                        6,
                    ),
                    live(
                        "00000000000000000000000000000001",
                        ZERO,
                        "",
                        (61000, 65535, 61000),
                        6,
                        6,
                    ),
                ],
            ),
            (
                "8000-8010,~8005,auto",
                vec![
                    live(ZERO, ZERO, "", (8000, 8004, 8000), 6, 5),
                    live(ZERO, ZERO, "", (8006, 8010, 8006), 6, 5),
                ],
            ),
            ("/82", vec![live(ZERO, ZERO, "", (82, 82, 82), 6, 1)]),
            (
                "[2001:db8::2]/84:[2001:db8::5]/85",
                vec![live(
                    "20010db8000000000000000000000002",
                    "20010db8000000000000000000000005",
                    "",
                    (84, 84, 85),
                    6,
                    0,
                )],
            ),
        ] {
            assert_eq!(hex(spec, HOST_TCP), want, "{spec}");
        }
        // With the interface capability, -T 9000 is pasta's `[*]%lo` rule.
        let caps = Caps(0x3f);
        let splice = Side {
            splice: true,
            udp: false,
        };
        let r = parse("9000", splice, caps, EPHEMERAL).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].to_string(), "TCP [*]%lo:9000  =>  9000 ");
        // Without it (forwarder's caps), two loopback rules.
        let r = parse("9000", splice, ALL_CAPS, EPHEMERAL).unwrap();
        let lines: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "TCP [127.0.0.1]:9000  =>  9000 ",
                "TCP [::1]:9000  =>  9000 "
            ]
        );
    }

    #[test]
    fn format_is_pestos() {
        let r = parse(
            "auto",
            Side {
                splice: false,
                udp: true,
            },
            ALL_CAPS,
            EPHEMERAL,
        )
        .unwrap();
        assert_eq!(
            r[0].to_string(),
            "UDP [*]:1-32767  =>  1-32767  (best effort) (auto-scan)"
        );
        let r = parse("0.0.0.0/5000:192.0.2.5/6000", HOST_TCP, ALL_CAPS, EPHEMERAL).unwrap();
        assert_eq!(r[0].to_string(), "TCP [0.0.0.0]:5000  =>  192.0.2.5:6000 ");
    }

    #[test]
    fn bad_specs_are_refused_like_pasta() {
        for (spec, says) in [
            ("22-23:2000", "not as long"),
            ("5000:192.0.2.5", "listening address of its family"),
            ("0", "\"0\""),
            ("x/80", "\"x\""),
            ("%eth0/80", "interface"),
            ("all,80", "all cannot"),
        ] {
            let e = parse(spec, HOST_TCP, ALL_CAPS, EPHEMERAL)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
        let e = parse("auto", HOST_TCP, Caps(0x0f), EPHEMERAL).unwrap_err();
        assert!(e.to_string().contains("only allowed for pasta"), "{e}");
        let splice = Side {
            splice: true,
            udp: false,
        };
        assert!(parse("127.0.0.1/80", splice, ALL_CAPS, EPHEMERAL).is_err());
    }

    #[test]
    fn tables_check_like_fwd_rule_add() {
        let mut t = Table::default();
        let r = |spec: &str| parse(spec, HOST_TCP, ALL_CAPS, EPHEMERAL).unwrap();
        for rule in r("80-90") {
            t.add(rule, ALL_CAPS).unwrap();
        }
        // Overlaps with the dual-stack rule: any address matches it.
        let e = t.add(r("127.0.0.1/85")[0], ALL_CAPS).unwrap_err();
        assert!(e.to_string().contains("conflict"), "{e}");
        // UDP on the same ports is no conflict.
        let udp = parse(
            "85",
            Side {
                splice: false,
                udp: true,
            },
            ALL_CAPS,
            EPHEMERAL,
        )
        .unwrap();
        t.add(udp[0], ALL_CAPS).unwrap();
        // Two specific addresses of one family do not conflict; "any" of it does.
        let mut t = Table::default();
        t.add(r("127.0.0.1/80")[0], ALL_CAPS).unwrap();
        t.add(r("127.0.0.2/80")[0], ALL_CAPS).unwrap();
        assert!(t.add(r("[::1]/80")[0], ALL_CAPS).is_ok());
        assert!(t.add(r("0.0.0.0/80")[0], ALL_CAPS).is_err());
        // Field checks.
        let mut bad = r("80")[0];
        bad.0[55] = 0x08;
        assert!(bad.check(ALL_CAPS).is_err(), "unknown flag");
        let mut bad = r("80")[0];
        bad.0[47] = b'x';
        assert!(bad.check(ALL_CAPS).is_err(), "ifname without NUL");
        let mut bad = r("80")[0];
        bad.0[54] = 1;
        assert!(bad.check(ALL_CAPS).is_err(), "ICMP");
        let mut bad = r("65535:65535")[0];
        bad.0[50..52].copy_from_slice(&65535u16.to_be_bytes());
        bad.0[48..50].copy_from_slice(&65530u16.to_be_bytes());
        bad.0[52..54].copy_from_slice(&65534u16.to_be_bytes());
        assert!(bad.check(ALL_CAPS).is_err(), "target overflow");
        assert!(
            r("80")[0].check(Caps(Caps::IPV4 | Caps::TCP)).is_err(),
            "dual without IPv6"
        );
        // Limits: 255 rules.
        let mut t = Table::default();
        for p in 1..=255u16 {
            t.add(r(&(p * 2).to_string())[0], ALL_CAPS).unwrap();
        }
        assert!(t.add(r("1")[0], ALL_CAPS).is_err());
    }

    #[test]
    fn rules_realize_as_forwards() {
        let r = |spec: &str| parse(spec, HOST_TCP, ALL_CAPS, EPHEMERAL).unwrap();
        let Realize::Ports { kind, maps, weak } = r("80-81:90-91")[0].realize(Pif::Host).unwrap()
        else {
            panic!("not ports")
        };
        assert_eq!((kind, weak), (Kind::Tcp, false));
        assert_eq!(
            maps.iter()
                .map(|m| (m.bind, m.listen, m.to))
                .collect::<Vec<_>>(),
            [(None, 80, 90), (None, 81, 91)]
        );
        let Realize::Scan(kind, auto) = r("::1/auto")[0].realize(Pif::Host).unwrap() else {
            panic!("not scan")
        };
        assert_eq!(kind, Kind::Tcp);
        assert_eq!(auto.include, [(1, 32767)]);
        assert_eq!(auto.bind, Some("::1".parse().unwrap()));
        let Realize::Ports { maps, .. } = r("0.0.0.0/5000:192.0.2.5/6000")[0]
            .realize(Pif::Host)
            .unwrap()
        else {
            panic!("not ports")
        };
        assert_eq!(
            (maps[0].bind, maps[0].to_addr, maps[0].to),
            (
                Some("0.0.0.0".parse().unwrap()),
                Some("192.0.2.5".parse().unwrap()),
                6000
            )
        );
        // -T with pasta's `lo` rule: both loopbacks.
        let lo = parse(
            "9000",
            Side {
                splice: true,
                udp: true,
            },
            Caps(0x3f),
            EPHEMERAL,
        )
        .unwrap();
        let Realize::Ports { kind, maps, .. } = lo[0].realize(Pif::Splice).unwrap() else {
            panic!("not ports")
        };
        assert_eq!((kind, maps[0].bind), (Kind::UdpNs, None));
    }
}
