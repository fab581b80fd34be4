//! # Theory of operation
//!
//! Inbound port forwarding (host → namespace), pasta's `-t/--tcp-ports` and
//! `-u/--udp-ports`. This module is the pure part: the spec grammar and the table of
//! forwards. The I/O shell binds one listening socket per forward at start-up (all or
//! nothing: a port that cannot be bound stops start-up before anything runs, and the sockets
//! already bound are closed with the error), accepts connections / receives datagrams, and
//! hands them to the engine, which opens a flow whose **target is the guest** and whose
//! initiator is the real client: the guest sees the connection or datagram arrive from the
//! client's own address and port, not from the gateway.
//!
//! ## Grammar (pasta's)
//!
//! `none` | `[ADDR/]PORTS`, PORTS a comma list of `PORT`, `A-B`, `HOST:NS`, `A-B:C-D`
//! (ranges of equal length), and exclusions `~PORT` / `~A-B` (removed from the ranges given in
//! the same spec). `ADDR` binds the listening sockets to one host address (IPv6 without
//! brackets, e.g. `2001:db8::1/80`); without it they listen on every address, both families.
//! `auto` and `all` are refused with a clear message: not implemented yet.
//!
//! ## Limits
//!
//! At most [`MAX_FORWARDS`] forwarded ports per protocol (each costs a socket).

use std::net::IpAddr;

/// One forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMap {
    /// Host address to listen on; `None`: all addresses.
    pub bind: Option<IpAddr>,
    /// The port listened on: on the host for `-t`/`-u`, in the namespace for `-T`.
    pub listen: u16,
    /// The port connected to: in the namespace for `-t`/`-u`, on the host for `-T`.
    pub to: u16,
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
    match spec {
        "none" => return Ok(Vec::new()),
        "auto" | "all" => {
            return Err(err(format!(
                "{spec:?} is not supported yet; list the ports (e.g. 8080 or 8000-8010)"
            )));
        }
        _ => {}
    }
    let (bind, ports) = match spec.rsplit_once('/') {
        Some((addr, ports)) => {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| err(format!("{addr:?} is not an IP address")))?;
            (Some(ip), ports)
        }
        None => (None, spec),
    };
    let mut maps: Vec<PortMap> = Vec::new();
    let mut excluded: Vec<(u16, u16)> = Vec::new();
    for item in ports.split(',') {
        if let Some(ex) = item.strip_prefix('~') {
            excluded.push(range(ex).map_err(err)?);
            continue;
        }
        let (host, ns) = match item.split_once(':') {
            Some((h, n)) => (range(h).map_err(err)?, Some(range(n).map_err(err)?)),
            None => (range(item).map_err(err)?, None),
        };
        let ns = ns.unwrap_or(host);
        let (len_h, len_n) = (host.1 - host.0, ns.1 - ns.0);
        if len_n != 0 && len_n != len_h {
            return Err(err(format!("{item:?}: the two ranges differ in length")));
        }
        for (i, port) in (host.0..=host.1).enumerate() {
            let offset = u16::try_from(i).unwrap_or(0);
            let ns_port = if len_n == 0 { ns.0 } else { ns.0 + offset };
            maps.push(PortMap {
                bind,
                listen: port,
                to: ns_port,
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

/// Joins several specs, refusing a host port given twice for the same address.
///
/// # Errors
///
/// [`SpecError`] naming the duplicated port.
pub fn join(specs: &[Vec<PortMap>]) -> Result<Vec<PortMap>, SpecError> {
    let mut all: Vec<PortMap> = Vec::new();
    for m in specs.iter().flatten() {
        if all.iter().any(|o| {
            o.listen == m.listen && (o.bind.is_none() || m.bind.is_none() || o.bind == m.bind)
        }) {
            return Err(SpecError(format!("port {} is forwarded twice", m.listen)));
        }
        all.push(*m);
    }
    if all.len() > MAX_FORWARDS {
        return Err(SpecError(format!("more than {MAX_FORWARDS} ports")));
    }
    Ok(all)
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
    }

    #[test]
    fn errors_name_the_part() {
        for (bad, names) in [
            ("0", "\"0\""),
            ("70000", "70000"),
            ("5-1", "reversed"),
            ("1-3:1-2", "differ"),
            ("x/80", "\"x\""),
            ("auto", "not supported"),
            ("1,~1", "no port left"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(names), "{bad}: {e}");
        }
        let twice = join(&[parse("80").unwrap(), parse("79-81").unwrap()]).unwrap_err();
        assert!(twice.to_string().contains("port 80"), "{twice}");
    }
}
