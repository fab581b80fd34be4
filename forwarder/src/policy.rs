//! # Theory of operation
//!
//! Where a flow the namespace opens may go, and where its host socket actually connects.
//! Pure: the engine asks [`Policy::route`] once per new TCP or UDP flow, with the protocol
//! and the destination the guest named, and gets the host-side target or the reason for a
//! refusal (TCP then gets a RST, UDP an ICMP administratively-prohibited).
//!
//! ## Mapping (before the firewall)
//!
//! * `--remote-forward`: protocol, destination address and port → a host address and port
//!   (checked first; not subject to `--deny` either, like slirpnetstack's `-R`);
//! * the IPv4 gateway → `127.0.0.1`, the IPv6 gateway and forwarder's link-local address →
//!   `::1` (pasta's `--map-gw`, on by default; `--no-map-gw` turns it off);
//! * `--map-guest-addr ADDR` → the host's own address that the namespace mirrors;
//! * `--dns-forward ADDR`, port 53 → the first resolver of the host's resolv.conf (which
//!   may be a systemd-resolved stub on 127.0.0.53: host sockets reach the host's loopback).
//!
//! A mapped destination is an explicit feature, so the blocklist and the host/routing
//! classes do not apply to it; `--deny` rules still do (they match the address the guest
//! named).
//!
//! ## Firewall (slirpnetstack's, `COMPAT.md`), first match wins
//!
//! 1. a `--deny` rule matches → refused;
//! 2. an `--allow` rule matches → allowed;
//! 3. the fixed [`BLOCKLIST`] (unspecified, loopback, broadcast, multicast, IPv4-mapped and
//!    -compatible IPv6, NAT64, link-local IPv6) → refused;
//! 4. the destination is host-local (an address or directly connected prefix of the host:
//!    its `local` and `main` routing tables minus default routes, rescanned every
//!    [`RESCAN_INTERVAL`] by the control plane) → allowed iff `host` is on;
//! 5. anything else → allowed iff `routing` is on.
//!
//! The native default has both `routing` and `host` on (like pasta), so rules refine it.
//! Giving `--enable-routing` or `--enable-host` switches to slirpnetstack's semantics: only
//! the classes named are allowed.
//!
//! Rule syntax: `[tcp|udp://]ADDR[/LEN][:PORT[-PORT]]`, IPv6 in brackets
//! (`udp://[2001:db8::/32]:53`). A rule without a protocol matches both; without a port,
//! every port.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use crate::flow::Protocol;

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The network address.
    pub addr: IpAddr,
    /// Its length.
    pub len: u8,
}

impl Prefix {
    /// A prefix; `len` is clamped to the family's width.
    #[must_use]
    pub fn new(addr: IpAddr, len: u8) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Self {
            addr,
            len: len.min(max),
        }
    }

    /// Whether `ip` lies in the prefix (same family only).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One `--allow` / `--deny` item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// `None`: TCP and UDP.
    pub protocol: Option<Protocol>,
    /// Destination prefix.
    pub prefix: Prefix,
    /// Inclusive port range; `None`: every port.
    pub ports: Option<(u16, u16)>,
}

impl Rule {
    fn matches(&self, protocol: Protocol, dst: IpAddr, port: u16) -> bool {
        self.protocol.is_none_or(|p| p == protocol)
            && self.prefix.contains(dst)
            && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

/// Why a rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(String);

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| RuleError(format!("{s:?}: {why}"));
        let (protocol, rest) = match s.split_once("://") {
            Some(("tcp", rest)) => (Some(Protocol::Tcp), rest),
            Some(("udp", rest)) => (Some(Protocol::Udp), rest),
            Some((other, _)) => {
                return Err(err(&format!(
                    "unknown protocol {other:?} (expected tcp or udp)"
                )));
            }
            None => (None, s),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) = inner
                .split_once(']')
                .ok_or_else(|| err("missing ']' after an IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("expected ':PORT' after ']'"))?,
                ),
            };
            (host, port)
        } else {
            match rest.split_once(':') {
                Some((host, port)) if !port.contains(':') => (host, Some(port)),
                Some(_) => return Err(err("IPv6 addresses must be in brackets")),
                None => (rest, None),
            }
        };
        let (addr, len) = match host.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (host, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| err(&format!("{addr:?} is not an IP address")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| err(&format!("prefix length {l:?} is not 0-{max}")))?,
            None => max,
        };
        let ports = match port {
            None => None,
            Some(p) => {
                let parse = |x: &str| {
                    x.parse::<u16>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| err(&format!("port {x:?} is not 1-65535")))
                };
                let (lo, hi) = match p.split_once('-') {
                    Some((lo, hi)) => (parse(lo)?, parse(hi)?),
                    None => (parse(p)?, parse(p)?),
                };
                if lo > hi {
                    return Err(err("port range is reversed"));
                }
                Some((lo, hi))
            }
        };
        Ok(Self {
            protocol,
            prefix: Prefix::new(addr, len),
            ports,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.protocol {
            write!(f, "{}://", p.name())?;
        }
        match self.prefix.addr {
            IpAddr::V4(a) => write!(f, "{a}/{}", self.prefix.len)?,
            IpAddr::V6(a) => write!(f, "[{a}/{}]", self.prefix.len)?,
        }
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}"),
            Some((lo, hi)) => write!(f, ":{lo}-{hi}"),
            None => Ok(()),
        }
    }
}

/// The configured policy and mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `--allow` rules.
    pub allow: Vec<Rule>,
    /// `--deny` rules.
    pub deny: Vec<Rule>,
    /// Destinations beyond the host allowed.
    pub routing: bool,
    /// Host-local destinations allowed.
    pub host: bool,
    /// Map the gateway to the host's loopback.
    pub map_gw: bool,
    /// `(gateway-side address, host address)` pairs: the gateways (when `map_gw`) and
    /// `--map-guest-addr`.
    pub maps: Vec<(IpAddr, IpAddr)>,
    /// `--dns-forward`: DNS to this address goes to `resolver`.
    pub dns_forward: Option<IpAddr>,
    /// The host's resolver for `dns_forward`.
    pub resolver: Option<IpAddr>,
    /// Host-local prefixes (rescanned).
    pub local: Vec<Prefix>,
    /// `--remote-forward`s: `(protocol, destination, port)` → host socket address.
    pub remote: Vec<(Protocol, IpAddr, u16, std::net::SocketAddr)>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            routing: true,
            host: true,
            map_gw: true,
            maps: Vec::new(),
            dns_forward: None,
            resolver: None,
            local: Vec::new(),
            remote: Vec::new(),
        }
    }
}

/// Why a flow was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A `--deny` rule matched.
    Rule,
    /// The fixed blocklist.
    Blocklist,
    /// Host-local and `host` is off.
    Host,
    /// Beyond the host and `routing` is off.
    Routing,
}

impl Denied {
    /// Stable name for logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Rule => "deny_rule",
            Self::Blocklist => "blocklist",
            Self::Host => "host_local",
            Self::Routing => "routing",
        }
    }
}

impl Policy {
    /// The host-side target for a new flow to `dst`:`port`, or why it is refused.
    ///
    /// # Errors
    ///
    /// [`Denied`] with the first reason that applies.
    pub fn route(
        &self,
        protocol: Protocol,
        dst: IpAddr,
        port: u16,
    ) -> Result<(IpAddr, u16), Denied> {
        if let Some((.., to)) = self
            .remote
            .iter()
            .find(|(p, a, n, _)| *p == protocol && *a == dst && *n == port)
        {
            return Ok((to.ip(), to.port()));
        }
        if self.deny.iter().any(|r| r.matches(protocol, dst, port)) {
            return Err(Denied::Rule);
        }
        if port == DNS_PORT
            && self.dns_forward == Some(dst)
            && let Some(resolver) = self.resolver
        {
            return Ok((resolver, port));
        }
        if let Some((_, to)) = self.maps.iter().find(|(from, _)| *from == dst) {
            return Ok((*to, port));
        }
        if self.allow.iter().any(|r| r.matches(protocol, dst, port)) {
            return Ok((dst, port));
        }
        if is_blocked(dst) {
            return Err(Denied::Blocklist);
        }
        if self.local.iter().any(|p| p.contains(dst)) {
            return if self.host {
                Ok((dst, port))
            } else {
                Err(Denied::Host)
            };
        }
        if self.routing {
            Ok((dst, port))
        } else {
            Err(Denied::Routing)
        }
    }
}

/// Whether `ip` is on the fixed blocklist.
#[must_use]
pub fn is_blocked(ip: IpAddr) -> bool {
    BLOCKLIST
        .iter()
        .any(|(a, l)| Prefix::new(*a, *l).contains(ip))
}

/// Destinations no flow may reach (slirpnetstack's list, plus multicast and IPv6
/// link-local, which a host socket cannot reach without a scope).
pub const BLOCKLIST: [(IpAddr, u8); 11] = [
    (IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)), 8),
    (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
    (IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), 4),
    (IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)), 32),
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
    (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 96),
    (IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)), 96),
    (
        IpAddr::V6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0)),
        96,
    ),
    (IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
    (IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)), 8),
];
/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// How often the control plane rescans the host's local prefixes.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rule_grammar() {
        let r: Rule = "tcp://203.0.113.0/24:80-90".parse().unwrap();
        assert_eq!(r.protocol, Some(Protocol::Tcp));
        assert_eq!(r.prefix, Prefix::new(ip("203.0.113.0"), 24));
        assert_eq!(r.ports, Some((80, 90)));
        let r: Rule = "udp://[2001:db8::/32]:53".parse().unwrap();
        assert_eq!(r.protocol, Some(Protocol::Udp));
        assert_eq!(r.prefix.len, 32);
        assert_eq!(r.ports, Some((53, 53)));
        let r: Rule = "198.51.100.7".parse().unwrap();
        assert_eq!((r.protocol, r.prefix.len, r.ports), (None, 32, None));
        let r: Rule = "[2001:db8::1]".parse().unwrap();
        assert_eq!(r.prefix.len, 128);
        assert_eq!(r.to_string(), "[2001:db8::1/128]");
        for bad in [
            "sctp://1.2.3.4",
            "1.2.3.4/33",
            "1.2.3.4:0",
            "1.2.3.4:90-80",
            "2001:db8::1",
            "[2001:db8::1",
            "example",
            "1.2.3.4:x",
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e} names {bad}");
        }
    }

    #[test]
    fn first_match_order() {
        let mut p = Policy {
            deny: vec!["tcp://203.0.113.0/24:22".parse().unwrap()],
            allow: vec!["127.0.0.1:8080".parse().unwrap()],
            local: vec![Prefix::new(ip("198.51.100.0"), 24)],
            ..Policy::default()
        };
        let t = Protocol::Tcp;
        assert_eq!(p.route(t, ip("203.0.113.1"), 22), Err(Denied::Rule));
        assert!(p.route(Protocol::Udp, ip("203.0.113.1"), 22).is_ok());
        assert_eq!(
            p.route(t, ip("203.0.113.1"), 80),
            Ok((ip("203.0.113.1"), 80))
        );
        // An allow rule overrides the blocklist.
        assert!(p.route(t, ip("127.0.0.1"), 8080).is_ok());
        assert_eq!(p.route(t, ip("127.0.0.1"), 8081), Err(Denied::Blocklist));
        assert_eq!(
            p.route(t, ip("::ffff:203.0.113.1"), 80),
            Err(Denied::Blocklist)
        );
        assert_eq!(p.route(t, ip("::1"), 80), Err(Denied::Blocklist));
        assert_eq!(p.route(t, ip("fe80::1"), 80), Err(Denied::Blocklist));
        assert!(p.route(t, ip("198.51.100.2"), 80).is_ok());
        p.host = false;
        assert_eq!(p.route(t, ip("198.51.100.2"), 80), Err(Denied::Host));
        assert!(p.route(t, ip("203.0.113.1"), 80).is_ok());
        p.routing = false;
        assert_eq!(p.route(t, ip("203.0.113.1"), 80), Err(Denied::Routing));
    }

    #[test]
    fn maps_and_dns_forward() {
        let p = Policy {
            maps: vec![(ip("198.51.100.1"), ip("127.0.0.1"))],
            dns_forward: Some(ip("198.51.100.53")),
            resolver: Some(ip("127.0.0.53")),
            routing: false,
            host: false,
            ..Policy::default()
        };
        assert_eq!(
            p.route(Protocol::Tcp, ip("198.51.100.1"), 80),
            Ok((ip("127.0.0.1"), 80))
        );
        assert_eq!(
            p.route(Protocol::Udp, ip("198.51.100.53"), 53),
            Ok((ip("127.0.0.53"), 53))
        );
        assert_eq!(
            p.route(Protocol::Udp, ip("198.51.100.53"), 54),
            Err(Denied::Routing)
        );
    }
}
