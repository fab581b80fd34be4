//! # Theory of operation
//!
//! rtnetlink, through the `rtnetlink` crate (no `ip` shell-outs), for these jobs:
//!
//! * [`host_info`]: read the host's default routes (main table), the interface they leave
//!   through, and its global addresses and prefix lengths — the input of the address plan.
//!   Resolvers come from `/etc/resolv.conf`.
//! * [`local_prefixes`]: the host's own addresses and directly routed prefixes (`local` and
//!   `main` tables, default routes excluded), which the outbound policy calls host-local;
//!   rescanned periodically by the control plane.
//! * [`configure_namespace`]: `--config-net` inside the namespace: `lo` up, the tap's MTU,
//!   addresses (IPv6 with `nodad`, so it is usable at once) and default routes, then the
//!   tap up. Always: `lo` up (pasta does the same), even without `--config-net`.
//! * For `--ebpf`'s fast path: [`uplink_mtu`] (the default route's interface's MTU, which
//!   caps the tap's), [`ether_links`] (the interfaces that get `uplink_ingress`, rescanned
//!   with the routes), [`create_veth`] and [`hide_veth_end`] (the hidden veth pair, its
//!   host end with `forwarding` on for that device only), [`delete_link`] (at exit, and by
//!   the reaper after a `kill -9`).
//!
//! All run on a private current-thread tokio runtime that is dropped before they return,
//! so they can be called from the single-threaded start-up code and from the forked helper
//! inside the namespace: the netlink socket is bound to the namespace of the thread that
//! opens it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::plan::HostInfo;
use crate::plan::Network;

/// Reads the host's default-route interfaces and resolvers.
///
/// # Errors
///
/// When netlink cannot be opened or queried.
pub fn host_info(template: Template<'_>) -> Result<HostInfo> {
    let mut info = block_on(async {
        let handle = connect()?;
        let only = |name: Option<&str>| {
            let handle = handle.clone();
            let name = name.map(str::to_owned);
            async move {
                match name {
                    Some(n) => link_index(&handle, &n)
                        .await
                        .map(Some)
                        .with_context(|| format!("template interface {n}")),
                    None => Ok(None),
                }
            }
        };
        let (if4, if6) = (only(template.v4).await?, only(template.v6).await?);
        let v4 = default_route(&handle, AddressFamily::Inet, if4).await?;
        let v6 = default_route(&handle, AddressFamily::Inet6, if6).await?;
        let mut info = HostInfo::default();
        if let Some((oif, IpAddr::V4(gw))) = v4 {
            info.v4 = addresses(&handle, oif)
                .await?
                .into_iter()
                .find_map(|(a, len)| match a {
                    IpAddr::V4(a) => Some((a, len, gw)),
                    IpAddr::V6(_) => None,
                });
        }
        if let Some((oif, IpAddr::V6(gw))) = v6 {
            info.v6 = addresses(&handle, oif)
                .await?
                .into_iter()
                .find_map(|(a, len)| match a {
                    IpAddr::V6(a) => Some((a, len, gw)),
                    IpAddr::V4(_) => None,
                });
        }
        Ok::<_, anyhow::Error>(info)
    })?;
    info.resolvers =
        read_resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    Ok(info)
}

/// Brings `lo` up and, when `config_net`, configures the tap `ifname` with `net`.
///
/// # Errors
///
/// The failing step, naming the interface and address.
pub fn configure_namespace(
    ifname: &str,
    net: &Network,
    config_net: bool,
    mac: Option<[u8; 6]>,
) -> Result<()> {
    block_on(async {
        let handle = connect()?;
        let lo = link_index(&handle, "lo").await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .context("bring lo up")?;
        if let Some(mac) = mac {
            let tap = link_index(&handle, ifname).await?;
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(tap)
                        .address(mac.to_vec())
                        .build(),
                )
                .execute()
                .await
                .with_context(|| format!("set {ifname}'s MAC address (--ns-mac-addr)"))?;
        }
        if !config_net {
            return Ok(());
        }
        let tap = link_index(&handle, ifname).await?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(tap)
                    .mtu(u32::from(net.mtu))
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("set MTU {} on {ifname}", net.mtu))?;
        if let Some(v4) = &net.ipv4 {
            handle
                .address()
                .add(tap, IpAddr::V4(v4.guest), v4.prefix_len)
                .execute()
                .await
                .with_context(|| format!("add {}/{} to {ifname}", v4.guest, v4.prefix_len))?;
        }
        if let Some(v6) = &net.ipv6 {
            let mut req = handle
                .address()
                .add(tap, IpAddr::V6(v6.guest), v6.prefix_len);
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            req.execute()
                .await
                .with_context(|| format!("add {}/{} to {ifname}", v6.guest, v6.prefix_len))?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(tap).up().build())
            .execute()
            .await
            .with_context(|| format!("bring {ifname} up"))?;
        if let Some(v4) = &net.ipv4 {
            let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(tap)
                .gateway(v4.gateway);
            if !crate::plan::same_subnet4(v4.gateway, v4.guest, v4.prefix_len) {
                route = route.onlink();
            }
            handle
                .route()
                .add(route.build())
                .execute()
                .await
                .with_context(|| format!("add default route via {}", v4.gateway))?;
        }
        if let Some(v6) = &net.ipv6 {
            let route = RouteMessageBuilder::<Ipv6Addr>::new()
                .output_interface(tap)
                .gateway(v6.gateway)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .with_context(|| format!("add default route via {}", v6.gateway))?;
        }
        Ok(())
    })
}

/// Parses `nameserver` lines of a resolv.conf.
#[must_use]
pub fn read_resolvers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.split_whitespace().next())
        // Scoped addresses ("fe80::1%eth0") cannot be advertised to the guest.
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// The search domains of a resolv.conf: its last `search` or `domain` line wins, as for
/// the resolver.
#[must_use]
pub fn read_search(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let Some("search" | "domain") = words.next() {
            out = words.map(str::to_string).collect();
        }
    }
    out
}

fn block_on<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("start netlink runtime")?;
    rt.block_on(fut)
}

fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("open rtnetlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("look up interface {name}"))?
        .ok_or_else(|| anyhow!("no interface {name}"))?;
    Ok(link.header.index)
}

/// The host-local prefixes: every non-default route of the `local` and `main` tables.
///
/// # Errors
///
/// When netlink cannot be opened or queried.
pub fn local_prefixes() -> Result<Vec<crate::policy::Prefix>> {
    block_on(async {
        let handle = connect()?;
        let mut out = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = handle.route().get(query).execute();
            while let Some(route) = routes.try_next().await.context("dump routes")? {
                let len = route.header.destination_prefix_length;
                if len == 0 || !matches!(route.header.table, MAIN_TABLE | LOCAL_TABLE) {
                    continue;
                }
                for attr in &route.attributes {
                    let addr = match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => IpAddr::V4(*a),
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => IpAddr::V6(*a),
                        _ => continue,
                    };
                    let prefix = crate::policy::Prefix::new(addr, len);
                    if !out.contains(&prefix) {
                        out.push(prefix);
                    }
                }
            }
        }
        Ok(out)
    })
}

/// The host interfaces the plan is derived from, per family (`-i`, `--outbound-if4/6`);
/// `None`: the one with the best default route.
#[derive(Debug, Clone, Copy, Default)]
pub struct Template<'a> {
    /// For IPv4.
    pub v4: Option<&'a str>,
    /// For IPv6.
    pub v6: Option<&'a str>,
}

/// The best default route of `family` (through interface `only`, if given).
async fn default_route(
    handle: &Handle,
    family: AddressFamily,
    only: Option<u32>,
) -> Result<Option<(u32, IpAddr)>> {
    let query = match family {
        AddressFamily::Inet6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        _ => RouteMessageBuilder::<Ipv4Addr>::new().build(),
    };
    let mut routes = handle.route().get(query).execute();
    let mut best: Option<(u32, u32, IpAddr)> = None;
    while let Some(route) = routes.try_next().await.context("dump routes")? {
        if route.header.destination_prefix_length != 0 || route.header.table != MAIN_TABLE {
            continue;
        }
        if let Some((oif, gw, metric)) = gateway_of(&route)
            && only.is_none_or(|i| i == oif)
            && best.is_none_or(|(m, _, _)| metric < m)
        {
            best = Some((metric, oif, gw));
        }
    }
    Ok(best.map(|(_, oif, gw)| (oif, gw)))
}

fn gateway_of(route: &RouteMessage) -> Option<(u32, IpAddr, u32)> {
    let mut oif = None;
    let mut gw = None;
    let mut metric = 0;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    Some((oif?, gw?, metric))
}

async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.context("dump addresses")? {
        if msg.header.scope != AddressScope::Universe {
            continue;
        }
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(addr) = addr {
            out.push((addr, msg.header.prefix_len));
        }
    }
    Ok(out)
}

/// The MTU of the interface the default route leaves through (IPv4's, else IPv6's), if
/// there is a default route: in `--ebpf` mode the tap's MTU is capped to it, because the
/// fast path hands the namespace's packets to that interface as they are.
///
/// # Errors
///
/// When netlink cannot be opened or queried.
pub fn uplink_mtu() -> Result<Option<u32>> {
    block_on(async {
        let handle = connect()?;
        let mut oif = default_route(&handle, AddressFamily::Inet, None).await?;
        if oif.is_none() {
            oif = default_route(&handle, AddressFamily::Inet6, None).await?;
        }
        let Some((index, _)) = oif else {
            return Ok(None);
        };
        let link = handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .context("look up the default route's interface")?;
        Ok(link.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    })
}

/// The Ethernet interfaces of this namespace, `(index, name)`: where the fast path's
/// replies can arrive (`lo` and other link types excluded).
///
/// # Errors
///
/// When netlink cannot be opened or queried.
pub fn ether_links() -> Result<Vec<(u32, String)>> {
    block_on(async {
        let handle = connect()?;
        let mut links = handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(l) = links.try_next().await.context("dump links")? {
            if l.header.link_layer_type != LinkLayerType::Ether {
                continue;
            }
            let name = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name {
                out.push((l.header.index, name));
            }
        }
        Ok(out)
    })
}

/// Creates the fast path's hidden veth pair in this namespace: `host` (up, `forwarding` on
/// for this device only, no IPv6 link-local address) stays, `peer` moves into the
/// namespace `netns`. Both get `mtu`. Returns `host`'s index.
///
/// # Errors
///
/// The failing step, naming the interface.
pub fn create_veth(host: &str, peer: &str, mtu: u32, netns: std::os::fd::RawFd) -> Result<u32> {
    block_on(async {
        let handle = connect()?;
        handle
            .link()
            .add(LinkVeth::new(host, peer).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| format!("create the veth pair {host}/{peer}"))?;
        let index = link_index(&handle, host).await?;
        let peer_index = link_index(&handle, peer).await?;
        for (path, value) in [
            (format!("/proc/sys/net/ipv6/conf/{host}/addr_gen_mode"), "1"),
            (format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1"),
            (format!("/proc/sys/net/ipv6/conf/{host}/forwarding"), "1"),
        ] {
            // IPv6 may be off on this host; the IPv4 switch is required.
            if let Err(err) = std::fs::write(&path, value)
                && path.contains("ipv4")
            {
                return Err(err).with_context(|| format!("write {path}"));
            }
        }
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_fd(netns)
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("move {peer} into the namespace"))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bring {host} up"))?;
        Ok(index)
    })
}

/// In the namespace: brings the veth end `name` up without ARP and without IPv6 (it only
/// carries the fast path's packets, which its programs redirect). Returns its index.
///
/// # Errors
///
/// The failing step, naming the interface.
pub fn hide_veth_end(name: &str) -> Result<u32> {
    // Before the link is up: no link-local address, no DAD, no router solicitations.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    block_on(async {
        let handle = connect()?;
        let index = link_index(&handle, name).await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).arp(false).up().build())
            .execute()
            .await
            .with_context(|| format!("bring {name} up"))?;
        Ok(index)
    })
}

/// Deletes the interface `name` of this namespace; a missing one is not an error.
///
/// # Errors
///
/// When netlink cannot be opened or the deletion fails otherwise.
pub fn delete_link(name: &str) -> Result<()> {
    block_on(async {
        let handle = connect()?;
        let Ok(index) = link_index(&handle, name).await else {
            return Ok(());
        };
        handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("delete {name}"))
    })
}

/// The kernel's main routing table (RT_TABLE_MAIN).
const MAIN_TABLE: u8 = 254;
const LOCAL_TABLE: u8 = 255;

/// The first port of the host's ephemeral range ([`ephemeral_range`]): `all` forwards
/// the ports below it.
#[must_use]
pub fn ephemeral_start() -> u16 {
    ephemeral_range().0
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`); pasta's fallback,
/// 49152–65535, when it cannot be read.
#[must_use]
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut words = t.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .filter(|(a, b)| a <= b)
        .unwrap_or((49152, 65535))
}

/// Raises the soft open-file limit to the hard one (for `all`, one socket per port).
///
/// # Errors
///
/// When the limits cannot be read or set.
pub fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("read RLIMIT_NOFILE")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raise RLIMIT_NOFILE")?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_parsing() {
        let text = "# comment\nnameserver 127.0.0.53\nsearch example\nnameserver  2001:db8::53 \nnameserver fe80::1%eth0\nnameserver bogus\n";
        let got = read_resolvers(text);
        assert_eq!(
            got,
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
    }
}
