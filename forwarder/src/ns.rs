//! # Theory of operation
//!
//! Getting a tap inside the target network namespace while the forwarder itself — and every
//! host socket it opens — stays in the host's namespaces.
//!
//! ## Why a child process
//!
//! An unprivileged process can only enter a network namespace after joining the user
//! namespace that owns it (`setns(CLONE_NEWNET)` needs `CAP_SYS_ADMIN` in both the target's
//! owner and the caller's own user namespace), and joining a user namespace is one-way and
//! forbidden to multithreaded processes. So the work inside the namespace is done by a
//! forked child, before any thread exists, and the results travel back as file
//! descriptors: a tap fd keeps its namespace wherever it is used.
//!
//! ## Spawn (`forwarder [-- CMD]`)
//!
//! The child `unshare`s a new user and network namespace and asks the parent (`b"U"`) to
//! write its id maps: only a process in the parent user namespace may map more than its
//! own id, and root wants the identity map of all ids (so e.g. dhcpcd can still switch to
//! its own user); unprivileged — or root of a user namespace that cannot map them all
//! (`unshare -Ur`) — the map is `0 → euid`, one id, after `setgroups deny`. The
//! parent answers `b"M"`. The child then brings `lo` up, opens the tap,
//! applies `--config-net`, sends the tap fd over a `SOCK_SEQPACKET` socketpair, waits for
//! the parent's go byte (sent once the data plane is serving) and `exec`s CMD. It dies
//! with SIGKILL if the forwarder dies first (`PR_SET_PDEATHSIG`), rather than live on
//! without a network.
//!
//! ## Attach (`--netns PATH|PID [--userns PATH]`)
//!
//! A helper child joins the user namespace (if given, or — for a PID target, unprivileged —
//! the PID's own when it differs from ours), then the network namespace, does the same
//! tap work, sends the fd and exits.
//!
//! ## Messages on the socketpair
//!
//! `b"T"` + `SCM_RIGHTS(tap, -T/-U sockets…)` on success, `b"E"` + a UTF-8 error chain on
//! failure (shown to the user as the cause); on a failure the parent kills and reaps the
//! child (which may be waiting for it) and exits non-zero, so nothing is half-applied from
//! its side. Limit: error text is cut at [`MAX_MESSAGE`] bytes.
//!
//! ## The agent (run time)
//!
//! Work needed inside the namespace after start-up — binding `-T`/`-U` ports added through
//! the API, listing its sockets for `auto` — is done by [`Agent`], a second child forked
//! while the process still has one thread, which joins the namespace and serves requests on
//! its own socketpair for the whole run (see its documentation for the messages). It
//! reports everything over that socket and points its standard streams at `/dev/null`, so
//! that a supervisor waiting for EOF on them (pasta's background contract) does not wait
//! for the agent.

use std::ffi::CString;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::Signal;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, execvp};

use crate::config::{Config, Target};
use crate::{netconf, sys};

/// The namespace side, as seen from the forwarder.
#[derive(Debug)]
pub struct Namespace {
    /// The tap, bound to the namespace.
    pub tap: OwnedFd,
    /// Sockets bound in the namespace for `-T` and `-U`, with the host port each relays to
    /// and whether it is UDP.
    pub ns_listeners: Vec<(OwnedFd, u16, bool)>,
    /// The spawned command, waiting for [`PendingCommand::release`].
    pub command: Option<PendingCommand>,
}

/// A spawned command that has not started yet.
#[derive(Debug)]
pub struct PendingCommand {
    /// Its process.
    pub pid: Pid,
    /// Our end of the socketpair.
    control: OwnedFd,
}

impl PendingCommand {
    /// Lets the command start (the data plane is serving).
    ///
    /// # Errors
    ///
    /// When the command is already gone.
    pub fn release(self) -> Result<Pid> {
        nix::unistd::write(&self.control, b"G").context("release the command")?;
        Ok(self.pid)
    }
}

/// Sets up the namespace side of `cfg`. Must run while the process is single-threaded.
///
/// # Errors
///
/// The failing step, with the child's own error chain when it failed inside the namespace.
pub fn setup(cfg: &Config) -> Result<Namespace> {
    let (ours, theirs) = seqpacket_pair()?;
    match sys::fork_single_threaded().context("fork the namespace helper")? {
        ForkResult::Child => {
            drop(ours);
            let code = match child_main(cfg, &theirs) {
                Ok(()) => 0,
                Err(err) => {
                    let mut msg = format!("E{err:#}").into_bytes();
                    msg.truncate(MAX_MESSAGE);
                    let _ = nix::unistd::write(&theirs, &msg);
                    1
                }
            };
            sys::exit_now(code)
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            let (tap, listeners) = match receive_after_maps(&ours, child, &cfg.target) {
                Ok(got) => got,
                Err(err) => {
                    // The child may be waiting for us: it must not outlive the error.
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(err);
                }
            };
            let ns_listeners = listeners
                .into_iter()
                .zip(ns_listen_addrs(cfg))
                .map(|(fd, (_, to, udp))| (fd, to, udp))
                .collect();
            match &cfg.target {
                Target::Spawn { .. } => Ok(Namespace {
                    tap,
                    ns_listeners,
                    command: Some(PendingCommand {
                        pid: child,
                        control: ours,
                    }),
                }),
                Target::Attach { .. } => {
                    let _ = waitpid(child, None);
                    Ok(Namespace {
                        tap,
                        ns_listeners,
                        command: None,
                    })
                }
            }
        }
    }
}

fn child_main(cfg: &Config, sock: &OwnedFd) -> Result<()> {
    match &cfg.target {
        Target::Spawn { command } => {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("set parent-death signal")?;
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET)
                .context("create user and network namespace")?;
            nix::unistd::write(sock, b"U").context("ask for id maps")?;
            let mut mapped = [0u8; 1];
            if nix::unistd::read(sock, &mut mapped).context("wait for id maps")? != 1
                || mapped != *b"M"
            {
                bail!("the forwarder could not map ids in the new namespace");
            }
            let (tap, listeners) = open_in_namespace(cfg)?;
            send(sock, &tap, &listeners)?;
            drop(tap);
            drop(listeners);
            let mut go = [0u8; 1];
            let n = nix::unistd::read(sock, &mut go).context("wait for the forwarder")?;
            if n == 0 {
                bail!("forwarder exited before the command could start");
            }
            let argv: Vec<CString> = command
                .iter()
                .map(|a| {
                    CString::new(a.as_encoded_bytes())
                        .map_err(|_| anyhow!("argument {a:?} contains a NUL byte"))
                })
                .collect::<Result<_>>()?;
            let program = argv.first().ok_or_else(|| anyhow!("empty command"))?;
            let err = execvp(program, &argv).unwrap_err();
            bail!("run {}: {err}", program.to_string_lossy())
        }
        Target::Attach { netns, userns } => {
            if let Some(userns) = userns {
                enter(userns, CloneFlags::CLONE_NEWUSER)?;
            }
            enter(netns, CloneFlags::CLONE_NEWNET)?;
            let (tap, listeners) = open_in_namespace(cfg)?;
            send(sock, &tap, &listeners)
        }
    }
}

fn open_in_namespace(cfg: &Config) -> Result<(OwnedFd, Vec<OwnedFd>)> {
    if cfg.io.splice_only || cfg.tap_fd.is_some() {
        // No tap made here (none, or -F's): `lo` up, and a stand-in descriptor where the
        // tap goes in the reply (the forwarder drops it).
        netconf::configure_namespace(&cfg.ifname, &cfg.network, false, None)?;
        let stand_in = OwnedFd::from(std::fs::File::open("/dev/null").context("open /dev/null")?);
        return Ok((stand_in, ns_listeners(cfg)?));
    }
    let tap = sys::open_tap(&cfg.ifname)
        .with_context(|| format!("open tap {} in the namespace", cfg.ifname))?;
    netconf::configure_namespace(
        &cfg.ifname,
        &cfg.network,
        cfg.config_net,
        cfg.ns_mac.map(|m| m.0),
    )?;
    Ok((tap, ns_listeners(cfg)?))
}

/// The `-T`/`-U` sockets bound at start.
fn ns_listeners(cfg: &Config) -> Result<Vec<OwnedFd>> {
    let mut listeners = Vec::new();
    for (addr, _, udp) in ns_listen_addrs(cfg) {
        listeners.push(if udp {
            crate::io::bind_udp(addr)
                .with_context(|| format!("forward namespace udp port {addr} (-U)"))?
        } else {
            crate::io::listen_tcp(addr)
                .with_context(|| format!("forward namespace tcp port {addr} (-T)"))?
        });
    }
    Ok(listeners)
}

/// The addresses `-T` and `-U` bind inside the namespace, in order, with the host port
/// each relays to and whether it is UDP.
#[must_use]
pub fn ns_listen_addrs(cfg: &Config) -> Vec<(std::net::SocketAddr, u16, bool)> {
    let tcp = cfg.ns_tcp_forwards.iter().map(|m| (m, false));
    let udp = cfg.ns_udp_forwards.iter().map(|m| (m, true));
    tcp.chain(udp)
        .flat_map(|(m, udp)| ns_bind_addrs(m).into_iter().map(move |a| (a, m.to, udp)))
        .collect()
}

/// Where a `-T`/`-U` port is bound in the namespace: the spec's address, or the loopback of
/// both families.
#[must_use]
pub fn ns_bind_addrs(m: &crate::forward::PortMap) -> Vec<std::net::SocketAddr> {
    match m.bind {
        Some(a) => vec![std::net::SocketAddr::new(a, m.listen)],
        None => vec![
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, m.listen)),
            std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, m.listen)),
        ],
    }
}

/// This process's user namespace.
const OWN_USERNS: &str = "/proc/self/ns/user";

/// What names a namespace file: its device and inode (`None` if it cannot be read).
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn enter(path: &Path, kind: CloneFlags) -> Result<()> {
    let what = if kind == CloneFlags::CLONE_NEWUSER {
        "user"
    } else {
        "network"
    };
    let fd = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .with_context(|| format!("open {what} namespace {}", path.display()))?;
    // setns(2) refuses (EINVAL) to join the user namespace the process is already in, which
    // is what `--userns /proc/PID/ns/user` names when the caller and PID share it.
    if kind == CloneFlags::CLONE_NEWUSER {
        let ours = identity(Path::new(OWN_USERNS));
        if ours.is_some() && identity(path) == ours {
            return Ok(());
        }
    }
    setns(&fd, kind).with_context(|| format!("join {what} namespace {}", path.display()))
}

/// Writes the id maps of `child`'s new user namespace, from the parent namespace.
fn write_id_maps(child: Pid) -> Result<()> {
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let dir = PathBuf::from(format!("/proc/{child}"));
    // Root may map every id, so commands in the namespace keep all their users; root of a
    // user namespace that itself maps fewer ids (`unshare -Ur`) may not, and falls back to
    // what an unprivileged user does: map exactly itself, after giving up setgroups.
    if uid == 0
        && std::fs::write(dir.join("uid_map"), "0 0 4294967295").is_ok()
        && std::fs::write(dir.join("gid_map"), "0 0 4294967295").is_ok()
    {
        return Ok(());
    }
    std::fs::write(dir.join("setgroups"), "deny")
        .context("write setgroups of the new namespace")?;
    std::fs::write(dir.join("uid_map"), format!("0 {uid} 1"))
        .context("write uid_map of the new namespace")?;
    std::fs::write(dir.join("gid_map"), format!("0 {gid} 1"))
        .context("write gid_map of the new namespace")?;
    Ok(())
}

/// Receives the tap, first serving a spawned child's request for id maps.
fn receive_after_maps(
    sock: &OwnedFd,
    child: Pid,
    target: &Target,
) -> Result<(OwnedFd, Vec<OwnedFd>)> {
    if matches!(target, Target::Spawn { .. }) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = nix::unistd::read(sock, &mut buf).context("wait for the new namespace")?;
        match buf.get(..n) {
            Some([b'U']) => {
                write_id_maps(child)?;
                nix::unistd::write(sock, b"M").context("confirm id maps")?;
            }
            Some([b'E', rest @ ..]) => bail!("{}", String::from_utf8_lossy(rest)),
            _ => bail!("namespace helper exited before creating the namespace"),
        }
    }
    receive(sock)
}

fn send(sock: &OwnedFd, tap: &OwnedFd, listeners: &[OwnedFd]) -> Result<()> {
    let fds: Vec<std::os::fd::RawFd> = std::iter::once(tap.as_raw_fd())
        .chain(listeners.iter().map(AsRawFd::as_raw_fd))
        .collect();
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(b"T")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("send the tap to the forwarder")?;
    Ok(())
}

fn receive(sock: &OwnedFd) -> Result<(OwnedFd, Vec<OwnedFd>)> {
    let (data, fds) =
        recv_with_fds(sock, MAX_MESSAGE).context("receive the tap from the namespace helper")?;
    let mut fds = fds.into_iter();
    match (data.first(), fds.next()) {
        (Some(b'T'), Some(tap)) => Ok((tap, fds.collect())),
        (Some(b'E'), _) => Err(anyhow!(
            "{}",
            String::from_utf8_lossy(data.get(1..).unwrap_or_default())
        )),
        _ => Err(anyhow!("namespace helper exited without a result")),
    }
}

/// The parent's and the child's ends of a message channel (`SOCK_SEQPACKET`: one `write`
/// is one message).
fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("create socketpair")
}

/// One message of at most `size` bytes and the descriptors it carries (at most
/// [`MAX_PASSED_FDS`]), each adopted as an `OwnedFd`.
fn recv_with_fds(sock: &OwnedFd, size: usize) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; size];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; MAX_PASSED_FDS]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(sys::adopt_received_fd));
        }
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((buf, fds))
}

/// Descriptors one message can carry (the kernel's `SCM_MAX_FD` is 253): the tap and the
/// `-T` listening sockets.
pub const MAX_PASSED_FDS: usize = 250;

/// Resolves `--netns PID|PATH` and `--userns` into a target.
///
/// # Errors
///
/// When a PID target does not exist.
pub fn attach_target(netns: &str, userns: Option<PathBuf>) -> Result<Target> {
    if let Ok(pid) = netns.parse::<u32>() {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if !proc_dir.exists() {
            bail!("--netns {pid}: no such process");
        }
        let userns = userns.or_else(|| {
            let theirs = proc_dir.join("ns/user");
            let differs = identity(&theirs) != identity(Path::new(OWN_USERNS));
            (differs && !nix::unistd::geteuid().is_root()).then_some(theirs)
        });
        return Ok(Target::Attach {
            netns: proc_dir.join("ns/net"),
            userns,
        });
    }
    let path = PathBuf::from(netns);
    // `ip netns` names: a bare name means /run/netns/NAME.
    let path = if path.components().count() == 1 && !path.exists() {
        Path::new("/run/netns").join(path)
    } else {
        path
    };
    Ok(Target::Attach {
        netns: path,
        userns,
    })
}

/// Largest message on the socketpair.
pub const MAX_MESSAGE: usize = 4096;

/// A process that lives in the target's namespaces for the whole run and does there what
/// the control plane needs after start-up: bind the sockets of `-T`/`-U` forwards added
/// through the API, and read the namespace's socket tables for `auto`.
///
/// ## Why a process
///
/// The forwarder's own threads stay in the host's namespaces, and an unprivileged process
/// cannot `setns` into the namespace once it has threads (see the module's theory). So the
/// agent is forked at start-up while the process still has one thread; it joins the user
/// namespace (when there is one to join) and the network namespace, and then answers
/// requests on a `SOCK_SEQPACKET` socketpair until the forwarder goes away (EOF, or
/// `PR_SET_PDEATHSIG`). `/proc/net/*` read by the agent shows the agent's network namespace.
///
/// ## Messages
///
/// `b"B" + (b't'|b'u') + ADDR:PORT` → `b"F"` + `SCM_RIGHTS(fd)` or `b"E"` + error text;
/// `b"P" + (b't'|b'u')` → `b"L"` + lines `ADDR PORT` (at most [`MAX_AGENT_ENTRIES`]);
/// `b"S" + (b'4'|b'6')` → `b"F"` + `SCM_RIGHTS(fd)`: a new non-blocking TCP socket, not
/// bound, for the data plane to connect (`--host-lo-to-ns-lo`; that agent is the data
/// plane's own, so the control plane's requests never wait behind it).
#[derive(Debug)]
pub struct Agent {
    sock: OwnedFd,
    pid: Pid,
}

/// Most sockets one table listing reports.
pub const MAX_AGENT_ENTRIES: usize = 4096;
const AGENT_REPLY: usize = MAX_AGENT_ENTRIES * 48 + 16;

impl Agent {
    /// Forks the agent into `netns` (after `userns`, if given). Must run while the process
    /// is single-threaded.
    ///
    /// # Errors
    ///
    /// When the fork fails, or the agent cannot join the namespaces (its error chain).
    pub fn start(userns: Option<&Path>, netns: &Path) -> Result<Self> {
        let (ours, theirs) = seqpacket_pair()?;
        let _ = nix::sys::socket::setsockopt(
            &theirs,
            nix::sys::socket::sockopt::SndBuf,
            &(AGENT_REPLY * 2),
        );
        let _ = nix::sys::socket::setsockopt(
            &ours,
            nix::sys::socket::sockopt::RcvBuf,
            &(AGENT_REPLY * 2),
        );
        match sys::fork_single_threaded().context("fork the namespace agent")? {
            ForkResult::Child => {
                drop(ours);
                let joined = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                    .context("set parent-death signal")
                    .and_then(|()| match userns {
                        Some(u) => enter(u, CloneFlags::CLONE_NEWUSER),
                        None => Ok(()),
                    })
                    .and_then(|()| enter(netns, CloneFlags::CLONE_NEWNET));
                match joined {
                    Ok(()) => {
                        // The agent answers over its socket only. It must not hold the
                        // standard streams: a supervisor waiting for EOF on them (pasta's
                        // background contract) would wait for the agent too.
                        let _ = sys::stdio_to_null();
                        let _ = nix::unistd::write(&theirs, b"R");
                        agent_main(&theirs);
                        sys::exit_now(0)
                    }
                    Err(err) => {
                        let mut msg = format!("E{err:#}").into_bytes();
                        msg.truncate(MAX_MESSAGE);
                        let _ = nix::unistd::write(&theirs, &msg);
                        sys::exit_now(1)
                    }
                }
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                let mut buf = vec![0u8; MAX_MESSAGE];
                let n = nix::unistd::read(&ours, &mut buf).context("wait for the agent")?;
                match buf.get(..n) {
                    Some([b'R']) => {}
                    Some([b'E', rest @ ..]) => {
                        let _ = waitpid(child, None);
                        bail!("namespace agent: {}", String::from_utf8_lossy(rest))
                    }
                    _ => {
                        let _ = waitpid(child, None);
                        bail!("namespace agent exited at start")
                    }
                }
                // A stuck agent must not hang the control plane.
                let _ = nix::sys::socket::setsockopt(
                    &ours,
                    nix::sys::socket::sockopt::ReceiveTimeout,
                    &nix::sys::time::TimeVal::new(5, 0),
                );
                Ok(Self {
                    sock: ours,
                    pid: child,
                })
            }
        }
    }

    /// Binds (and, for TCP, listens on) `addr` in the namespace.
    ///
    /// # Errors
    ///
    /// The agent's error (e.g. "Address in use"), or a lost agent.
    pub fn bind(&self, addr: std::net::SocketAddr, udp: bool) -> Result<OwnedFd> {
        let req = format!("B{}{addr}", if udp { 'u' } else { 't' });
        nix::unistd::write(&self.sock, req.as_bytes()).context("ask the namespace agent")?;
        let (data, mut fds) = self.reply()?;
        match (data.first(), fds.pop()) {
            (Some(b'F'), Some(fd)) => Ok(fd),
            (Some(b'E'), _) => bail!(
                "{}",
                String::from_utf8_lossy(data.get(1..).unwrap_or_default())
            ),
            _ => bail!("the namespace agent did not answer"),
        }
    }

    /// The listening TCP (or unconnected bound UDP) sockets of the namespace, both families.
    ///
    /// # Errors
    ///
    /// A lost agent.
    pub fn bound(&self, udp: bool) -> Result<Vec<crate::forward::Bound>> {
        nix::unistd::write(&self.sock, if udp { b"Pu" } else { b"Pt" })
            .context("ask the namespace agent")?;
        let (data, _) = self.reply()?;
        let Some((b'L', rest)) = data.split_first() else {
            bail!("the namespace agent did not answer");
        };
        Ok(String::from_utf8_lossy(rest)
            .lines()
            .filter_map(|l| {
                let (a, p) = l.split_once(' ')?;
                Some(crate::forward::Bound {
                    addr: a.parse().ok()?,
                    port: p.parse().ok()?,
                })
            })
            .collect())
    }

    /// A new non-blocking TCP socket of the family made in the namespace.
    ///
    /// # Errors
    ///
    /// The agent's error, or a lost agent.
    pub fn tcp_socket(&self, v6: bool) -> Result<OwnedFd> {
        nix::unistd::write(&self.sock, if v6 { b"S6" } else { b"S4" })
            .context("ask the namespace agent")?;
        let (data, mut fds) = self.reply()?;
        match (data.first(), fds.pop()) {
            (Some(b'F'), Some(fd)) => Ok(fd),
            (Some(b'E'), _) => bail!(
                "{}",
                String::from_utf8_lossy(data.get(1..).unwrap_or_default())
            ),
            _ => bail!("the namespace agent did not answer"),
        }
    }

    fn reply(&self) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        recv_with_fds(&self.sock, AGENT_REPLY).context("read the namespace agent's answer")
    }
}

impl crate::io::NamespaceSockets for Agent {
    fn tcp_socket(&self, v6: bool) -> Result<OwnedFd> {
        Agent::tcp_socket(self, v6)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// The agent's loop (in the namespace).
fn agent_main(sock: &OwnedFd) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = match nix::unistd::read(sock, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let req = buf.get(..n).unwrap_or_default();
        let sent = match req {
            [b'B', proto, addr @ ..] => {
                let bound = String::from_utf8_lossy(addr)
                    .parse::<std::net::SocketAddr>()
                    .map_err(|_| anyhow!("bad address"))
                    .and_then(|a| {
                        if *proto == b'u' {
                            crate::io::bind_udp(a)
                        } else {
                            crate::io::listen_tcp(a)
                        }
                        .map_err(|e| anyhow!("{e}"))
                    });
                match bound {
                    Ok(fd) => sendmsg::<()>(
                        sock.as_raw_fd(),
                        &[IoSlice::new(b"F")],
                        &[ControlMessage::ScmRights(&[fd.as_raw_fd()])],
                        MsgFlags::empty(),
                        None,
                    )
                    .map(drop),
                    Err(err) => nix::unistd::write(sock, format!("E{err}").as_bytes()).map(drop),
                }
            }
            [b'S', family] => {
                let made = nix::sys::socket::socket(
                    if *family == b'6' {
                        AddressFamily::Inet6
                    } else {
                        AddressFamily::Inet
                    },
                    SockType::Stream,
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                    None,
                );
                match made {
                    Ok(fd) => sendmsg::<()>(
                        sock.as_raw_fd(),
                        &[IoSlice::new(b"F")],
                        &[ControlMessage::ScmRights(&[fd.as_raw_fd()])],
                        MsgFlags::empty(),
                        None,
                    )
                    .map(drop),
                    Err(err) => nix::unistd::write(sock, format!("E{err}").as_bytes()).map(drop),
                }
            }
            [b'P', proto] => {
                let udp = *proto == b'u';
                let mut out = String::from("L");
                // A table that cannot be read (no IPv6 in this kernel) has no sockets.
                let Ok(bound) = crate::forward::read_bound(udp, |path| {
                    Ok::<_, std::convert::Infallible>(
                        std::fs::read_to_string(path).unwrap_or_default(),
                    )
                });
                for b in bound.into_iter().take(MAX_AGENT_ENTRIES) {
                    out.push_str(&format!("{} {}\n", b.addr, b.port));
                }
                nix::unistd::write(sock, out.as_bytes()).map(drop)
            }
            _ => nix::unistd::write(sock, b"Ebad request").map(drop),
        };
        if sent.is_err() {
            return;
        }
    }
}
