//! DHCPv6 server (RFC 8415): stateless (Information-request) and one address (IA_NA).
//!
//! The server's DUID is a DUID-LL (type 3) of forwarder's MAC, so it is stable for a given
//! `--mac-addr` and clients can match it across messages. Like the DHCPv4 server there is no
//! binding table: every IA_NA gets the plan's guest address.

use crate::plan::Network;
use crate::wire::dhcp::v6::{
    DhcpOption, DhcpOptions, IAAddr, IANA, Message, MessageType, OptionCode, Status, StatusCode,
};

/// The reply to `request`, if any.
#[must_use]
pub fn handle(net: &Network, request: &Message) -> Option<Message> {
    let plan = net.ipv6.as_ref()?;
    let our_duid = duid(net);
    let client_id = match request.opts().get(OptionCode::ClientId) {
        Some(DhcpOption::ClientId(id)) => Some(id.clone()),
        _ => None,
    };
    let server_id = match request.opts().get(OptionCode::ServerId) {
        Some(DhcpOption::ServerId(id)) => Some(id.as_slice()),
        _ => None,
    };
    let addressed_to_us = server_id.is_none_or(|id| id == our_duid.as_slice());
    let rapid = request.opts().get(OptionCode::RapidCommit).is_some();
    let (reply_type, with_ia) = match request.msg_type() {
        // RFC 8415 §16.2: a Solicit must carry a Client Identifier and no Server Identifier.
        MessageType::Solicit if client_id.is_some() && server_id.is_none() => (
            if rapid {
                MessageType::Reply
            } else {
                MessageType::Advertise
            },
            true,
        ),
        MessageType::Request | MessageType::Renew
            if client_id.is_some() && addressed_to_us && server_id.is_some() =>
        {
            (MessageType::Reply, true)
        }
        MessageType::Rebind if client_id.is_some() && server_id.is_none() => {
            (MessageType::Reply, true)
        }
        MessageType::Confirm | MessageType::Release | MessageType::Decline
            if client_id.is_some() && addressed_to_us =>
        {
            (MessageType::Reply, false)
        }
        MessageType::InformationRequest if addressed_to_us => (MessageType::Reply, false),
        _ => return None,
    };
    let mut reply = Message::new_with_id(reply_type, request.xid());
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::ServerId(our_duid));
    if let Some(id) = client_id {
        opts.insert(DhcpOption::ClientId(id));
    }
    if rapid && reply_type == MessageType::Reply && request.msg_type() == MessageType::Solicit {
        opts.insert(DhcpOption::RapidCommit);
    }
    if with_ia {
        let iaids = request.opts().iter().filter_map(|o| match o {
            DhcpOption::IANA(ia) => Some(ia.id),
            _ => None,
        });
        let lease = u32::try_from(net.lease.as_secs()).unwrap_or(u32::MAX);
        for id in iaids.take(super::MAX_IA) {
            let mut ia_opts = DhcpOptions::new();
            ia_opts.insert(DhcpOption::IAAddr(IAAddr {
                addr: plan.guest,
                preferred_life: lease,
                valid_life: lease,
                opts: DhcpOptions::new(),
            }));
            opts.insert(DhcpOption::IANA(IANA {
                id,
                t1: lease / 2,
                t2: lease / 8 * 7,
                opts: ia_opts,
            }));
        }
    }
    if matches!(
        request.msg_type(),
        MessageType::Confirm | MessageType::Release | MessageType::Decline
    ) {
        opts.insert(DhcpOption::StatusCode(StatusCode {
            status: Status::Success,
            msg: String::new(),
        }));
    }
    let dns: Vec<_> = plan.dns.iter().take(super::MAX_DNS).copied().collect();
    if !dns.is_empty()
        && !matches!(
            request.msg_type(),
            MessageType::Release | MessageType::Decline
        )
    {
        opts.insert(DhcpOption::DomainNameServers(dns));
    }
    if !matches!(
        request.msg_type(),
        MessageType::Release | MessageType::Decline
    ) {
        let search: Vec<crate::wire::dhcp::Name> = net
            .names
            .search
            .iter()
            .filter_map(|n| crate::wire::dhcp::Name::from_ascii(n).ok())
            .collect();
        if !search.is_empty() {
            opts.insert(DhcpOption::DomainSearchList(search));
        }
        if let Some(fqdn) = &net.names.fqdn {
            // RFC 4704 §4: flags (none: the server does the updates it does), the name.
            let mut body = vec![0u8];
            crate::wire::dhcp::dns_name(fqdn, &mut body);
            opts.insert(DhcpOption::Unknown(
                crate::wire::dhcp::v6::UnknownOption::new(OptionCode::ClientFqdn, body),
            ));
        }
    }
    Some(reply)
}

/// forwarder's DUID: DUID-LL (RFC 8415 §11.4), hardware type 1 (Ethernet), our MAC.
#[must_use]
pub fn duid(net: &Network) -> Vec<u8> {
    let mut id = vec![0, DUID_LL, 0, HWTYPE_ETHERNET];
    id.extend_from_slice(&net.our_mac.0);
    id
}

const DUID_LL: u8 = 3;
const HWTYPE_ETHERNET: u8 = 1;

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::plan::testing::network;

    fn client(kind: MessageType) -> Message {
        let mut msg = Message::new_with_id(kind, [1, 2, 3]);
        msg.opts_mut()
            .insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 0x0a]));
        msg
    }

    fn with_ia(mut msg: Message) -> Message {
        msg.opts_mut().insert(DhcpOption::IANA(IANA {
            id: 7,
            t1: 0,
            t2: 0,
            opts: DhcpOptions::new(),
        }));
        msg
    }

    fn address_of(reply: &Message) -> Option<(u32, Ipv6Addr)> {
        match reply.opts().get(OptionCode::IANA) {
            Some(DhcpOption::IANA(ia)) => match ia.opts.get(OptionCode::IAAddr) {
                Some(DhcpOption::IAAddr(a)) => Some((ia.id, a.addr)),
                _ => None,
            },
            _ => None,
        }
    }

    #[test]
    fn solicit_gets_advertise_with_the_planned_address() {
        let net = network();
        let reply = handle(&net, &with_ia(client(MessageType::Solicit))).unwrap();
        assert_eq!(reply.msg_type(), MessageType::Advertise);
        assert_eq!(reply.xid(), [1, 2, 3]);
        assert_eq!(
            address_of(&reply),
            Some((7, "2001:db8:1::2".parse().unwrap()))
        );
        assert!(
            matches!(reply.opts().get(OptionCode::ServerId), Some(DhcpOption::ServerId(id)) if *id == duid(&net))
        );
        assert!(
            matches!(reply.opts().get(OptionCode::DomainNameServers), Some(DhcpOption::DomainNameServers(d)) if d.len() == 1)
        );
    }

    #[test]
    fn rapid_commit_solicit_gets_reply() {
        let net = network();
        let mut req = with_ia(client(MessageType::Solicit));
        req.opts_mut().insert(DhcpOption::RapidCommit);
        let reply = handle(&net, &req).unwrap();
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert!(reply.opts().get(OptionCode::RapidCommit).is_some());
    }

    #[test]
    fn request_for_us_is_replied_for_someone_else_ignored() {
        let net = network();
        let mut req = with_ia(client(MessageType::Request));
        req.opts_mut().insert(DhcpOption::ServerId(duid(&net)));
        let reply = handle(&net, &req).unwrap();
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert!(address_of(&reply).is_some());
        let mut other = with_ia(client(MessageType::Request));
        other
            .opts_mut()
            .insert(DhcpOption::ServerId(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]));
        assert!(handle(&net, &other).is_none());
    }

    #[test]
    fn information_request_is_stateless() {
        let net = network();
        let reply = handle(
            &net,
            &Message::new_with_id(MessageType::InformationRequest, [9, 9, 9]),
        )
        .unwrap();
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert!(address_of(&reply).is_none());
        assert!(reply.opts().get(OptionCode::DomainNameServers).is_some());
    }

    #[test]
    fn solicit_without_client_id_or_with_server_id_is_ignored() {
        let net = network();
        assert!(handle(&net, &Message::new_with_id(MessageType::Solicit, [0; 3])).is_none());
        let mut req = client(MessageType::Solicit);
        req.opts_mut().insert(DhcpOption::ServerId(duid(&net)));
        assert!(handle(&net, &req).is_none());
    }

    #[test]
    fn ia_count_is_bounded() {
        let net = network();
        let mut req = client(MessageType::Solicit);
        for id in 0..50 {
            req.opts_mut().insert(DhcpOption::IANA(IANA {
                id,
                t1: 0,
                t2: 0,
                opts: DhcpOptions::new(),
            }));
        }
        let reply = handle(&net, &req).unwrap();
        let n = reply
            .opts()
            .iter()
            .filter(|o| matches!(o, DhcpOption::IANA(_)))
            .count();
        assert_eq!(n, crate::services::MAX_IA);
    }
}
