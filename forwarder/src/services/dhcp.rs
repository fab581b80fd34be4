//! DHCPv4 server (RFC 2131) for exactly one client address: the plan's guest address.
//!
//! There is no lease database: the one address is always the guest's, so the state a real
//! server keeps collapses to "is the client asking for the planned address?". A REQUEST for
//! another address (an old lease, another network) gets a NAK so the client restarts
//! discovery; a REQUEST naming another server's identifier is not for us and is ignored.

use std::net::Ipv4Addr;

use crate::plan::Network;
use crate::wire::EthernetAddress;
use crate::wire::dhcp::{DhcpMessageType, DhcpOption, DhcpRepr};

/// A reply to send, owned so the engine can emit it after the request is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// OFFER, ACK or NAK.
    pub message_type: DhcpMessageType,
    /// The client's transaction id.
    pub xid: u32,
    /// The client's hardware address (BOOTP `chaddr`).
    pub chaddr: EthernetAddress,
    /// The address offered or acknowledged (`yiaddr`); unspecified for INFORM and NAK.
    pub yiaddr: Ipv4Addr,
    /// The client's current address (`ciaddr`), echoed for INFORM/renewals.
    pub ciaddr: Ipv4Addr,
    /// Whether to include lease times (not for INFORM or NAK).
    pub with_lease: bool,
    /// Where the reply goes (RFC 2131 §4.1).
    pub dst: Destination,
}

/// Where a reply is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255 and the Ethernet broadcast address.
    Broadcast,
    /// Unicast to this address at the client's MAC.
    Unicast(Ipv4Addr),
}

/// The reply to `request`, if any.
#[must_use]
pub fn handle(net: &Network, request: &DhcpRepr<'_>) -> Option<Reply> {
    let plan = net.ipv4.as_ref()?;
    let server_id = plan.gateway;
    let reply = |message_type, yiaddr, with_lease| Reply {
        message_type,
        xid: request.transaction_id,
        chaddr: request.client_hardware_address,
        yiaddr,
        ciaddr: request.client_ip,
        with_lease,
        dst: destination(request, message_type, yiaddr),
    };
    match request.message_type {
        DhcpMessageType::Discover => Some(reply(DhcpMessageType::Offer, plan.guest, true)),
        DhcpMessageType::Request => {
            if request.server_identifier.is_some_and(|id| id != server_id) {
                return None;
            }
            // SELECTING/INIT-REBOOT name the address in option 50; RENEWING/REBINDING in ciaddr.
            let wanted = request.requested_ip.unwrap_or(request.client_ip);
            if wanted == plan.guest {
                Some(reply(DhcpMessageType::Ack, plan.guest, true))
            } else {
                Some(reply(DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED, false))
            }
        }
        DhcpMessageType::Inform => Some(reply(DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED, false)),
        // RELEASE and DECLINE change nothing for a one-address server; OFFER/ACK/NAK from
        // the guest are not requests.
        _ => None,
    }
}

fn destination(
    request: &DhcpRepr<'_>,
    message_type: DhcpMessageType,
    yiaddr: Ipv4Addr,
) -> Destination {
    if message_type == DhcpMessageType::Nak || request.broadcast {
        Destination::Broadcast
    } else if !request.client_ip.is_unspecified() {
        Destination::Unicast(request.client_ip)
    } else if !yiaddr.is_unspecified() {
        Destination::Unicast(yiaddr)
    } else {
        Destination::Broadcast
    }
}

impl Reply {
    /// Encodes the reply's DHCP message into `out`.
    ///
    /// # Errors
    ///
    /// Only if an option exceeds 255 bytes, which the plan's sizes rule out.
    pub fn encode(&self, net: &Network, out: &mut Vec<u8>) -> Result<(), smoltcp::wire::Error> {
        let Some(plan) = net.ipv4.as_ref() else {
            return Ok(());
        };
        let lease_s = u32::try_from(net.lease.as_secs()).unwrap_or(u32::MAX);
        let mtu = net.mtu.to_be_bytes();
        let extra = [DhcpOption {
            kind: OPTION_INTERFACE_MTU,
            data: &mtu,
        }];
        let full = self.message_type != DhcpMessageType::Nak;
        let mut dns = heapless_dns();
        if full {
            for server in plan.dns.iter().take(super::MAX_DNS) {
                let _ = dns.push(*server);
            }
        }
        let repr = DhcpRepr {
            message_type: self.message_type,
            transaction_id: self.xid,
            secs: 0,
            client_hardware_address: self.chaddr,
            client_ip: self.ciaddr,
            your_ip: self.yiaddr,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: full.then_some(plan.gateway),
            subnet_mask: full.then(|| plan.netmask()),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: self.dst == Destination::Broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(plan.gateway),
            parameter_request_list: None,
            dns_servers: (full && !dns.is_empty()).then_some(dns),
            max_size: None,
            lease_duration: self.with_lease.then_some(lease_s),
            renew_duration: self.with_lease.then_some(lease_s / 2),
            rebind_duration: self.with_lease.then_some(lease_s / 8 * 7),
            additional_options: if full && net.mtu >= MIN_MTU {
                &extra
            } else {
                &[]
            },
        };
        crate::wire::dhcp::encode_v4(&repr, out)
    }
}

fn heapless_dns() -> heapless::Vec<Ipv4Addr, { smoltcp::wire::DHCP_MAX_DNS_SERVER_COUNT }> {
    heapless::Vec::new()
}

/// DHCP option 26, Interface MTU (RFC 2132 §5.1).
pub const OPTION_INTERFACE_MTU: u8 = 26;
/// The smallest MTU option 26 may carry (RFC 2132 §5.1).
pub const MIN_MTU: u16 = 68;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::network;
    use crate::wire::dhcp::{DhcpPacket, with_v4};

    const CLIENT: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0x0a]);

    fn request(kind: DhcpMessageType) -> DhcpRepr<'static> {
        DhcpRepr {
            message_type: kind,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: CLIENT,
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            client_identifier: None,
            server_identifier: None,
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        }
    }

    #[test]
    fn discover_gets_offer_of_the_planned_address_with_all_options() {
        let net = network();
        let reply = handle(&net, &request(DhcpMessageType::Discover)).unwrap();
        assert_eq!(reply.message_type, DhcpMessageType::Offer);
        assert_eq!(reply.yiaddr, "198.51.100.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(reply.dst, Destination::Unicast(reply.yiaddr));
        let mut out = Vec::new();
        reply.encode(&net, &mut out).unwrap();
        let (router, mask, dns, lease, server) = with_v4(&out, |r| {
            (
                r.router,
                r.subnet_mask,
                r.dns_servers.clone(),
                r.lease_duration,
                r.server_identifier,
            )
        })
        .unwrap();
        assert_eq!(router, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(mask, Some("255.255.255.0".parse().unwrap()));
        assert_eq!(
            dns.unwrap().as_slice(),
            &["198.51.100.53".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(lease, Some(86400));
        assert_eq!(server, Some("198.51.100.1".parse().unwrap()));
        let packet = DhcpPacket::new_checked(&out[..]).unwrap();
        let mtu = packet
            .options()
            .find(|o| o.kind == OPTION_INTERFACE_MTU)
            .unwrap();
        assert_eq!(mtu.data, &65520u16.to_be_bytes());
    }

    #[test]
    fn request_for_planned_address_is_acked_other_is_naked() {
        let net = network();
        let mut req = request(DhcpMessageType::Request);
        req.requested_ip = Some("198.51.100.2".parse().unwrap());
        req.server_identifier = Some("198.51.100.1".parse().unwrap());
        assert_eq!(
            handle(&net, &req).unwrap().message_type,
            DhcpMessageType::Ack
        );
        req.requested_ip = Some("10.0.0.5".parse().unwrap());
        let nak = handle(&net, &req).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        assert_eq!(nak.dst, Destination::Broadcast);
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let net = network();
        let mut req = request(DhcpMessageType::Request);
        req.requested_ip = Some("198.51.100.2".parse().unwrap());
        req.server_identifier = Some("192.0.2.99".parse().unwrap());
        assert!(handle(&net, &req).is_none());
    }

    #[test]
    fn renewal_uses_ciaddr_and_is_unicast() {
        let net = network();
        let mut req = request(DhcpMessageType::Request);
        req.client_ip = "198.51.100.2".parse().unwrap();
        let ack = handle(&net, &req).unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.dst, Destination::Unicast(req.client_ip));
    }

    #[test]
    fn broadcast_flag_is_honoured_and_inform_has_no_lease() {
        let net = network();
        let mut req = request(DhcpMessageType::Discover);
        req.broadcast = true;
        assert_eq!(handle(&net, &req).unwrap().dst, Destination::Broadcast);
        let mut inform = request(DhcpMessageType::Inform);
        inform.client_ip = "198.51.100.2".parse().unwrap();
        let ack = handle(&net, &inform).unwrap();
        assert!(!ack.with_lease);
        assert!(ack.yiaddr.is_unspecified());
    }

    #[test]
    fn release_decline_and_disabled_ipv4_get_nothing() {
        let mut net = network();
        assert!(handle(&net, &request(DhcpMessageType::Release)).is_none());
        assert!(handle(&net, &request(DhcpMessageType::Decline)).is_none());
        net.ipv4 = None;
        assert!(handle(&net, &request(DhcpMessageType::Discover)).is_none());
    }
}
