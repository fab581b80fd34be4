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
        let full = self.message_type != DhcpMessageType::Nak;
        let names = NameOptions::of(&net.names);
        let mut extra = Vec::new();
        if full && net.mtu >= MIN_MTU {
            extra.push(DhcpOption {
                kind: OPTION_INTERFACE_MTU,
                data: &mtu,
            });
        }
        if full {
            names.push_onto(&mut extra);
        }
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
            additional_options: &extra,
        };
        crate::wire::dhcp::encode_v4(&repr, out)
    }
}

/// The name options' bodies, encoded once per reply.
struct NameOptions {
    search: Vec<u8>,
    hostname: Option<Vec<u8>>,
    fqdn: Option<Vec<u8>>,
}

impl NameOptions {
    fn of(names: &crate::plan::Names) -> Self {
        let mut search = Vec::new();
        for name in &names.search {
            crate::wire::dhcp::dns_name(name, &mut search);
        }
        let fqdn = names.fqdn.as_ref().map(|n| {
            // RFC 4702 §2: flags (E: the name is in wire format), RCODE1 and RCODE2 (255
            // from a server), then the name.
            let mut body = vec![FQDN_FLAG_E, 255, 255];
            crate::wire::dhcp::dns_name(n, &mut body);
            body
        });
        Self {
            search,
            hostname: names.hostname.as_ref().map(|h| h.as_bytes().to_vec()),
            fqdn,
        }
    }

    /// Options 119 (split over several when longer than 255 bytes, RFC 3396), 12 and 81.
    fn push_onto<'a>(&'a self, extra: &mut Vec<DhcpOption<'a>>) {
        for chunk in self.search.chunks(255) {
            extra.push(DhcpOption {
                kind: OPTION_DOMAIN_SEARCH,
                data: chunk,
            });
        }
        if let Some(h) = &self.hostname {
            extra.push(DhcpOption {
                kind: OPTION_HOSTNAME,
                data: h.get(..h.len().min(255)).unwrap_or(h),
            });
        }
        if let Some(f) = &self.fqdn {
            extra.push(DhcpOption {
                kind: OPTION_CLIENT_FQDN,
                data: f.get(..f.len().min(255)).unwrap_or(f),
            });
        }
    }
}

/// DHCP option 12, Host Name (RFC 2132 §3.14).
pub const OPTION_HOSTNAME: u8 = 12;
/// DHCP option 81, Client FQDN (RFC 4702).
pub const OPTION_CLIENT_FQDN: u8 = 81;
/// DHCP option 119, Domain Search (RFC 3397).
pub const OPTION_DOMAIN_SEARCH: u8 = 119;
const FQDN_FLAG_E: u8 = 0x04;

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
    fn names_are_sent_as_options_12_81_and_119() {
        let mut net = network();
        net.names = crate::plan::Names {
            search: vec!["a.example".into(), "b.example".into()],
            hostname: Some("box".into()),
            fqdn: Some("box.a.example".into()),
        };
        let reply = handle(&net, &request(DhcpMessageType::Discover)).unwrap();
        let mut out = Vec::new();
        reply.encode(&net, &mut out).unwrap();
        let packet = DhcpPacket::new_checked(&out[..]).unwrap();
        let options: Vec<(u8, Vec<u8>)> = packet
            .options()
            .map(|o| (o.kind, o.data.to_vec()))
            .collect();
        let get = |k: u8| {
            options
                .iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, d)| d.clone())
        };
        assert_eq!(get(OPTION_HOSTNAME).unwrap(), b"box");
        assert_eq!(
            get(OPTION_DOMAIN_SEARCH).unwrap(),
            b"\x01a\x07example\x00\x01b\x07example\x00"
        );
        assert_eq!(
            get(OPTION_CLIENT_FQDN).unwrap(),
            b"\x04\xff\xff\x03box\x01a\x07example\x00"
        );
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
