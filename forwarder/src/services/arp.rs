//! ARP responder (RFC 826): forwarder answers for every address but the guest's own.

use crate::plan::Network;
use crate::wire::{ArpOperation, ArpRepr};

/// The reply to `request`, if forwarder answers it.
#[must_use]
pub fn handle(net: &Network, request: &ArpRepr) -> Option<ArpRepr> {
    let plan = net.ipv4.as_ref()?;
    let ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = *request
    else {
        return None;
    };
    // The guest's own address is the guest's to answer (and its probes must stay
    // unanswered); an announcement (sender = target) asks nothing.
    if target_protocol_addr == plan.guest
        || target_protocol_addr == source_protocol_addr
        || target_protocol_addr.is_unspecified()
        || target_protocol_addr.is_broadcast()
        || target_protocol_addr.is_multicast()
    {
        return None;
    }
    Some(ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: net.our_mac,
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::plan::testing::network;
    use crate::wire::EthernetAddress;

    const GUEST_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0x0a]);

    fn request(spa: Ipv4Addr, tpa: Ipv4Addr) -> ArpRepr {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: GUEST_MAC,
            source_protocol_addr: spa,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: tpa,
        }
    }

    #[test]
    fn answers_for_the_gateway_with_our_mac() {
        let net = network();
        let guest = net.ipv4.as_ref().unwrap().guest;
        let gw = net.ipv4.as_ref().unwrap().gateway;
        let reply = handle(&net, &request(guest, gw)).unwrap();
        assert_eq!(
            reply,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: net.our_mac,
                source_protocol_addr: gw,
                target_hardware_addr: GUEST_MAC,
                target_protocol_addr: guest,
            }
        );
    }

    #[test]
    fn answers_for_any_other_on_link_address() {
        let net = network();
        let guest = net.ipv4.as_ref().unwrap().guest;
        assert!(handle(&net, &request(guest, Ipv4Addr::new(198, 51, 100, 77))).is_some());
    }

    #[test]
    fn never_answers_for_the_guest_itself_or_announcements() {
        let net = network();
        let guest = net.ipv4.as_ref().unwrap().guest;
        // Duplicate-address probe (RFC 5227): sender 0.0.0.0, target the guest address.
        assert!(handle(&net, &request(Ipv4Addr::UNSPECIFIED, guest)).is_none());
        // Gratuitous announcement.
        let other = Ipv4Addr::new(198, 51, 100, 9);
        assert!(handle(&net, &request(other, other)).is_none());
    }

    #[test]
    fn ignores_replies_and_disabled_ipv4() {
        let mut net = network();
        let gw = net.ipv4.as_ref().unwrap().gateway;
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: GUEST_MAC,
            source_protocol_addr: Ipv4Addr::new(198, 51, 100, 2),
            target_hardware_addr: net.our_mac,
            target_protocol_addr: gw,
        };
        assert!(handle(&net, &reply).is_none());
        net.ipv4 = None;
        assert!(handle(&net, &request(Ipv4Addr::new(198, 51, 100, 2), gw)).is_none());
    }
}
