//! Local ICMP/ICMPv6 echo: requests to forwarder's own addresses are answered here.
//!
//! "Own" means the IPv4 gateway, the IPv6 gateway and the router link-local address. Every
//! other destination is forwarded through a ping socket by the flow table — unless ping
//! sockets are forbidden (`net.ipv4.ping_group_range`), in which case every request is
//! answered here and the engine counts it as `echo_local_fallback` (documented in
//! `docs/services.md`: the reply then proves only that forwarder is alive).

use std::net::IpAddr;

use crate::config::Network;

/// Whether an echo request to `dst` is answered locally (by address alone).
#[must_use]
pub fn is_local(net: &Network, dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(d) => net.ipv4.as_ref().is_some_and(|p| d == p.gateway),
        IpAddr::V6(d) => net
            .ipv6
            .as_ref()
            .is_some_and(|p| d == p.gateway || d == p.router_ll),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::network;

    #[test]
    fn own_addresses_are_local_others_are_not() {
        let net = network();
        let v6 = net.ipv6.clone().unwrap();
        assert!(is_local(&net, "198.51.100.1".parse().unwrap()));
        assert!(is_local(&net, IpAddr::V6(v6.gateway)));
        assert!(is_local(&net, IpAddr::V6(v6.router_ll)));
        assert!(!is_local(&net, "203.0.113.1".parse().unwrap()));
        assert!(!is_local(&net, "2001:db8:2::1".parse().unwrap()));
    }
}
