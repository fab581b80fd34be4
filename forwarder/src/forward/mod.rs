//! # Theory of operation
//!
//! Port forwarding specs: pasta's `-t/--tcp-ports` and `-u/--udp-ports` (host →
//! namespace), `-T/--tcp-ns` and `-U/--udp-ns` (namespace loopback → host loopback), and
//! `--remote-forward`. This module is the pure part: the grammars, the port maps they give,
//! and the parser of `/proc/net` socket tables that `auto` reads. The table of forwards and
//! its changes at run time are `control`'s; the I/O shell binds the sockets (all or nothing:
//! a port that cannot be bound stops start-up, or the API request, before anything runs, and
//! the sockets already bound are closed with the error), accepts connections / receives
//! datagrams, and hands `-t`/`-u` clients to the engine, which opens a flow whose **target is
//! the guest** and whose initiator is the real client: the guest sees the connection or
//! datagram arrive from the client's own address and port, not from the gateway.
//!
//! ## Grammar (pasta's)
//!
//! `none` | `[ADDR[%IF]/]PORTS`, PORTS a comma list of `PORT`, `A-B`, `HOST:NS`, `A-B:C-D`
//! (ranges of equal length, or many ports to one), `HOST:TADDR`, `HOST:TADDR/NS`, and
//! exclusions `~PORT` / `~A-B` (removed from the ranges given in the same spec; a spec of
//! exclusions only is `all` but those, as pasta reads it). `ADDR` binds the listening
//! sockets to one host address (bare or in brackets: `2001:db8::1/80`, `[::1]/80`; `*` or
//! nothing: every address, both families); `%IF` binds them to one interface
//! (`SO_BINDTODEVICE`; `%IF/` alone too). `TADDR` sends the port's clients to that
//! namespace address instead of the guest's (same family as `ADDR`). When the part before
//! the first `/` is not an address but holds a `:`, the `/` is the target's
//! (`80:192.0.2.5/90`). pasta's own rules for the same specs (`-c`, pesto) are
//! [`rule`]'s, byte-exact with pasta.
//!
//! `auto` (pasta's): forward the ports that are bound on the other side, as they appear and
//! disappear. Plain ports and ranges next to it restrict it (`8000-8010,auto`), exclusions
//! apply (`auto,~22`), an address restricts where it listens (`::1/auto`). For `-t`/`-u` the namespace's sockets are read from its
//! `/proc/net/{tcp,udp}{,6}` (by the namespace agent, see `ns::Agent`) every
//! [`AUTO_SCAN_INTERVAL`]; sockets bound only to a loopback address are skipped (nothing
//! arriving over the tap could reach them), and so are ports forwarder itself bound there.
//! For `-T`/`-U` the host's own tables are read the same way, minus forwarder's own ports.
//! The host port is the namespace port; a port that cannot be bound on the other side (in
//! use) is logged once and retried at every scan.
//!
//! `all` (pasta's, `-t`/`-u` only): every port below the host's ephemeral range
//! (`net.ipv4.ip_local_port_range`) that can be bound, restricted and excluded like `auto`;
//! ports that cannot be bound (in use, privileged) are skipped, and start-up fails only when
//! none can. The soft open-file limit is raised to the hard one for it; at the limit the
//! ports bound so far are kept, less `io::FD_RESERVE` given back for flows, with a warning.
//!
//! ## Remote forwards (`--remote-forward`, slirpnetstack's `-R`)
//!
//! `[tcp|udp://]FIELDS`, FIELDS split on `:` outside `[...]`: `PORT`, `GUESTIP:PORT`,
//! `PORT:HOSTIP:HOSTPORT`, `GUESTIP:PORT:HOSTIP:HOSTPORT`; empty fields take the default. A
//! flow the namespace opens to GUESTIP:PORT is carried to HOSTIP:HOSTPORT on the host. GUESTIP
//! may be any address (default: the gateway, the IPv6 one when the spec has an IPv6
//! literal); HOSTIP defaults to the loopback of that family and HOSTPORT to PORT. No
//! listening socket is involved: the engine's policy rewrites the destination of matching
//! flows (see `policy`), before the firewall, which does not apply to remote forwards.
//!
//! ## Limits
//!
//! At most [`MAX_FORWARDS`] forwarded ports per protocol (each costs a socket).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::Protocol;

pub mod pesto;
pub mod rule;

/// A `--remote-forward`: the namespace's flows to `guest`:`port` go to `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteForward {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The destination the namespace uses; `None`: the gateway of `family_v6`'s family.
    pub guest: Option<IpAddr>,
    /// Whether the default guest address is the IPv6 gateway.
    pub family_v6: bool,
    /// Destination port in the namespace.
    pub port: u16,
    /// Where it goes on the host.
    pub host: SocketAddr,
}

/// Parses one `--remote-forward` spec.
///
/// # Errors
///
/// [`SpecError`] naming the part that is wrong.
pub fn parse_remote(spec: &str) -> Result<RemoteForward, SpecError> {
    let err = |why: String| SpecError(format!("{spec:?}: {why}"));
    let (protocol, fields) = match spec.split_once("://") {
        Some(("tcp", rest)) => (Protocol::Tcp, rest),
        Some(("udp", rest)) => (Protocol::Udp, rest),
        Some((other, _)) => {
            return Err(err(format!(
                "protocol {other:?} is not supported (tcp or udp)"
            )));
        }
        None => (Protocol::Tcp, spec),
    };
    let fields = split_fields(fields).map_err(err)?;
    let (guest, port, host_ip, host_port) = match fields.as_slice() {
        [p] => ("", *p, "", ""),
        [g, p] => (*g, *p, "", ""),
        [p, h, hp] => ("", *p, *h, *hp),
        [g, p, h, hp] => (*g, *p, *h, *hp),
        _ => {
            return Err(err(
                "expected PORT, IP:PORT, PORT:IP:PORT or IP:PORT:IP:PORT".into(),
            ));
        }
    };
    let ip = |s: &str| -> Result<Option<IpAddr>, SpecError> {
        if s.is_empty() {
            return Ok(None);
        }
        let bare = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(s);
        bare.parse()
            .map(Some)
            .map_err(|_| err(format!("{s:?} is not an IP address")))
    };
    let port_of = |s: &str| -> Result<u16, SpecError> {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(format!("{s:?} is not a port (1-65535)")))
    };
    let guest = ip(guest)?;
    let host_ip = ip(host_ip)?;
    let port = port_of(port)?;
    let host_port = if host_port.is_empty() {
        port
    } else {
        port_of(host_port)?
    };
    let family_v6 = guest.is_some_and(|a| a.is_ipv6()) || host_ip.is_some_and(|a| a.is_ipv6());
    let host_ip = host_ip.unwrap_or(if family_v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    });
    Ok(RemoteForward {
        protocol,
        guest,
        family_v6,
        port,
        host: SocketAddr::new(host_ip, host_port),
    })
}

/// Splits on `:` outside `[...]`.
fn split_fields(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0u32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).ok_or("unbalanced \"]\"")?,
            ':' if depth == 0 => {
                out.push(s.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced \"[\"".into());
    }
    out.push(s.get(start..).unwrap_or_default());
    Ok(out)
}

/// Which way and which protocol a forward goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `-t`: host TCP port → namespace, translated over the tap.
    Tcp,
    /// `-u`: host UDP port → namespace.
    Udp,
    /// `-T`: namespace TCP port → host loopback, spliced.
    TcpNs,
    /// `-U`: namespace UDP port → host loopback, relayed with recvmmsg/sendmmsg.
    UdpNs,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Self; 4] = [Self::Tcp, Self::Udp, Self::TcpNs, Self::UdpNs];

    /// The name in the API and in logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::TcpNs => "tcp-ns",
            Self::UdpNs => "udp-ns",
        }
    }

    /// The kind called `name`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The command-line option.
    #[must_use]
    pub fn option(self) -> &'static str {
        match self {
            Self::Tcp => "--tcp-ports",
            Self::Udp => "--udp-ports",
            Self::TcpNs => "--tcp-ns",
            Self::UdpNs => "--udp-ns",
        }
    }

    /// UDP, not TCP.
    #[must_use]
    pub fn is_udp(self) -> bool {
        matches!(self, Self::Udp | Self::UdpNs)
    }

    /// The sockets are bound in the namespace.
    #[must_use]
    pub fn in_namespace(self) -> bool {
        matches!(self, Self::TcpNs | Self::UdpNs)
    }
}

/// A parsed spec: a fixed list of ports, or `auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// These ports.
    Ports(Vec<PortMap>),
    /// Follow the ports bound on the other side.
    Auto(Auto),
    /// Every free port below the ephemeral range (the `Auto` holds the restrictions).
    All(Auto),
}

/// An `auto` spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auto {
    /// Only these ranges (empty: every port).
    pub include: Vec<(u16, u16)>,
    /// Never these.
    pub exclude: Vec<(u16, u16)>,
    /// Listen on this address only (`ADDR/auto`); `None`: every address.
    pub bind: Option<IpAddr>,
}

impl Auto {
    /// Whether `port` is followed.
    #[must_use]
    pub fn wants(&self, port: u16) -> bool {
        (self.include.is_empty() || self.include.iter().any(|(a, b)| (*a..=*b).contains(&port)))
            && !self.exclude.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }
}

/// Parses one `-t`/`-u`/`-T`/`-U` spec, `auto` included.
///
/// # Errors
///
/// [`SpecError`] naming the part that is wrong.
pub fn parse_spec(spec: &str) -> Result<Spec, SpecError> {
    let err = |why: String| SpecError(format!("{spec:?}: {why}"));
    if spec == "none" {
        return Ok(Spec::Ports(Vec::new()));
    }
    let (at, ports) = listen_part(spec).map_err(err)?;
    let items: Vec<&str> = ports.split(',').collect();
    let all = items.contains(&"all");
    // Only exclusions: every port but those, as pasta reads it (`~22` is `all,~22`).
    let only_excluded = items.iter().all(|i| i.starts_with('~'));
    if !items.contains(&"auto") && !all && !only_excluded {
        return parse(spec).map(Spec::Ports);
    }
    if at.iface.is_some() {
        return Err(err(
            "auto and all listen on every interface (%IF is for port lists)".into(),
        ));
    }
    let mut auto = Auto {
        bind: at.bind,
        ..Auto::default()
    };
    for item in items {
        if item == "auto" || item == "all" {
            if all && item == "auto" {
                return Err(err("auto and all exclude each other".into()));
            }
            continue;
        }
        if let Some(ex) = item.strip_prefix('~') {
            auto.exclude.push(range(ex).map_err(err)?);
        } else if item.contains(':') {
            return Err(err(format!(
                "{item:?}: auto and all forward each port to the same port"
            )));
        } else {
            auto.include.push(range(item).map_err(err)?);
        }
    }
    Ok(if all || only_excluded {
        Spec::All(auto)
    } else {
        Spec::Auto(auto)
    })
}

/// A socket found bound in a `/proc/net/{tcp,udp}{,6}` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Local address.
    pub addr: IpAddr,
    /// Local port.
    pub port: u16,
}

/// The listening (TCP) or unconnected bound (UDP) sockets of both `/proc/net` tables of a
/// protocol (`tcp` and `tcp6`, or `udp` and `udp6`), each table read with `read` — which
/// decides what a table that cannot be read means (an error, or no sockets). `/proc/net`
/// shows the network namespace of whoever opens it.
///
/// # Errors
///
/// What `read` returns for a table.
pub fn read_bound<E>(
    udp: bool,
    mut read: impl FnMut(&str) -> Result<String, E>,
) -> Result<Vec<Bound>, E> {
    let mut all = Vec::new();
    for (table, v6) in [
        (if udp { "udp" } else { "tcp" }, false),
        (if udp { "udp6" } else { "tcp6" }, true),
    ] {
        all.extend(parse_proc_net(
            &read(&format!("/proc/net/{table}"))?,
            v6,
            udp,
        ));
    }
    Ok(all)
}

/// The listening (TCP) or unconnected bound (UDP) sockets of one `/proc/net` table; `v6`
/// for the `tcp6`/`udp6` tables. Lines that do not parse are skipped.
#[must_use]
pub fn parse_proc_net(text: &str, v6: bool, udp: bool) -> Vec<Bound> {
    // TCP_LISTEN is 0x0A; an unconnected UDP socket shows TCP_CLOSE, 0x07.
    let want = if udp { "07" } else { "0A" };
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(local), Some(remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if state != want {
            continue;
        }
        if udp && !remote.ends_with(":0000") {
            continue;
        }
        let Some((addr, port)) = local.split_once(':') else {
            continue;
        };
        let (Some(addr), Ok(port)) = (proc_addr(addr, v6), u16::from_str_radix(port, 16)) else {
            continue;
        };
        if port != 0 {
            out.push(Bound { addr, port });
        }
    }
    out
}

/// `/proc/net` prints addresses as 32-bit words in host byte order, in hex.
fn proc_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    if v6 {
        if hex.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, chunk) in b.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&word(i)?);
        }
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        (hex.len() == 8).then(|| word(0).map(|w| IpAddr::V4(Ipv4Addr::from(w))))?
    }
}

/// How often `auto` looks at the other side's sockets (pasta's interval).
pub const AUTO_SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// One forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMap {
    /// Host address to listen on; `None`: all addresses.
    pub bind: Option<IpAddr>,
    /// Listen on this interface only (`ADDR%IF/`, `SO_BINDTODEVICE`); `-t`/`-u` only.
    pub iface: Option<IfName>,
    /// The port listened on: on the host for `-t`/`-u`, in the namespace for `-T`.
    pub listen: u16,
    /// The port connected to: in the namespace for `-t`/`-u`, on the host for `-T`.
    pub to: u16,
    /// The address connected to in the namespace (`:TADDR`); `None`: the guest's address.
    /// `-t`/`-u` only.
    pub to_addr: Option<IpAddr>,
}

impl PortMap {
    /// `listen` → `to` on every address, no interface, to the guest.
    #[must_use]
    pub fn new(bind: Option<IpAddr>, listen: u16, to: u16) -> Self {
        Self {
            bind,
            iface: None,
            listen,
            to,
            to_addr: None,
        }
    }

    /// Where a client of this port goes in the namespace.
    #[must_use]
    pub fn dest(&self) -> Dest {
        Dest {
            addr: self.to_addr,
            port: self.to,
        }
    }
}

/// Where a forwarded client goes in the namespace: an address (`None`: the guest's, of the
/// client's family) and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dest {
    /// The target address, if not the guest's.
    pub addr: Option<IpAddr>,
    /// The target port.
    pub port: u16,
}

impl From<u16> for Dest {
    fn from(port: u16) -> Self {
        Self { addr: None, port }
    }
}

/// An interface name (1–15 bytes, as `IFNAMSIZ` allows), kept inline so a [`PortMap`]
/// stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IfName([u8; 16]);

impl IfName {
    /// `name`, if it is one: 1–15 bytes, no `/`, whitespace or NUL, not `.` or `..`.
    #[must_use]
    pub fn new(name: &str) -> Option<Self> {
        let ok = (1..16).contains(&name.len())
            && name != "."
            && name != ".."
            && !name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
        ok.then(|| {
            let mut raw = [0u8; 16];
            for (d, s) in raw.iter_mut().zip(name.bytes()) {
                *d = s;
            }
            Self(raw)
        })
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|b| *b == 0).unwrap_or(self.0.len());
        std::str::from_utf8(self.0.get(..end).unwrap_or_default()).unwrap_or_default()
    }
}

impl std::fmt::Debug for IfName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The address part of a spec, before its first `/`: `ADDR`, `[ADDR]`, `*`, each with an
/// optional `%IF`, or `%IF` alone, or nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Listen {
    bind: Option<IpAddr>,
    iface: Option<IfName>,
}

/// Splits a spec into its address part and its ports.
fn listen_part(spec: &str) -> Result<(Listen, &str), String> {
    let Some((part, ports)) = spec.split_once('/') else {
        return Ok((Listen::default(), spec));
    };
    let (addr, iface) = match part.split_once('%') {
        Some((a, name)) => (
            a,
            Some(IfName::new(name).ok_or_else(|| format!("{name:?} is not an interface name"))?),
        ),
        None => (part, None),
    };
    let bind = match addr {
        "" | "*" => None,
        a => match ip_of(a) {
            Some(ip) => Some(ip),
            // `80:192.0.2.5/6000`: the `/` is the target's; there is no listening address.
            None if iface.is_none() && a.contains(':') => {
                return Ok((Listen::default(), spec));
            }
            None => return Err(format!("{a:?} is not an IP address")),
        },
    };
    Ok((Listen { bind, iface }, ports))
}

/// An address, bare or in brackets.
fn ip_of(s: &str) -> Option<IpAddr> {
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s)
        .parse()
        .ok()
}

/// Why a spec did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(String);

/// Parses one `-t`/`-u` spec.
///
/// # Errors
///
/// [`SpecError`] naming the part that is wrong.
pub fn parse(spec: &str) -> Result<Vec<PortMap>, SpecError> {
    let err = |why: String| SpecError(format!("{spec:?}: {why}"));
    if spec == "none" {
        return Ok(Vec::new());
    }
    let (at, ports) = listen_part(spec).map_err(err)?;
    let mut maps: Vec<PortMap> = Vec::new();
    let mut excluded: Vec<(u16, u16)> = Vec::new();
    for item in ports.split(',') {
        if let Some(ex) = item.strip_prefix('~') {
            excluded.push(range(ex).map_err(err)?);
            continue;
        }
        let (host, target) = match item.split_once(':') {
            Some((h, t)) => (range(h).map_err(err)?, Some(t)),
            None => (range(item).map_err(err)?, None),
        };
        // TARGET: NS ports, TADDR, or TADDR/NS ports.
        let (to_addr, ns) = match target {
            None => (None, host),
            Some(t) => match t.rsplit_once('/') {
                Some((a, p)) => (
                    Some(ip_of(a).ok_or_else(|| err(format!("{a:?} is not an IP address")))?),
                    range(p).map_err(err)?,
                ),
                None => match ip_of(t) {
                    Some(a) => (Some(a), host),
                    None => (None, range(t).map_err(err)?),
                },
            },
        };
        if let (Some(a), Some(b)) = (to_addr, at.bind)
            && a.is_ipv4() != b.is_ipv4()
        {
            return Err(err(format!(
                "{item:?}: the target address is not of the listening address's family"
            )));
        }
        if to_addr.is_some_and(|a| a.is_multicast() || a.is_unspecified()) {
            return Err(err(format!("{item:?}: the target address cannot be used")));
        }
        let (len_h, len_n) = (host.1 - host.0, ns.1 - ns.0);
        if len_n != 0 && len_n != len_h {
            return Err(err(format!("{item:?}: the two ranges differ in length")));
        }
        for (i, port) in (host.0..=host.1).enumerate() {
            let offset = u16::try_from(i).unwrap_or(0);
            let ns_port = if len_n == 0 { ns.0 } else { ns.0 + offset };
            maps.push(PortMap {
                bind: at.bind,
                iface: at.iface,
                listen: port,
                to: ns_port,
                to_addr,
            });
        }
    }
    maps.retain(|m| !excluded.iter().any(|(a, b)| (*a..=*b).contains(&m.listen)));
    if maps.is_empty() {
        return Err(err("no port left to forward".into()));
    }
    if maps.len() > MAX_FORWARDS {
        return Err(err(format!("more than {MAX_FORWARDS} ports")));
    }
    Ok(maps)
}

/// Joins several specs, refusing a host port given twice for the same address. With
/// `all`, the [`MAX_FORWARDS`] bound does not apply (`all` is bounded by the port space).
///
/// # Errors
///
/// [`SpecError`] naming the duplicated port.
pub fn join(specs: &[Vec<PortMap>], all: bool) -> Result<Vec<PortMap>, SpecError> {
    let mut seen: std::collections::HashMap<u16, Vec<Option<IpAddr>>> =
        std::collections::HashMap::new();
    let mut out: Vec<PortMap> = Vec::new();
    for m in specs.iter().flatten() {
        let binds = seen.entry(m.listen).or_default();
        if binds
            .iter()
            .any(|b| b.is_none() || m.bind.is_none() || *b == m.bind)
        {
            return Err(SpecError(format!("port {} is forwarded twice", m.listen)));
        }
        binds.push(m.bind);
        out.push(*m);
    }
    if !all && out.len() > MAX_FORWARDS {
        return Err(SpecError(format!("more than {MAX_FORWARDS} ports")));
    }
    Ok(out)
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
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
    }
}

/// Forwarded ports per protocol.
pub const MAX_FORWARDS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(spec: &str) -> Vec<(u16, u16)> {
        parse(spec)
            .unwrap()
            .iter()
            .map(|m| (m.listen, m.to))
            .collect()
    }

    #[test]
    fn grammar() {
        assert_eq!(ports("8080"), vec![(8080, 8080)]);
        assert_eq!(ports("8080:80"), vec![(8080, 80)]);
        assert_eq!(ports("1-3"), vec![(1, 1), (2, 2), (3, 3)]);
        assert_eq!(ports("10-12:20-22"), vec![(10, 20), (11, 21), (12, 22)]);
        assert_eq!(ports("10-12:80"), vec![(10, 80), (11, 80), (12, 80)]);
        assert_eq!(ports("1-5,~2-3"), vec![(1, 1), (4, 4), (5, 5)]);
        assert_eq!(ports("22,80"), vec![(22, 22), (80, 80)]);
        assert!(parse("none").unwrap().is_empty());
        let m = parse("2001:db8::1/80").unwrap();
        assert_eq!(m[0].bind, Some("2001:db8::1".parse().unwrap()));
        let m = parse("198.51.100.2/8080:80").unwrap();
        assert_eq!(
            (m[0].bind.unwrap().to_string(), m[0].listen, m[0].to),
            ("198.51.100.2".into(), 8080, 80)
        );
        // pasta's newer forms: brackets, an interface, a target address.
        let m = parse("[2001:db8::1]%veth0/80").unwrap();
        assert_eq!(m[0].bind, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(m[0].iface.unwrap().as_str(), "veth0");
        let m = parse("%lo/81").unwrap();
        assert_eq!((m[0].bind, m[0].iface.unwrap().as_str()), (None, "lo"));
        let m = parse("0.0.0.0/5000:192.0.2.5/6000,5001:192.0.2.6").unwrap();
        assert_eq!(
            m.iter()
                .map(|m| (m.listen, m.to_addr.unwrap().to_string(), m.to))
                .collect::<Vec<_>>(),
            [
                (5000, "192.0.2.5".into(), 6000),
                (5001, "192.0.2.6".into(), 5001)
            ]
        );
        let m = parse("80-81:[2001:db8::5]/90-91").unwrap();
        assert_eq!(
            (m[1].to_addr.unwrap().to_string(), m[1].to),
            ("2001:db8::5".into(), 91)
        );
    }

    #[test]
    fn auto_grammar() {
        let Spec::Auto(a) = parse_spec("8000-8010,auto,~8005").unwrap() else {
            panic!("not auto")
        };
        assert!(a.wants(8000) && a.wants(8010) && !a.wants(8005) && !a.wants(80));
        let Spec::Auto(a) = parse_spec("auto").unwrap() else {
            panic!("not auto")
        };
        assert!(a.wants(1) && a.wants(65535));
        assert!(
            parse_spec("auto,80:81")
                .unwrap_err()
                .to_string()
                .contains("same port")
        );
        // pasta's forms: an address for auto, exclusions alone meaning all but those.
        let Spec::Auto(a) = parse_spec("[::1]/auto").unwrap() else {
            panic!("not auto")
        };
        assert_eq!(a.bind, Some("::1".parse().unwrap()));
        let Spec::All(a) = parse_spec("~22,~80-90").unwrap() else {
            panic!("not all")
        };
        assert!(a.include.is_empty() && !a.wants(22) && !a.wants(85) && a.wants(23));
        assert_eq!(
            parse_spec("80").unwrap(),
            Spec::Ports(vec![PortMap::new(None, 80, 80)])
        );
    }

    #[test]
    fn proc_net_tables() {
        // Lines as Linux prints them (little-endian host).
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0264330A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0264330A:0050 0164330A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
   garbage";
        let got = parse_proc_net(tcp, false, false);
        assert_eq!(
            got,
            vec![
                Bound {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 8080
                },
                Bound {
                    addr: "10.51.100.2".parse().unwrap(),
                    port: 80
                },
            ]
        );
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0
   1: B80D0120000000000000000002000000:01BB 00000000000000000000000000000000:0000 0A 0";
        let got = parse_proc_net(tcp6, true, false);
        assert_eq!(got[0].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(got[0].port, 22);
        assert_eq!(got[1].addr, "2001:db8::2".parse::<IpAddr>().unwrap());
        let udp = "  sl  local_address rem_address   st
  1: 00000000:0035 00000000:0000 07 0
  2: 0100007F:0036 0100007F:0035 01 0";
        assert_eq!(parse_proc_net(udp, false, true).len(), 1);
    }

    #[test]
    fn remote_grammar() {
        let r = parse_remote("8080").unwrap();
        assert_eq!(
            (r.protocol, r.guest, r.port, r.host.to_string()),
            (Protocol::Tcp, None, 8080, "127.0.0.1:8080".into())
        );
        let r = parse_remote("udp://198.51.100.7:53:203.0.113.1:5353").unwrap();
        assert_eq!(
            (r.protocol, r.guest, r.port, r.host.to_string()),
            (
                Protocol::Udp,
                Some("198.51.100.7".parse().unwrap()),
                53,
                "203.0.113.1:5353".into()
            )
        );
        let r = parse_remote("[2001:db8::7]:80::8080").unwrap();
        assert_eq!(r.host.to_string(), "[::1]:8080");
        assert!(r.family_v6);
        let r = parse_remote("80:[2001:db8::1]:81").unwrap();
        assert_eq!(
            (r.guest, r.host.to_string()),
            (None, "[2001:db8::1]:81".into())
        );
        assert!(r.family_v6);
    }

    #[test]
    fn errors_name_the_part() {
        for (bad, names) in [
            ("0", "\"0\""),
            ("70000", "70000"),
            ("5-1", "reversed"),
            ("1-3:1-2", "differ"),
            ("x/80", "\"x\""),
            ("1,~1", "no port left"),
            ("%/80", "interface name"),
            ("127.0.0.1/80:[::1]/80", "family"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(names), "{bad}: {e}");
        }
        for (bad, names) in [
            ("sctp://80", "sctp"),
            ("0", "\"0\""),
            ("x:80", "\"x\""),
            ("1:2:3:4:5", "expected"),
            ("[::1:80", "unbalanced"),
        ] {
            let e = parse_remote(bad).unwrap_err().to_string();
            assert!(e.contains(names), "{bad}: {e}");
        }
        let twice = join(&[parse("80").unwrap(), parse("79-81").unwrap()], false).unwrap_err();
        assert!(twice.to_string().contains("port 80"), "{twice}");
    }
}
