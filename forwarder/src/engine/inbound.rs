//! Inbound port forwards (see `forward` for the theory of operation): a client's
//! connection or datagram on a forwarded host port becomes a flow toward the guest that
//! carries the client's own address and port.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tracing::debug;

use super::{Detail, Engine, Host};
use crate::flow::tcp::{Conn, Verdict};
use crate::flow::{FlowId, Key, Protocol, udp};
use crate::forward::Dest;

impl Engine {
    /// A client connected to a forwarded TCP port: opens the flow toward `ns_port` in the
    /// guest and sends the SYN. Returns the flow, or `None` when it cannot be opened (the
    /// shell then resets the client's connection).
    pub fn handle_inbound_tcp(
        &mut self,
        now: Instant,
        to: Dest,
        client: SocketAddr,
        host: &mut dyn Host,
    ) -> Option<FlowId> {
        let ns_port = to.port;
        let (key, v6) = self.inbound_key(Protocol::Tcp, to, client)?;
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
        to: Dest,
        client: SocketAddr,
        data: &[u8],
        host: &mut dyn Host,
    ) {
        let ns_port = to.port;
        let Some((key, _)) = self.inbound_key(Protocol::Udp, to, client) else {
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

    /// The address a client of a forwarded port is shown from. A remote client keeps its
    /// own. A client on the host itself, from a loopback address or from the address the
    /// guest shares with the host, could not be shown as it is (the guest drops packets
    /// from its loopback or its own address): it comes from the address that stands for
    /// it in the mappings — `--map-guest-addr` for the shared address, the gateway (or
    /// `--map-host-loopback`) for loopback and, failing an exact mapping, for both, as
    /// the host is reached there. `None`: no mapping stands for the host (all turned off).
    fn inbound_source(&self, client: IpAddr) -> Option<IpAddr> {
        let shared = match client {
            IpAddr::V4(a) => self.net.ipv4.as_ref().is_some_and(|p| p.guest == a),
            IpAddr::V6(a) => self.net.ipv6.as_ref().is_some_and(|p| p.guest == a),
        };
        if !client.is_loopback() && !shared {
            return Some(client);
        }
        let maps = &self.policy.maps;
        maps.iter()
            .find(|(_, host)| *host == client)
            .or_else(|| {
                maps.iter()
                    .find(|(g, host)| host.is_loopback() && g.is_ipv4() == client.is_ipv4())
            })
            .map(|(g, _)| *g)
    }

    /// The flow key of a client reaching `to`: its address (`:TADDR`, which must be of the
    /// client's family) or the guest's address of the client's family (IPv4-mapped clients
    /// of a dual-stack socket are IPv4), and whether it is IPv6.
    fn inbound_key(
        &mut self,
        protocol: Protocol,
        to: Dest,
        client: SocketAddr,
    ) -> Option<(Key, bool)> {
        let ns_port = to.port;
        let client_ip = match client.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        let guest = match (client_ip, to.addr) {
            (IpAddr::V4(_), Some(a @ IpAddr::V4(_))) | (IpAddr::V6(_), Some(a @ IpAddr::V6(_))) => {
                Some(a)
            }
            (_, Some(_)) => None,
            (IpAddr::V4(_), None) => self.net.ipv4.as_ref().map(|p| IpAddr::V4(p.guest)),
            (IpAddr::V6(_), None) => self.net.ipv6.as_ref().map(|p| IpAddr::V6(p.guest)),
        };
        let Some(guest) = guest else {
            self.stats.inbound_refused += 1;
            return None;
        };
        let Some(remote) = self.inbound_source(client_ip) else {
            self.stats.inbound_refused += 1;
            return None;
        };
        let key = Key {
            protocol,
            guest_addr: guest,
            guest_port: ns_port,
            remote_addr: remote,
            remote_port: client.port(),
        };
        Some((key, client_ip.is_ipv6()))
    }
}
