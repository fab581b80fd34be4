//! The namespace's end of the wire: a tap device (one frame per `read`/`write`), or a
//! connected stream socket in passt's (qemu's) stream protocol, pasta's `-F/--fd`: each
//! frame preceded by its length, 4 bytes big-endian.
//!
//! The stream is read into a buffer and cut into frames; a length of 0 or above
//! [`super::MAX_FRAME`] is a broken peer and ends the link. Writes that the socket does not
//! take at once wait in a queue of at most [`MAX_QUEUED`] bytes, flushed when the socket is
//! writable again; a frame that does not fit is dropped and counted, as a full tap drops
//! it. End of stream ends the link (pasta: `-F` implies `--one-off`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// What carries the namespace's frames.
#[derive(Debug)]
pub enum Link {
    /// A tap device.
    Tap(OwnedFd),
    /// A connected stream socket speaking passt's protocol (`-F`), non-blocking.
    Stream(OwnedFd),
}

/// Bytes queued toward a stream peer at most.
pub const MAX_QUEUED: usize = 4 << 20;

/// A link being served.
#[derive(Debug)]
pub(super) struct Port {
    fd: OwnedFd,
    stream: bool,
    rx: Vec<u8>,
    tx: Vec<u8>,
    tx_off: usize,
    /// Frames dropped because the stream's queue was full.
    pub(super) dropped: u64,
}

/// Why reading stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Nothing more is ready.
    Idle,
    /// The peer closed, or broke the protocol: the link is over.
    Closed,
}

impl Port {
    pub(super) fn new(link: Link) -> Self {
        let (fd, stream) = match link {
            Link::Tap(fd) => (fd, false),
            Link::Stream(fd) => (fd, true),
        };
        Self {
            fd,
            stream,
            rx: Vec::new(),
            tx: Vec::new(),
            tx_off: 0,
            dropped: 0,
        }
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether writes may be left waiting (the poller must report writability).
    pub(super) fn is_stream(&self) -> bool {
        self.stream
    }

    /// The next frame into `buf`: its length, or why there is none.
    pub(super) fn next_frame(&mut self, buf: &mut [u8]) -> Result<usize, Stop> {
        if !self.stream {
            return match nix::unistd::read(&self.fd, buf) {
                Ok(n) if n > 0 => Ok(n),
                Err(err) if !matches!(err, Errno::EAGAIN | Errno::EINTR) => {
                    tracing::warn!(%err, "reading the tap failed");
                    Err(Stop::Idle)
                }
                _ => Err(Stop::Idle),
            };
        }
        loop {
            if let Some(n) = self.cut(buf)? {
                return Ok(n);
            }
            let mut chunk = [0u8; 65536];
            match nix::unistd::read(&self.fd, &mut chunk) {
                Ok(0) => return Err(Stop::Closed),
                Ok(n) => self
                    .rx
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(Errno::EAGAIN | Errno::EINTR) => return Err(Stop::Idle),
                Err(_) => return Err(Stop::Closed),
            }
        }
    }

    /// A whole frame from the front of the receive buffer, if there is one.
    fn cut(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Stop> {
        let Some(head) = self.rx.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = usize::try_from(u32::from_be_bytes(*head)).unwrap_or(usize::MAX);
        if len == 0 || len > super::MAX_FRAME || len > buf.len() {
            return Err(Stop::Closed);
        }
        let Some(frame) = self.rx.get(4..4 + len) else {
            return Ok(None);
        };
        if let Some(dst) = buf.get_mut(..len) {
            dst.copy_from_slice(frame);
        }
        self.rx.drain(..4 + len);
        Ok(Some(len))
    }

    /// Sends one frame (queued behind earlier ones on a stream).
    ///
    /// # Errors
    ///
    /// A tap's write error (the caller logs it).
    pub(super) fn send(&mut self, frame: &[u8]) -> nix::Result<()> {
        if !self.stream {
            return nix::unistd::write(&self.fd, frame).map(drop);
        }
        if self.tx.len() - self.tx_off + 4 + frame.len() > MAX_QUEUED {
            self.dropped += 1;
            return Ok(());
        }
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        self.tx.extend_from_slice(&len.to_be_bytes());
        self.tx.extend_from_slice(frame);
        self.flush();
        Ok(())
    }

    /// Writes what waits, as far as the socket takes it.
    pub(super) fn flush(&mut self) {
        while self.tx_off < self.tx.len() {
            match nix::unistd::write(&self.fd, self.tx.get(self.tx_off..).unwrap_or_default()) {
                Ok(n) if n > 0 => self.tx_off += n,
                _ => break,
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        } else if self.tx_off > MAX_QUEUED / 2 {
            self.tx.drain(..self.tx_off);
            self.tx_off = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Port, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Port::new(Link::Stream(OwnedFd::from(a))), b)
    }

    #[test]
    fn stream_frames_are_cut_by_their_length() {
        use std::io::{Read, Write};
        let (mut port, mut peer) = pair();
        let mut buf = vec![0u8; super::super::MAX_FRAME];
        assert_eq!(port.next_frame(&mut buf), Err(Stop::Idle));
        // Two frames, the second split across writes.
        peer.write_all(&[0, 0, 0, 3, 1, 2, 3, 0, 0]).unwrap();
        assert_eq!(port.next_frame(&mut buf), Ok(3));
        assert_eq!(buf.get(..3), Some(&[1, 2, 3][..]));
        assert_eq!(port.next_frame(&mut buf), Err(Stop::Idle));
        peer.write_all(&[0, 2, 9, 9]).unwrap();
        assert_eq!(port.next_frame(&mut buf), Ok(2));
        // Sent frames carry their length.
        port.send(&[7, 8]).unwrap();
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, [0, 0, 0, 2, 7, 8]);
        // A length of zero is a broken peer; so is the end of the stream.
        peer.write_all(&[0, 0, 0, 0]).unwrap();
        assert_eq!(port.next_frame(&mut buf), Err(Stop::Closed));
        let (mut port, peer) = pair();
        drop(peer);
        assert_eq!(port.next_frame(&mut buf), Err(Stop::Closed));
    }

    #[test]
    fn a_stalled_peer_bounds_the_queue() {
        let (mut port, _peer) = pair();
        let frame = vec![0u8; 60000];
        for _ in 0..200 {
            port.send(&frame).unwrap();
        }
        assert!(port.tx.len() - port.tx_off <= MAX_QUEUED);
        assert!(port.dropped > 0);
    }
}
