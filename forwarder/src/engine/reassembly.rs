//! # Theory of operation
//!
//! IPv4 and IPv6 reassembly of fragments the namespace sends (a guest sending a UDP datagram
//! larger than its MTU, e.g. 65507 bytes over a 65520-byte tap). Sans-IO: fragments and `now`
//! in, a whole upper-layer payload out, which the engine parses with `wire::parse_l4` and
//! dispatches like any packet.
//!
//! A datagram is identified by (source, destination, protocol, identification). Each piece is
//! copied into the datagram's buffer at its offset; the received ranges are kept sorted.
//! The datagram is complete when the last fragment (more = 0) fixed the total length and the
//! ranges cover it without a gap.
//!
//! ## Hostile input (RFC 5722, RFC 791)
//!
//! Overlapping fragments drop the whole datagram (RFC 5722 for IPv6; done for IPv4 too, as
//! Linux does for conflicting data). A fragment beyond 65535 bytes, a non-final fragment
//! whose length is not a multiple of 8, or a second "last" fragment with a different end
//! drops the datagram. Every drop is counted by the engine.
//!
//! ## Limits
//!
//! At most [`MAX_DATAGRAMS`] datagrams in reassembly (a new one beyond that is dropped, the
//! older ones keep their chance), at most [`MAX_PIECES`] pieces each, each datagram at most
//! 65535 bytes, and each abandoned after [`TIMEOUT`] (Linux's `ipfrag_time`). So reassembly
//! never holds more than `MAX_DATAGRAMS × 64 KiB`.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::wire::{Fragment, IpProtocol};

/// The datagram a fragment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol.
    pub protocol: IpProtocol,
    /// Identification field.
    pub ident: u32,
}

/// Why a fragment was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Overlaps a piece already received, or contradicts the known end.
    Overlap,
    /// Beyond 65535 bytes, or a non-final piece not a multiple of 8 bytes.
    Malformed,
    /// Too many datagrams or pieces in reassembly.
    Full,
}

#[derive(Debug)]
struct Datagram {
    id: Id,
    started: Instant,
    buf: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    total: Option<usize>,
}

/// Datagrams in reassembly.
#[derive(Debug, Default)]
pub struct Reassembler {
    datagrams: Vec<Datagram>,
}

impl Reassembler {
    /// Adds a fragment. Returns the whole payload when this piece completed its datagram
    /// (the buffer is the caller's from then on).
    ///
    /// # Errors
    ///
    /// [`Rejected`] when the fragment (and with it, its datagram) is dropped.
    pub fn add(
        &mut self,
        now: Instant,
        id: Id,
        frag: &Fragment<'_>,
    ) -> Result<Option<Vec<u8>>, Rejected> {
        self.datagrams
            .retain(|d| now.saturating_duration_since(d.started) < TIMEOUT);
        let start = frag.offset;
        let end = start + frag.payload.len();
        if end > MAX_DATAGRAM || (frag.more && !frag.payload.len().is_multiple_of(8)) {
            self.remove(&id);
            return Err(Rejected::Malformed);
        }
        let index = match self.datagrams.iter().position(|d| d.id == id) {
            Some(i) => i,
            None => {
                if self.datagrams.len() >= MAX_DATAGRAMS {
                    return Err(Rejected::Full);
                }
                self.datagrams.push(Datagram {
                    id,
                    started: now,
                    buf: Vec::new(),
                    ranges: Vec::new(),
                    total: None,
                });
                self.datagrams.len() - 1
            }
        };
        let Some(d) = self.datagrams.get_mut(index) else {
            return Err(Rejected::Full);
        };
        let overlaps = d.ranges.iter().any(|&(s, e)| start < e && s < end);
        let past_end = d.total.is_some_and(|t| end > t);
        let end_conflict = !frag.more && d.total.is_some_and(|t| t != end);
        let beyond_last = !frag.more && d.ranges.iter().any(|&(_, e)| e > end);
        if overlaps || past_end || end_conflict || beyond_last {
            self.datagrams.swap_remove(index);
            return Err(Rejected::Overlap);
        }
        if d.ranges.len() >= MAX_PIECES {
            self.datagrams.swap_remove(index);
            return Err(Rejected::Full);
        }
        if !frag.more {
            d.total = Some(end);
        }
        if d.buf.len() < end {
            d.buf.resize(end, 0);
        }
        if let Some(slot) = d.buf.get_mut(start..end) {
            slot.copy_from_slice(frag.payload);
        }
        let at = d.ranges.partition_point(|&(s, _)| s < start);
        d.ranges.insert(at, (start, end));
        let complete = d.total.is_some_and(|total| {
            let mut covered = 0;
            for &(s, e) in &d.ranges {
                if s != covered {
                    return false;
                }
                covered = e;
            }
            covered == total
        });
        if complete {
            let d = self.datagrams.swap_remove(index);
            let mut buf = d.buf;
            buf.truncate(d.total.unwrap_or(0));
            Ok(Some(buf))
        } else {
            Ok(None)
        }
    }

    /// Datagrams in reassembly.
    #[must_use]
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// Whether nothing is in reassembly.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    fn remove(&mut self, id: &Id) {
        self.datagrams.retain(|d| d.id != *id);
    }
}

/// Datagrams in reassembly at once.
pub const MAX_DATAGRAMS: usize = 64;
/// Pieces per datagram (a 64 KiB datagram at MTU 1280 has 52).
pub const MAX_PIECES: usize = 64;
/// The largest reassembled payload.
pub const MAX_DATAGRAM: usize = 65535;
/// How long an incomplete datagram is kept.
pub const TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Id {
        Id {
            src: "198.51.100.2".parse().unwrap(),
            dst: "203.0.113.1".parse().unwrap(),
            protocol: IpProtocol::Udp,
            ident: 7,
        }
    }

    fn frag(offset: usize, more: bool, payload: &[u8]) -> Fragment<'_> {
        Fragment {
            ident: 7,
            offset,
            more,
            protocol: IpProtocol::Udp,
            payload,
        }
    }

    #[test]
    fn out_of_order_pieces_reassemble() {
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        assert_eq!(r.add(t0, id(), &frag(2000, false, &data[2000..])), Ok(None));
        assert_eq!(r.add(t0, id(), &frag(0, true, &data[..1000])), Ok(None));
        let whole = r.add(t0, id(), &frag(1000, true, &data[1000..2000]));
        assert_eq!(whole, Ok(Some(data)));
        assert!(r.is_empty());
    }

    #[test]
    fn overlap_and_malformed_drop_the_datagram() {
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        r.add(t0, id(), &frag(0, true, &[0; 16])).unwrap();
        assert_eq!(
            r.add(t0, id(), &frag(8, true, &[1; 16])),
            Err(Rejected::Overlap)
        );
        assert!(r.is_empty());
        assert_eq!(
            r.add(t0, id(), &frag(0, true, &[0; 15])),
            Err(Rejected::Malformed),
            "non-final piece not a multiple of 8"
        );
        assert_eq!(
            r.add(t0, id(), &frag(65528, false, &[0; 16])),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn bounded_and_timed_out() {
        let t0 = Instant::now();
        let mut r = Reassembler::default();
        for i in 0..MAX_DATAGRAMS {
            let mut d = id();
            d.ident = u32::try_from(i).unwrap();
            r.add(t0, d, &frag(0, true, &[0; 8])).unwrap();
        }
        let mut extra = id();
        extra.ident = 9999;
        assert_eq!(
            r.add(t0, extra, &frag(0, true, &[0; 8])),
            Err(Rejected::Full)
        );
        assert_eq!(
            r.add(t0 + TIMEOUT, extra, &frag(0, true, &[0; 8])),
            Ok(None)
        );
        assert_eq!(r.len(), 1, "the old ones timed out");
    }
}
