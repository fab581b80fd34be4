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
//! * [`set_peek_off`], [`outq`], [`discard`]: the TCP translation's socket calls that `nix`
//!   does not wrap (`SO_PEEK_OFF`, `SIOCOUTQ`, `recv(MSG_TRUNC)` without a buffer).
//!
//! * [`packet_socket`]: an `AF_PACKET` socket bound to one interface that receives nothing
//!   (protocol 0): the fast path re-injects a flow's first frame through it, so the frame
//!   goes through the interface's TC egress again (`--ebpf`).
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

/// An `AF_PACKET`/`SOCK_RAW` socket in the calling thread's namespace, bound to interface
/// `ifindex` with protocol 0, so it only sends: a frame sent on it leaves through the
/// device's queueing path, TC egress included.
///
/// # Errors
///
/// `socket` or `bind` failed (needs `CAP_NET_RAW` over the namespace).
pub fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is adopted on the next line.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
    sll.sll_protocol = 0;
    sll.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed, on this stack frame.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or(0),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

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

/// Changes the process to user `uid` and group `gid` (`--runas`), supplementary groups
/// cleared, keeping `CAP_NET_BIND_SERVICE` on the calling thread when it had it (so
/// forwards added later may still listen on ports below 1024).
///
/// # Errors
///
/// The call that failed (`EPERM` without the privilege to change).
pub fn run_as(uid: u32, gid: u32) -> io::Result<()> {
    use caps::{CapSet, Capability};
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    let keep =
        caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_BIND_SERVICE).unwrap_or(false);
    let errno = |e: nix::Error| io::Error::from_raw_os_error(e as i32);
    let gid = Gid::from_raw(gid);
    let uid = Uid::from_raw(uid);
    setgroups(&[gid]).map_err(errno)?;
    setresgid(gid, gid, gid).map_err(errno)?;
    if keep {
        nix::sys::prctl::set_keepcaps(true).map_err(errno)?;
    }
    setresuid(uid, uid, uid).map_err(errno)?;
    if keep {
        let only: caps::CapsHashSet = std::iter::once(Capability::CAP_NET_BIND_SERVICE).collect();
        caps::set(None, CapSet::Permitted, &only).map_err(io::Error::other)?;
        caps::set(None, CapSet::Effective, &only).map_err(io::Error::other)?;
        let _ = nix::sys::prctl::set_keepcaps(false);
    }
    Ok(())
}

/// Closes every descriptor above 2 the process inherited (pasta's start-up: a pipe its
/// supervisor left open must not be held by the daemon). Call first thing in `main`,
/// before the process opens anything itself. Returns how many were closed.
pub fn close_inherited_fds(keep: Option<RawFd>) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    // Collected first: the listing's own descriptor is one of them, and goes with `dir`.
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && Some(*fd) != keep)
        .collect();
    let mut closed = 0;
    for fd in fds {
        // Still open? (The listing's descriptor is closed by now.)
        if nix::fcntl::fcntl(
            // SAFETY: borrowed for the one call; `fd` is checked to be open by it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .is_err()
        {
            continue;
        }
        // SAFETY: at the start of `main` nothing in this process owns a descriptor above 2:
        // each one here was inherited, so adopting and dropping it closes it without
        // pulling it from under an owner.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        closed += 1;
    }
    closed
}

/// Points standard input, output and error at `/dev/null` (a daemon releasing the
/// streams its supervisor waits on).
///
/// # Errors
///
/// Opening `/dev/null` or `dup2` failing.
pub fn stdio_to_null() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto a standard descriptor number: it closes what that number held
        // (a standard stream, which nothing in the process owns as an `OwnedFd`) and makes
        // it a copy of `null`, which stays open for the call.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Takes ownership of descriptor `fd`, inherited from the parent and named on the command
/// line (`-F/--fd`), set non-blocking.
///
/// # Errors
///
/// `EBADF` when no such descriptor is open.
pub fn adopt_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: borrowed for the one call, which checks that `fd` is open.
    let flags = nix::fcntl::fcntl(
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFL,
    )
    .map_err(io::Error::from)?;
    // SAFETY: `fd` is open (checked above) and was inherited: `close_inherited_fds` kept it
    // and nothing in this process took it since, so this is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(owned)
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

/// `SO_PEEK_OFF`: the offset `MSG_PEEK` reads start at (TCP since Linux 6.9).
///
/// # Errors
///
/// `setsockopt`'s error (`EINVAL`/`EOPNOTSUPP` on kernels without TCP support).
pub fn set_peek_off(fd: &impl AsRawFd, offset: i32) -> io::Result<()> {
    // SAFETY: `offset` is a live c_int for the duration of the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&raw const offset).cast(),
            libc::socklen_t::try_from(size_of::<i32>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SIOCOUTQ`: bytes in a TCP socket's send queue (sent but unacknowledged, or unsent).
///
/// # Errors
///
/// `ioctl`'s error.
pub fn outq(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which is live and aligned.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) };
    if rc == 0 {
        Ok(usize::try_from(n).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A socket's send-side memory (`SO_MEMINFO`): its limit (`sk_sndbuf`) and what its queue
/// takes now (`sk_wmem_queued`), both in the kernel's accounting, which counts each
/// buffer's whole size, headers and slack included, not only the payload.
///
/// # Errors
///
/// `getsockopt`'s error.
pub fn send_memory(fd: &impl AsRawFd) -> io::Result<(usize, usize)> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = libc::socklen_t::try_from(size_of_val(&info)).unwrap_or(0);
    // SAFETY: the kernel writes at most `len` bytes (the array's size) through the pointer,
    // which is live, aligned for u32 and not aliased, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let at = |i: libc::c_int| {
        usize::try_from(i)
            .ok()
            .and_then(|i| info.get(i))
            .map_or(0, |v| usize::try_from(*v).unwrap_or(usize::MAX))
    };
    Ok((
        at(libc::SK_MEMINFO_SNDBUF),
        at(libc::SK_MEMINFO_WMEM_QUEUED),
    ))
}

/// `SO_MEMINFO` (asm-generic/socket.h; the same on x86 and arm).
const SO_MEMINFO: libc::c_int = 55;
/// `SK_MEMINFO_VARS`: the entries `SO_MEMINFO` returns (linux/sock_diag.h).
const SK_MEMINFO_VARS: usize = 9;

/// Discards up to `n` bytes from a TCP socket's receive queue without copying them
/// (`recv` with `MSG_TRUNC`). Returns the bytes discarded.
///
/// # Errors
///
/// `recv`'s error (`EAGAIN` when nothing is queued).
pub fn discard(fd: &impl AsRawFd, n: usize) -> io::Result<usize> {
    // SAFETY: with MSG_TRUNC a TCP socket does not write to the buffer (tcp_recvmsg skips
    // the copy), so a null pointer is never dereferenced; callers only pass TCP sockets.
    let rc = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            n,
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
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
