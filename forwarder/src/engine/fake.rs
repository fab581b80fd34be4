//! An in-memory host for engine scenarios: TCP sockets are byte queues with a bounded send
//! buffer, UDP sockets record datagrams, and every call is logged so tests can read the
//! host operations like a trace.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};

use super::Host;
use crate::flow::{FlowId, tcp};

/// One fake TCP socket.
#[derive(Debug, Default)]
pub struct FakeTcp {
    /// Where it connects.
    pub target: Option<SocketAddr>,
    /// Bytes written by the engine (what the remote received).
    pub sent: Vec<u8>,
    /// Bytes the send buffer still holds (drained by the test with `drain_sent`).
    pub queued: usize,
    /// Capacity of the send buffer.
    pub sndbuf: usize,
    /// Bytes from the remote not yet discarded (the receive queue).
    pub rx: Vec<u8>,
    /// The remote sent FIN after `rx`.
    pub eof: bool,
    /// `shutdown(SHUT_WR)` was called.
    pub shut: bool,
    /// The next connect result.
    pub connect_error: Option<i32>,
    /// Fail sends with this errno.
    pub send_error: Option<i32>,
}

impl FakeTcp {
    /// The remote's application read `n` queued bytes: send space frees up.
    pub fn drain_sent(&mut self, n: usize) {
        self.queued = self.queued.saturating_sub(n);
    }
}

impl tcp::HostSocket for FakeTcp {
    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(e) = self.send_error {
            return Err(io::Error::from_raw_os_error(e));
        }
        let n = data.len().min(self.sndbuf - self.queued);
        self.sent.extend_from_slice(&data[..n]);
        self.queued += n;
        Ok(n)
    }

    fn peek(&mut self, offset: usize, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if offset >= self.rx.len() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let mut src = &self.rx[offset..];
        let mut n = 0;
        for b in bufs.iter_mut() {
            let k = b.len().min(src.len());
            b[..k].copy_from_slice(&src[..k]);
            src = &src[k..];
            n += k;
        }
        Ok(n)
    }

    fn discard(&mut self, n: usize) {
        self.rx.drain(..n.min(self.rx.len()));
    }

    fn shutdown_write(&mut self) {
        self.shut = true;
    }

    fn send_space(&mut self) -> usize {
        self.sndbuf - self.queued
    }
}

/// The fake host.
#[derive(Debug, Default)]
pub struct FakeHost {
    /// Echo operations asked for, in order.
    pub echo: Vec<Echo>,
    /// Errno for the next `echo_open`.
    pub echo_open_error: Option<i32>,
    /// TCP sockets by flow.
    pub tcp: HashMap<FlowId, FakeTcp>,
    /// UDP sockets by flow: target and datagrams sent.
    pub udp: HashMap<FlowId, (SocketAddr, Vec<Vec<u8>>)>,
    /// Closed flows and whether they were aborted, in order.
    pub closed: Vec<(FlowId, bool)>,
    /// Errno for the next `tcp_connect` (immediate failure).
    pub connect_now_error: Option<i32>,
    /// Errno for UDP sends.
    pub udp_error: Option<i32>,
    /// Send buffer of new TCP sockets.
    pub sndbuf: usize,
    /// UDP flows answering through a forwarded-port socket, and which.
    pub via: Vec<(FlowId, usize)>,
    /// With `Some`, a fast path that claims every flow offered, recording its key.
    pub fast: Option<Vec<crate::flow::Key>>,
}

/// An echo operation the engine asked of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// `echo_open`.
    Open {
        /// The flow.
        flow: FlowId,
        /// Where its requests go.
        remote: IpAddr,
    },
    /// `echo_send`.
    Send {
        /// The flow.
        flow: FlowId,
        /// Sequence number.
        seq: u16,
        /// Payload.
        data: Vec<u8>,
    },
}

impl FakeHost {
    /// A host whose TCP sockets have 1 MiB send buffers.
    pub fn new() -> Self {
        Self {
            sndbuf: 1 << 20,
            ..Self::default()
        }
    }
}

impl Host for FakeHost {
    fn tcp_connect(&mut self, flow: FlowId, target: SocketAddr) -> io::Result<()> {
        if let Some(e) = self.connect_now_error {
            return Err(io::Error::from_raw_os_error(e));
        }
        self.tcp.insert(
            flow,
            FakeTcp {
                target: Some(target),
                sndbuf: self.sndbuf,
                ..FakeTcp::default()
            },
        );
        Ok(())
    }

    fn tcp_connect_result(&mut self, flow: FlowId) -> io::Result<()> {
        match self.tcp.get(&flow).and_then(|s| s.connect_error) {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn tcp_socket(&mut self, flow: FlowId) -> Option<&mut dyn tcp::HostSocket> {
        self.tcp
            .get_mut(&flow)
            .map(|s| s as &mut dyn tcp::HostSocket)
    }

    fn udp_open(&mut self, flow: FlowId, target: SocketAddr) -> io::Result<()> {
        self.udp.insert(flow, (target, Vec::new()));
        Ok(())
    }

    fn udp_send(&mut self, flow: FlowId, data: &[u8]) -> io::Result<()> {
        if let Some(e) = self.udp_error {
            return Err(io::Error::from_raw_os_error(e));
        }
        if let Some((_, sent)) = self.udp.get_mut(&flow) {
            sent.push(data.to_vec());
        }
        Ok(())
    }

    fn echo_open(&mut self, flow: FlowId, remote: IpAddr) -> io::Result<()> {
        if let Some(e) = self.echo_open_error.take() {
            return Err(io::Error::from_raw_os_error(e));
        }
        self.echo.push(Echo::Open { flow, remote });
        Ok(())
    }

    fn echo_send(&mut self, flow: FlowId, seq: u16, data: &[u8]) -> io::Result<()> {
        self.echo.push(Echo::Send {
            flow,
            seq,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn close(&mut self, flow: FlowId, abort: bool) {
        self.closed.push((flow, abort));
    }

    fn tcp_accepted(&mut self, flow: FlowId) -> io::Result<()> {
        self.tcp.insert(
            flow,
            FakeTcp {
                sndbuf: self.sndbuf,
                ..FakeTcp::default()
            },
        );
        Ok(())
    }

    fn udp_reply_via(&mut self, flow: FlowId, listener: usize, peer: SocketAddr) {
        self.udp.insert(flow, (peer, Vec::new()));
        self.via.push((flow, listener));
    }

    fn fast_path(
        &mut self,
        _flow: FlowId,
        key: &crate::flow::Key,
        _mac: crate::wire::EthernetAddress,
    ) -> Option<SocketAddr> {
        let keys = self.fast.as_mut()?;
        keys.push(*key);
        Some(SocketAddr::new(key.guest_addr, 50000))
    }
}
