//! # Theory of operation
//!
//! The byte codec of pasta's runtime forwarding protocol, version 2: what `pesto` reads
//! from and writes to the `-c/--conf-path` socket (`../shared/research/pesto.md` §2). Pure:
//! the shell (`main`'s control loop) owns the socket and hands bytes in and out.
//!
//! ## One transaction per connection
//!
//! 1. On accept the server writes [`hello`] (20 bytes: `basil:s\0`, version 2, pif name
//!    size 128, `IFNAMSIZ` 16, big-endian) and the [`dump`] of its tables: for each table,
//!    its pif id, a 136-byte record (name NUL-padded to 128, capabilities, rule count) and
//!    its 56-byte rules; then `0`.
//! 2. The client closes (a listing), or sends one update and closes. An update is a run of
//!    `pif id, u32 count, count rules`, ended by `0`; no table records. A table the update
//!    leaves out ends up empty; a pif given twice gets both runs.
//! 3. No reply is ever sent: success and refusal both end with the server closing.
//!
//! ## Reading an update ([`Update`])
//!
//! Bytes are fed as they arrive, in pieces of any size. Each rule is checked as it
//! completes, against a scratch copy of the tables ([`rule::Table::add`]), so the first
//! bad byte ends the transaction with a reason and nothing else is buffered: memory is
//! bounded by one rule (56 bytes) plus the scratch tables (at most 255 rules each). The
//! result is all the new tables or an error; the caller applies them whole or not at all.
//! Bytes after the terminator are ignored, as pasta does.

use super::SpecError;
use super::rule::{self, Caps, Pif, RULE_SIZE, Rule, Table};

/// The greeting's magic.
pub const MAGIC: [u8; 8] = *b"basil:s\0";
/// The protocol version served.
pub const VERSION: u32 = 2;
/// pasta's `PIF_NAME_SIZE`.
pub const PIF_NAME_SIZE: u32 = 128;
/// Linux's `IFNAMSIZ`.
pub const IFNAMSIZ: u32 = 16;

/// The 20-byte greeting.
#[must_use]
pub fn hello() -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for n in [VERSION, PIF_NAME_SIZE, IFNAMSIZ] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out
}

/// The table dump that follows the greeting: each `(pif, rules)` in order, then `0`.
#[must_use]
pub fn dump(caps: Caps, tables: &[(Pif, &[Rule])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (pif, rules) in tables {
        out.push(pif.id());
        let mut name = [0u8; 128];
        for (dst, src) in name.iter_mut().zip(pif.name().bytes()) {
            *dst = src;
        }
        out.extend_from_slice(&name);
        out.extend_from_slice(&caps.0.to_be_bytes());
        let count = u32::try_from(rules.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for r in *rules {
            out.extend_from_slice(&r.0);
        }
    }
    out.push(0);
    out
}

/// An update being read.
#[derive(Debug)]
pub struct Update {
    caps: Caps,
    served: Vec<Pif>,
    tables: Vec<(Pif, Table)>,
    state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Waiting for a pif id (or the terminator).
    Pif,
    /// Reading a count: the pif, the bytes so far.
    Count(Pif, Vec<u8>),
    /// Reading rules: the pif, how many are left, the current rule's bytes so far.
    Rules(Pif, u32, Vec<u8>),
    /// The terminator came.
    Done,
}

/// What feeding bytes gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    More,
    /// The update is complete: the new tables, one per served pif.
    Complete(rule::Tables),
}

impl Update {
    /// Starts reading an update for a server of `caps` that serves the tables `served`.
    #[must_use]
    pub fn new(caps: Caps, served: &[Pif]) -> Self {
        Self {
            caps,
            served: served.to_vec(),
            tables: served.iter().map(|p| (*p, Table::default())).collect(),
            state: State::Pif,
        }
    }

    /// Whether nothing has been fed yet (an EOF now is a listing, not a broken update).
    #[must_use]
    pub fn untouched(&self) -> bool {
        self.state == State::Pif && self.tables.iter().all(|(_, t)| t.rules().is_empty())
    }

    /// Feeds the next bytes.
    ///
    /// # Errors
    ///
    /// The first thing wrong (a table not served, too many rules, a bad rule, a
    /// conflict); the update is then void.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Progress, SpecError> {
        let bad = |why: String| Err(SpecError(why));
        while let Some((&first, rest)) = bytes.split_first() {
            match &mut self.state {
                State::Done => return Ok(self.complete()),
                State::Pif => {
                    bytes = rest;
                    if first == 0 {
                        self.state = State::Done;
                        return Ok(self.complete());
                    }
                    match Pif::from_id(first).filter(|p| self.served.contains(p)) {
                        Some(pif) => self.state = State::Count(pif, Vec::with_capacity(4)),
                        None => {
                            return bad(format!("rules for a table that does not exist ({first})"));
                        }
                    }
                }
                State::Count(pif, got) => {
                    let take = (4 - got.len()).min(bytes.len());
                    let (head, tail) = bytes.split_at(take);
                    got.extend_from_slice(head);
                    bytes = tail;
                    if let Ok(b) = <[u8; 4]>::try_from(got.as_slice()) {
                        let n = u32::from_be_bytes(b);
                        let max = u32::try_from(rule::MAX_RULES).unwrap_or(u32::MAX);
                        if n > max {
                            return bad(format!("{n} rules for {} (at most {max})", pif.name()));
                        }
                        let pif = *pif;
                        self.state = if n == 0 {
                            State::Pif
                        } else {
                            State::Rules(pif, n, Vec::with_capacity(RULE_SIZE))
                        };
                    }
                }
                State::Rules(pif, left, got) => {
                    let take = (RULE_SIZE - got.len()).min(bytes.len());
                    let (head, tail) = bytes.split_at(take);
                    got.extend_from_slice(head);
                    bytes = tail;
                    if let Ok(raw) = <[u8; RULE_SIZE]>::try_from(got.as_slice()) {
                        let (pif, left) = (*pif, *left - 1);
                        let caps = self.caps;
                        if let Some((_, table)) = self.tables.iter_mut().find(|(p, _)| *p == pif) {
                            table.add(Rule(raw), caps)?;
                        }
                        self.state = if left == 0 {
                            State::Pif
                        } else {
                            State::Rules(pif, left, Vec::with_capacity(RULE_SIZE))
                        };
                    }
                }
            }
        }
        Ok(if self.state == State::Done {
            self.complete()
        } else {
            Progress::More
        })
    }

    fn complete(&self) -> Progress {
        Progress::Complete(
            self.tables
                .iter()
                .map(|(p, t)| (*p, t.rules().to_vec()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::rule::{Side, parse};
    use super::*;

    const CAPS: Caps = Caps(0x1f);

    fn rules(spec: &str) -> Vec<Rule> {
        parse(
            spec,
            Side {
                splice: false,
                udp: false,
            },
            CAPS,
            (32768, 60999),
        )
        .unwrap()
    }

    #[test]
    fn hello_and_dump_are_pastas_bytes() {
        // The real pasta's greeting, as read off its socket.
        let want = "626173696c3a7300000000020000008000000010";
        let got: String = hello().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want);
        let r = rules("8080");
        let d = dump(CAPS, &[(Pif::Host, &r), (Pif::Splice, &[])]);
        assert_eq!(d.len(), 1 + 136 + 56 + 1 + 136 + 1);
        assert_eq!(d.first(), Some(&1));
        assert_eq!(d.get(1..5), Some(&b"HOST"[..]));
        assert_eq!(d.get(129..137), Some(&[0, 0, 0, 0x1f, 0, 0, 0, 1][..]));
        assert_eq!(d.get(137..193), Some(&r[0].0[..]));
        assert_eq!(d.get(193), Some(&3));
        assert_eq!(d.last(), Some(&0));
    }

    fn update(host: &[Rule], splice: Option<&[Rule]>) -> Vec<u8> {
        let mut out = Vec::new();
        for (pif, rules) in [(1u8, Some(host)), (3, splice)] {
            let Some(rules) = rules else { continue };
            out.push(pif);
            out.extend_from_slice(&u32::try_from(rules.len()).unwrap().to_be_bytes());
            for r in rules {
                out.extend_from_slice(&r.0);
            }
        }
        out.push(0);
        out
    }

    #[test]
    fn updates_read_in_any_pieces() {
        let host = [rules("80")[0], rules("81-82:91-92")[0]];
        let bytes = update(&host, Some(&[]));
        for piece in [1, 3, 7, 56, bytes.len()] {
            let mut u = Update::new(CAPS, &Pif::ALL);
            let mut done = None;
            for chunk in bytes.chunks(piece) {
                if let Progress::Complete(t) = u.feed(chunk).unwrap() {
                    done = Some(t);
                }
            }
            let t = done.expect("complete");
            assert_eq!(
                t,
                vec![(Pif::Host, host.to_vec()), (Pif::Splice, Vec::new())]
            );
        }
        // A table left out ends up empty; a bare terminator empties everything.
        let mut u = Update::new(CAPS, &Pif::ALL);
        assert_eq!(
            u.feed(&[0]).unwrap(),
            Progress::Complete(vec![(Pif::Host, Vec::new()), (Pif::Splice, Vec::new())])
        );
        // Bytes after the terminator are ignored.
        let mut u = Update::new(CAPS, &Pif::ALL);
        let mut b = update(&host, None);
        b.extend_from_slice(b"junk");
        assert!(matches!(u.feed(&b).unwrap(), Progress::Complete(_)));
    }

    #[test]
    fn bad_updates_are_refused() {
        let r = rules("80")[0];
        for (bytes, says) in [
            (vec![2u8, 0, 0, 0, 0, 0], "does not exist"),
            (vec![9u8], "does not exist"),
            (vec![1u8, 0, 0, 1, 0], "256 rules"),
            (update(&[r, r], None), "conflict"),
        ] {
            let mut u = Update::new(CAPS, &Pif::ALL);
            let e = u.feed(&bytes).unwrap_err().to_string();
            assert!(e.contains(says), "{bytes:?}: {e}");
        }
        // A SPLICE table on a server that serves HOST only (passt) does not exist.
        let mut u = Update::new(CAPS, &[Pif::Host]);
        assert!(u.feed(&update(&[], Some(&[]))).is_err());
        // Short: more is needed; nothing is complete.
        let mut u = Update::new(CAPS, &Pif::ALL);
        let b = update(&[r], None);
        assert_eq!(u.feed(b.get(..30).unwrap()).unwrap(), Progress::More);
        assert!(!u.untouched());
    }
}
