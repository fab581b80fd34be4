//! # Theory of operation
//!
//! Every `unsafe` system call of the agent lives here (STYLE "unsafe lives in one sys
//! module"); each block carries a `// SAFETY:` comment, and every file descriptor is adopted
//! into an `OwnedFd` on the line after the call that produced it. Calls `nix` wraps safely
//! (sockets, `setns`, `unshare`, `connect`, `send`, `recv`) are made directly by their users.
//!
//! * [`open_tap`]: `/dev/net/tun` + `TUNSETIFF` (`IFF_TAP | IFF_NO_PI`), non-blocking.
//! * [`fork_single_threaded`]: `fork()`, refused unless the process has exactly one thread,
//!   which is what makes running arbitrary Rust in the child sound (no lock held by a thread
//!   that does not exist in the child).
//! * [`adopt_received_fd`]: ownership of a descriptor received with `SCM_RIGHTS`.
//!
//! Platform: Linux only (tun ioctls, `/proc/self/status`).
#![allow(
    unsafe_code,
    reason = "this module is the crate's one home for unsafe system calls"
)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use nix::unistd::ForkResult;

nix::ioctl_write_ptr_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);

/// Opens (or creates) the tap `name` in the calling thread's network namespace.
///
/// # Errors
///
/// The failing step's error: opening `/dev/net/tun`, or `TUNSETIFF` (name too long, a
/// non-tap device of that name, or missing `CAP_NET_ADMIN` over the namespace).
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1-15 bytes"),
        ));
    }
    let fd = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("open /dev/net/tun: {e}")))?;
    // SAFETY: ifreq is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src.cast_signed();
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "IFF_TAP | IFF_NO_PI is 0x1002, fits c_short"
    )]
    {
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    }
    // SAFETY: `fd` is an open tun control descriptor and `req` a valid, initialised ifreq
    // that outlives the call; TUNSETIFF only reads it.
    unsafe { tunsetiff(fd.as_raw_fd(), &raw const req) }
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("TUNSETIFF {name}: {e}")))?;
    Ok(fd)
}

/// Forks, provided the process is single-threaded.
///
/// # Errors
///
/// `EDEADLK`-style refusal when other threads exist, or `fork`'s own error.
pub fn fork_single_threaded() -> io::Result<ForkResult> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork with {threads} threads running"
        )));
    }
    // SAFETY: the process has exactly one thread (checked just above), so the child
    // inherits no lock held by another thread and may run ordinary Rust code.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// Takes ownership of a descriptor received in an `SCM_RIGHTS` control message.
#[must_use]
pub fn adopt_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in our table for this message; nothing else refers
    // to it, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Leaves the process at once with `code`, without running destructors or atexit handlers
/// (what a forked child must do so it does not flush or free the parent's state twice).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_tap_name_is_refused_before_any_syscall() {
        let err = open_tap("a-name-longer-than-15").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn thread_count_reads_proc() {
        assert!(thread_count().unwrap() >= 1);
    }
}
