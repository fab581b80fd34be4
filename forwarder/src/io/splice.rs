//! # Theory of operation
//!
//! The splice bypass (`-T/--tcp-ns`): when both ends are local — a client on the
//! namespace's loopback, a server on the host's loopback — no frame is translated. The
//! connection accepted in the namespace and a connection to the host's loopback port are
//! relayed by the kernel with `splice(2)` through one pipe per direction, so the bytes never
//! enter this process's memory.
//!
//! ## Per direction
//!
//! `splice(source → pipe)` while the pipe is empty, then `splice(pipe → destination)` until
//! it is drained; `EAGAIN` on either side waits for that socket's readiness (both are
//! registered edge-triggered, readable and writable). A read of 0 is end of stream: once the
//! pipe is drained, `shutdown(SHUT_WR)` passes the FIN on. The relay ends when both
//! directions have passed their FIN, or at once on an error (both sockets are then reset
//! with `SO_LINGER {1, 0}`).
//!
//! ## Limits
//!
//! Two sockets and two pipes (four descriptors) per connection; each pipe holds at most
//! [`PIPE_SIZE`] bytes in flight. At most `io::MAX_RELAYS` (4096) relays at once, whatever
//! `--max-flows` says (it bounds the engine's table, which relays never enter): the data
//! plane closes a connection accepted beyond that at once (logged at debug), and the client
//! sees it end before any byte.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::sys::socket::{Shutdown, shutdown};

/// One relayed connection.
#[derive(Debug)]
pub struct Relay {
    /// The two sockets: `[namespace side, host side]`.
    pub sockets: [OwnedFd; 2],
    pipes: [(OwnedFd, OwnedFd); 2],
    pending: [usize; 2],
    eof: [bool; 2],
    shut: [bool; 2],
    /// The host-side connect has completed.
    pub connected: bool,
}

/// What a relay needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for readiness.
    Open,
    /// Both directions finished: close.
    Done,
    /// A socket failed: reset both.
    Failed,
}

impl Relay {
    /// A relay between an accepted namespace socket and a host socket being connected.
    ///
    /// # Errors
    ///
    /// The pipes could not be created.
    pub fn new(ns: OwnedFd, host: OwnedFd) -> nix::Result<Self> {
        let flags = OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let pipes = [nix::unistd::pipe2(flags)?, nix::unistd::pipe2(flags)?];
        for (_, w) in &pipes {
            // A larger pipe moves more per splice call; where pipe-max-size refuses, the
            // default 64 KiB still works.
            let _ = nix::fcntl::fcntl(w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        Ok(Self {
            sockets: [ns, host],
            pipes,
            pending: [0; 2],
            eof: [false; 2],
            shut: [false; 2],
            connected: false,
        })
    }

    /// Moves whatever can move, both ways.
    pub fn pump(&mut self) -> Progress {
        if !self.connected {
            return Progress::Open;
        }
        for dir in 0..2 {
            if let Err(err) = self.pump_one(dir) {
                tracing::debug!(%err, "splice relay failed");
                return Progress::Failed;
            }
        }
        if self.shut == [true, true] {
            Progress::Done
        } else {
            Progress::Open
        }
    }

    /// Bytes moved from `sockets[dir]` to `sockets[1 - dir]`.
    fn pump_one(&mut self, dir: usize) -> nix::Result<()> {
        let (Some(src), Some(dst), Some((pipe_r, pipe_w))) = (
            self.sockets.get(dir),
            self.sockets.get(1 - dir),
            self.pipes.get(dir),
        ) else {
            return Ok(());
        };
        let (Some(pending), Some(eof), Some(shut)) = (
            self.pending.get_mut(dir),
            self.eof.get_mut(dir),
            self.shut.get_mut(dir),
        ) else {
            return Ok(());
        };
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        loop {
            if *pending == 0 && !*eof {
                match splice(
                    src,
                    None,
                    pipe_w,
                    None,
                    CHUNK,
                    flags | SpliceFFlags::SPLICE_F_MORE,
                ) {
                    Ok(0) => *eof = true,
                    Ok(n) => *pending += n,
                    Err(Errno::EAGAIN) => {}
                    Err(e) => return Err(e),
                }
            }
            if *pending > 0 {
                match splice(pipe_r, None, dst, None, *pending, flags) {
                    Ok(n) => *pending -= n.min(*pending),
                    Err(Errno::EAGAIN) => return Ok(()),
                    Err(e) => return Err(e),
                }
                continue;
            }
            if *eof && !*shut {
                let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(dst), Shutdown::Write);
                *shut = true;
            }
            return Ok(());
        }
    }
}

/// Capacity asked for each relay pipe (Linux's default `pipe-max-size` is 1 MiB).
pub const PIPE_SIZE: i32 = 1 << 20;
/// Bytes one pipe carries per `splice` call.
pub const CHUNK: usize = 1 << 20;
