//! Inbound port forwards (see `forward` for the theory of operation): a client's
//! connection or datagram on a forwarded host port becomes a flow toward the guest that
//! carries the client's own address and port.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tracing::debug;

use super::{Detail, Engine, Host};
use crate::flow::tcp::{Conn, Verdict};
use crate::flow::{FlowId, Key, Protocol, udp};

impl Engine {
    /// A client connected to a forwarded TCP port: opens the flow toward `ns_port` in the
    /// guest and sends the SYN. Returns the flow, or `None` when it cannot be opened (the
    /// shell then resets the client's connection).
    pub fn handle_inbound_tcp(
        &mut self,
        now: Instant,
        ns_port: u16,
        client: SocketAddr,
        host: &mut dyn Host,
    ) -> Option<FlowId> {
        let (key, v6) = self.inbound_key(Protocol::Tcp, ns_port, client)?;
        if self.flows.lookup(&key).is_some() {
            self.stats.inbound_refused += 1;
            return None;
        }
        let conn = Conn::inbound(self.iss(now, &key), self.net.mtu, v6);
        let Ok(flow) = self
            .flows
            .insert_inbound(now, key, Detail::Tcp(Box::new(conn)))
        else {
            self.stats.flow_table_full += 1;
            return None;
        };
        if host.tcp_accepted(flow).is_err() {
            self.flows.remove(flow);
            return None;
        }
        debug!(flow = flow.0, %client, ns_port, "new inbound tcp flow");
        self.stats.inbound_tcp += 1;
        self.with_tcp(now, flow, host, |conn, cx| {
            conn.send_syn(cx);
            Verdict::Keep
        });
        Some(flow)
    }

    /// A datagram from `client` on forwarded UDP port socket `listener`: relayed to
    /// `ns_port` in the guest from the client's address, opening a flow on first contact so
    /// the guest's replies go back out through the same socket.
    pub fn handle_inbound_udp(
        &mut self,
        now: Instant,
        listener: usize,
        ns_port: u16,
        client: SocketAddr,
        data: &[u8],
        host: &mut dyn Host,
    ) {
        let Some((key, _)) = self.inbound_key(Protocol::Udp, ns_port, client) else {
            return;
        };
        let flow = match self.flows.lookup(&key) {
            Some(flow) => flow,
            None => {
                let Ok(flow) =
                    self.flows
                        .insert_inbound(now, key, Detail::Udp(udp::Conn::default()))
                else {
                    self.stats.flow_table_full += 1;
                    return;
                };
                host.udp_reply_via(flow, listener, client);
                debug!(flow = flow.0, %client, ns_port, "new inbound udp flow");
                self.stats.inbound_udp += 1;
                self.schedule(flow);
                flow
            }
        };
        self.handle_udp_datagram(now, flow, data);
    }

    /// The flow key of a client reaching `ns_port`: the guest's address of the client's
    /// family (IPv4-mapped clients of a dual-stack socket are IPv4), and whether it is IPv6.
    fn inbound_key(
        &mut self,
        protocol: Protocol,
        ns_port: u16,
        client: SocketAddr,
    ) -> Option<(Key, bool)> {
        let client_ip = match client.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        let guest = match client_ip {
            IpAddr::V4(_) => self.net.ipv4.as_ref().map(|p| IpAddr::V4(p.guest)),
            IpAddr::V6(_) => self.net.ipv6.as_ref().map(|p| IpAddr::V6(p.guest)),
        };
        let Some(guest) = guest else {
            self.stats.inbound_refused += 1;
            return None;
        };
        let key = Key {
            protocol,
            guest_addr: guest,
            guest_port: ns_port,
            remote_addr: client_ip,
            remote_port: client.port(),
        };
        Some((key, client_ip.is_ipv6()))
    }
}
