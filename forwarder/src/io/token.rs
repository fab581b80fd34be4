//! The data plane's one list of poll tokens. Every fd the loop registers gets its token
//! here, and every event's token is read back here into the [`Source`] it came from, so the
//! ranges cannot overlap by accident:
//!
//! | tokens | source |
//! |---|---|
//! | 0, 1 | the tap, the command waker |
//! | 2 … 2^40 − 2 | flow `n`'s host socket at `n + 2` (ids count up from 1: 2^40 flows away) |
//! | 2^40 − 1 | the fast path's ring buffer |
//! | 2^40 … | forwarded-port sockets, by key (never reused) |
//! | 2^41 … | spliced `-T` connections, two per relay (namespace side, host side) |
//! | 2^42 … | `-U` relays' host sockets |
//! | 2^43 … | kernel UDP flows' reservation sockets (`fastpath`), by flow id |

use mio::Token;

use crate::flow::FlowId;

/// Where an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Tap,
    Waker,
    FastEvents,
    Flow(FlowId),
    Listener(usize),
    Relay { id: usize, side: usize },
    UdpRelay(usize),
    Reservation(FlowId),
}

/// The tap.
pub(super) const TAP: Token = Token(0);
/// The control plane's waker.
pub(super) const WAKER: Token = Token(1);
/// The fast path's ring buffer.
pub(super) const FAST_EVENTS: Token = Token(FIRST_LISTENER - 1);

const FIRST_FLOW: usize = 2;
const FIRST_LISTENER: usize = 1 << 40;
const FIRST_RELAY: usize = 1 << 41;
const FIRST_UDP_RELAY: usize = 1 << 42;
const FIRST_RESERVATION: usize = 1 << 43;

/// The source of `token`.
pub(super) fn source(token: Token) -> Source {
    match token {
        TAP => Source::Tap,
        WAKER => Source::Waker,
        FAST_EVENTS => Source::FastEvents,
        Token(t) if t >= FIRST_RESERVATION => Source::Reservation(id(t - FIRST_RESERVATION)),
        Token(t) if t >= FIRST_UDP_RELAY => Source::UdpRelay(t - FIRST_UDP_RELAY),
        Token(t) if t >= FIRST_RELAY => Source::Relay {
            id: (t - FIRST_RELAY) / 2,
            side: (t - FIRST_RELAY) % 2,
        },
        Token(t) if t >= FIRST_LISTENER => Source::Listener(t - FIRST_LISTENER),
        Token(t) => Source::Flow(id(t.saturating_sub(FIRST_FLOW))),
    }
}

/// Flow `flow`'s host socket.
pub(super) fn flow(flow: FlowId) -> Token {
    Token(offset(flow).saturating_add(FIRST_FLOW))
}

/// Forwarded-port socket `key`.
pub(super) fn listener(key: usize) -> Token {
    Token(FIRST_LISTENER + key)
}

/// Side `side` (0: namespace, 1: host) of spliced connection `id`.
pub(super) fn relay(id: usize, side: usize) -> Token {
    Token(FIRST_RELAY + id * 2 + side)
}

/// `-U` relay `id`'s host socket.
pub(super) fn udp_relay(id: usize) -> Token {
    Token(FIRST_UDP_RELAY + id)
}

/// Kernel flow `flow`'s reservation socket.
pub(super) fn reservation(flow: FlowId) -> Token {
    Token(FIRST_RESERVATION.saturating_add(offset(flow)))
}

fn id(offset: usize) -> FlowId {
    FlowId(u64::try_from(offset).unwrap_or(u64::MAX))
}

fn offset(flow: FlowId) -> usize {
    usize::try_from(flow.0).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_reads_back_as_its_source() {
        let cases = [
            (TAP, Source::Tap),
            (WAKER, Source::Waker),
            (FAST_EVENTS, Source::FastEvents),
            (flow(FlowId(1)), Source::Flow(FlowId(1))),
            (flow(FlowId(1 << 39)), Source::Flow(FlowId(1 << 39))),
            (listener(0), Source::Listener(0)),
            (listener(7), Source::Listener(7)),
            (relay(3, 0), Source::Relay { id: 3, side: 0 }),
            (relay(3, 1), Source::Relay { id: 3, side: 1 }),
            (udp_relay(5), Source::UdpRelay(5)),
            (reservation(FlowId(9)), Source::Reservation(FlowId(9))),
        ];
        for (token, want) in cases {
            assert_eq!(source(token), want, "{token:?}");
        }
    }
}
