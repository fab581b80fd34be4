//! Neighbour discovery (RFC 4861): neighbour advertisements and router advertisements.
//!
//! Router advertisements carry the on-link prefix (autonomous when it is a /64, so the
//! kernel's SLAAC configures an address), the MTU and the DNS servers (RDNSS, RFC 8106), and
//! set both the Managed and Other flags, because forwarder's DHCPv6 server hands out the
//! planned address and the DNS servers.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use smoltcp::time::Duration as WireDuration;

use crate::plan::Network;
use crate::wire::{
    NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags,
    RawHardwareAddress,
};

/// A neighbour advertisement answering a solicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advert {
    /// The advertisement.
    pub repr: NdiscRepr<'static>,
    /// Where it goes: the soliciting address, or all-nodes when that was `::`.
    pub dst: Ipv6Addr,
}

/// The neighbour advertisement answering a solicitation for `target` from `src`, if any.
#[must_use]
pub fn handle_solicit(net: &Network, src: Ipv6Addr, target: Ipv6Addr) -> Option<Advert> {
    let plan = net.ipv6.as_ref()?;
    if target == plan.guest || target.is_multicast() || target.is_unspecified() {
        return None;
    }
    let ours = net.is_own(IpAddr::V6(target));
    // A duplicate-address probe comes from `::`: answering it for an address the guest may
    // be configuring would make the guest give that address up. Defend only our own.
    if src.is_unspecified() && !ours {
        return None;
    }
    let solicited = !src.is_unspecified();
    let mut flags = NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::OVERRIDE;
    if solicited {
        flags |= NdiscNeighborFlags::SOLICITED;
    }
    Some(Advert {
        repr: NdiscRepr::NeighborAdvert {
            flags,
            target_addr: target,
            lladdr: Some(RawHardwareAddress::from(net.our_mac)),
        },
        dst: if solicited { src } else { ALL_NODES },
    })
}

/// The router advertisement forwarder sends (solicited or not), `None` when IPv6 is off.
#[must_use]
pub fn router_advert(net: &Network) -> Option<NdiscRepr<'static>> {
    let plan = net.ipv6.as_ref()?;
    let prefix_flags = if plan.prefix_len == SLAAC_PREFIX_LEN {
        NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF
    } else {
        NdiscPrefixInfoFlags::ON_LINK
    };
    Some(NdiscRepr::RouterAdvert {
        hop_limit: RA_HOP_LIMIT,
        flags: NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER,
        router_lifetime: WireDuration::from_secs(ROUTER_LIFETIME.as_secs()),
        reachable_time: WireDuration::ZERO,
        retrans_time: WireDuration::ZERO,
        lladdr: Some(RawHardwareAddress::from(net.our_mac)),
        // IPv6 requires at least 1280; below that the option would be ignored anyway.
        mtu: (net.mtu >= 1280).then_some(u32::from(net.mtu)),
        prefix_info: Some(NdiscPrefixInformation {
            prefix_len: plan.prefix_len,
            flags: prefix_flags,
            valid_lifetime: WireDuration::from_secs(u64::from(u32::MAX)),
            preferred_lifetime: WireDuration::from_secs(u64::from(u32::MAX)),
            prefix: plan.prefix(),
        }),
    })
}

/// The DNS servers to put in the RDNSS option of [`router_advert`].
#[must_use]
pub fn rdnss(net: &Network) -> &[Ipv6Addr] {
    net.ipv6.as_ref().map_or(&[], |p| {
        p.dns.get(..p.dns.len().min(super::MAX_DNS)).unwrap_or(&[])
    })
}

/// All-nodes multicast (RFC 4291).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Router lifetime in RAs; also the RDNSS lifetime.
pub const ROUTER_LIFETIME: Duration = Duration::from_secs(9000);
/// Hop limit advertised to the guest.
pub const RA_HOP_LIMIT: u8 = 64;
/// The prefix length SLAAC works with (RFC 4862 §5.5.3 with a 64-bit interface identifier).
pub const SLAAC_PREFIX_LEN: u8 = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::network;

    #[test]
    fn solicitation_for_gateway_is_answered_solicited() {
        let net = network();
        let plan = net.ipv6.clone().unwrap();
        let advert = handle_solicit(&net, plan.guest, plan.gateway).unwrap();
        assert_eq!(advert.dst, plan.guest);
        let NdiscRepr::NeighborAdvert {
            flags,
            target_addr,
            lladdr,
        } = advert.repr
        else {
            panic!()
        };
        assert!(flags.contains(
            NdiscNeighborFlags::SOLICITED
                | NdiscNeighborFlags::ROUTER
                | NdiscNeighborFlags::OVERRIDE
        ));
        assert_eq!(target_addr, plan.gateway);
        assert_eq!(lladdr, Some(RawHardwareAddress::from(net.our_mac)));
    }

    #[test]
    fn any_other_target_is_answered_but_not_the_guest() {
        let net = network();
        let plan = net.ipv6.clone().unwrap();
        assert!(handle_solicit(&net, plan.guest, "2001:db8:1::99".parse().unwrap()).is_some());
        assert!(handle_solicit(&net, plan.router_ll, plan.guest).is_none());
    }

    #[test]
    fn dad_probes_only_defend_our_addresses() {
        let net = network();
        let plan = net.ipv6.clone().unwrap();
        let probe_src = Ipv6Addr::UNSPECIFIED;
        // The guest's SLAAC or link-local address: must stay unanswered.
        assert!(handle_solicit(&net, probe_src, "fe80::ff:fe00:a".parse().unwrap()).is_none());
        assert!(
            handle_solicit(&net, probe_src, "2001:db8:1::ff:fe00:a".parse().unwrap()).is_none()
        );
        // Our router address is defended, to all-nodes, unsolicited.
        let advert = handle_solicit(&net, probe_src, plan.router_ll).unwrap();
        assert_eq!(advert.dst, ALL_NODES);
        let NdiscRepr::NeighborAdvert { flags, .. } = advert.repr else {
            panic!()
        };
        assert!(!flags.contains(NdiscNeighborFlags::SOLICITED));
    }

    #[test]
    fn router_advert_carries_prefix_mtu_and_flags() {
        let net = network();
        let NdiscRepr::RouterAdvert {
            flags,
            mtu,
            prefix_info,
            router_lifetime,
            ..
        } = router_advert(&net).unwrap()
        else {
            panic!()
        };
        assert!(flags.contains(NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER));
        assert_eq!(mtu, Some(65520));
        assert_eq!(router_lifetime.secs(), ROUTER_LIFETIME.as_secs());
        let prefix = prefix_info.unwrap();
        assert_eq!(prefix.prefix, "2001:db8:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(prefix.prefix_len, 64);
        assert!(
            prefix
                .flags
                .contains(NdiscPrefixInfoFlags::ADDRCONF | NdiscPrefixInfoFlags::ON_LINK)
        );
        assert_eq!(
            rdnss(&net),
            &["2001:db8:1::53".parse::<Ipv6Addr>().unwrap()]
        );
    }

    #[test]
    fn non_slaac_prefix_is_on_link_only_and_small_mtu_omitted() {
        let mut net = network();
        net.ipv6.as_mut().unwrap().prefix_len = 48;
        net.mtu = 1000;
        let NdiscRepr::RouterAdvert {
            mtu, prefix_info, ..
        } = router_advert(&net).unwrap()
        else {
            panic!()
        };
        assert_eq!(mtu, None);
        assert!(
            !prefix_info
                .unwrap()
                .flags
                .contains(NdiscPrefixInfoFlags::ADDRCONF)
        );
    }
}
