//! The `forwarder` binary: parse, resolve the plan, set up the namespace, run the data plane,
//! supervise. See `docs/architecture.md` for the order of start-up and why it matters (the
//! namespace helper is forked while the process still has one thread).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use forwarder::cli::{self as cli, Args, Face, Invocation};
use forwarder::control::Control;
use forwarder::engine::Engine;
use forwarder::forward::Kind;
use forwarder::forward::rule::Tables;
use forwarder::{io, netconf, ns};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let face = match Face::of(
        argv.first()
            .map_or(std::ffi::OsStr::new(""), |a| a.as_os_str()),
    ) {
        Invocation::Face(face) => face,
        Invocation::NotYet(name) => {
            eprintln!(
                "{name}: forwarder has no {name} face yet (docs/faces.md); start it as forwarder or pasta"
            );
            return ExitCode::from(1);
        }
    };
    let program = match face {
        Face::Native => "forwarder",
        Face::Pasta => "pasta",
    };
    if face == Face::Pasta {
        // pasta's start-up: inherited descriptors are closed (a supervisor's pipe must not
        // be held by the daemon), but -F's. The native face leaves them to its command.
        let args = cli::parse(face, argv);
        forwarder::sys::close_inherited_fds(args.fd);
        return face_main(program, args);
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "man") {
        // `forwarder man | man -l -`: the manual, generated from this command line.
        return match cli::man_page() {
            Ok(page) if std::io::stdout().write_all(&page).is_ok() => ExitCode::SUCCESS,
            _ => ExitCode::from(1),
        };
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "ctl") {
        return forwarder::ctl::main(std::env::args_os().skip(1));
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "ebpf-status")
    {
        return forwarder::ebpf::status_main(std::env::args_os().skip(1));
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "reap-link") {
        return forwarder::ebpf::reap_main(std::env::args_os().skip(1));
    }
    face_main(program, cli::parse(face, argv))
}

/// Runs one face's parsed command line: into the background first if the face asks for
/// it (see [`Background`]), then [`run`].
fn face_main(program: &str, args: Args) -> ExitCode {
    let mut ready = if args.runs_in_background() {
        match Background::fork() {
            Ok(ready) => Some(ready),
            Err(err) => {
                eprintln!("{program}: {err:#}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    if let Err(err) = init_logging(&args) {
        eprintln!("{program}: {err:#}");
        return ExitCode::from(1);
    }
    if args.stderr && args.face == Face::Pasta {
        warn!("--stderr will be dropped soon (it has no effect)");
    }
    if args.no_copy_routes || args.no_copy_addrs {
        warn!(
            "--no-copy-routes/--no-copy-addrs will be dropped soon (forwarder sets up one address and the default route)"
        );
    }
    match run(args, &mut ready) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{program}: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// pasta's process contract (`../shared/research/pesto.md`, §4): the foreground process
/// returns 0 once the namespace is served, and nothing the supervisor waits on stays open.
///
/// The fork happens first, while the process has one thread: the parent only waits on a
/// pipe. The child (the daemon) starts a new session and does all the work; once ready it
/// points its standard streams at /dev/null and writes `ready` into the pipe, so the parent
/// exits 0 and the supervisor's pipes reach EOF. If the child fails first, its message goes
/// to the inherited standard error, the pipe closes empty and the parent exits with the
/// child's status (1).
struct Background {
    pipe: Option<std::os::fd::OwnedFd>,
}

impl Background {
    /// Forks; returns in the child only.
    fn fork() -> Result<Self> {
        use std::io::Read;
        let (read, write) = nix::unistd::pipe().context("pipe for the background fork")?;
        match forwarder::sys::fork_single_threaded().context("fork into the background")? {
            nix::unistd::ForkResult::Child => {
                drop(read);
                nix::unistd::setsid().context("setsid")?;
                Ok(Self { pipe: Some(write) })
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(write);
                let mut word = Vec::new();
                // Up to the word, not to EOF: helpers forked later (the namespace agent)
                // hold copies of the pipe for as long as they live.
                let _ = std::fs::File::from(read).take(5).read_to_end(&mut word);
                if word == b"ready" {
                    std::process::exit(0);
                }
                let code = match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => code.clamp(1, 255),
                    _ => 1,
                };
                std::process::exit(code);
            }
        }
    }

    /// The daemon is serving: release the standard streams and the waiting parent.
    fn ready(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        if let Err(err) = forwarder::sys::stdio_to_null() {
            warn!("releasing the standard streams: {err}");
        }
        let _ = std::fs::File::from(pipe).write_all(b"ready");
    }
}

fn run(args: Args, background: &mut Option<Background>) -> Result<ExitCode> {
    let host = netconf::host_info(args.template()).context("read the host's routes")?;
    debug!(?host, "host network");
    let mut cfg = args.into_config(&host)?;
    if cfg.services.icmp && !io::ping_sockets_allowed() {
        cfg.services.echo_local_only = true;
        info!(
            "ping sockets are not allowed for this group (net.ipv4.ping_group_range): answering ICMP echo locally"
        );
    }
    log_plan(&cfg);
    io::set_freebind(cfg.io.freebind);
    // Bound before anything else starts: a port in use stops start-up with nothing half done.
    if !cfg.all.is_empty() {
        match netconf::raise_nofile() {
            Ok(n) => debug!(limit = n, "open-file limit raised for all"),
            Err(err) => warn!("{err:#}"),
        }
    }
    // `all` binds what it can and keeps the ports it got; a list is all or nothing.
    let bind = |maps: &mut Vec<forwarder::forward::PortMap>, kind: Kind| {
        if cfg.all.contains(&kind) {
            let (listeners, bound) = io::bind_best_effort(maps, kind.is_udp())?;
            *maps = bound;
            Ok::<_, anyhow::Error>(listeners)
        } else {
            io::bind_forwards(maps, kind.is_udp())
        }
    };
    let tcp = bind(&mut cfg.tcp_forwards, Kind::Tcp)?;
    let udp = bind(&mut cfg.udp_forwards, Kind::Udp)?;
    for m in &cfg.tcp_forwards {
        debug!(listen = m.listen, to = m.to, bind = ?m.bind, "forwarding tcp");
    }
    for m in &cfg.udp_forwards {
        debug!(listen = m.listen, to = m.to, bind = ?m.bind, "forwarding udp");
    }
    if !tcp.is_empty() || !udp.is_empty() {
        info!(
            tcp = cfg.tcp_forwards.len(),
            udp = cfg.udp_forwards.len(),
            "port forwards bound"
        );
    }
    let api = cfg
        .api_socket
        .as_deref()
        .map(|p| unix_listener("--api-socket", p))
        .transpose()?;
    let conf = cfg
        .rules
        .as_ref()
        .map(|r| unix_listener("--conf-path", &r.path))
        .transpose()?;
    if cfg.ebpf && forwarder::ebpf::precheck().is_none() {
        // The fast path hands the namespace's packets to the uplink as they are.
        match netconf::uplink_mtu() {
            Ok(Some(uplink)) if u32::from(cfg.network.mtu) > uplink => {
                info!(
                    from = cfg.network.mtu,
                    to = uplink,
                    "--ebpf: the tap's MTU is capped to the uplink's"
                );
                cfg.network.mtu = u16::try_from(uplink).unwrap_or(cfg.network.mtu);
            }
            Ok(_) => {}
            Err(err) => debug!("reading the uplink's MTU: {err:#}"),
        }
    }
    let ns::Namespace {
        tap,
        ns_listeners,
        command,
    } = ns::setup(&cfg)?;
    let (userns, netns): (Option<std::path::PathBuf>, std::path::PathBuf) =
        match (&cfg.target, &command) {
            (forwarder::config::Target::Attach { netns, userns }, _) => {
                (userns.clone(), netns.clone())
            }
            (_, Some(cmd)) => (
                Some(format!("/proc/{}/ns/user", cmd.pid).into()),
                format!("/proc/{}/ns/net", cmd.pid).into(),
            ),
            (_, None) => anyhow::bail!("no namespace to serve"),
        };
    // The agent must be forked now, while the process has one thread.
    let agent = if api.is_some() || !cfg.auto.is_empty() || cfg.rules.is_some() {
        Some(ns::Agent::start(userns.as_deref(), &netns)?)
    } else {
        None
    };
    // The data plane's own agent, for splicing host loopback clients: its requests must
    // not wait behind the control plane's. Without it those clients take the tap.
    let lo_agent = if cfg.io.splice_loopback {
        ns::Agent::start(userns.as_deref(), &netns)
            .map_err(|err| warn!("host loopback clients go over the tap: {err:#}"))
            .ok()
    } else {
        None
    };
    let (kernel, fast_maps) = if cfg.ebpf {
        match forwarder::ebpf::start(&netns, &cfg.ifname, &cfg.network, &cfg.services) {
            Ok((k, maps)) => (Some(k), maps),
            Err(err) => {
                warn!("--ebpf: staying in userspace: {err:#}");
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    let fast = fast_maps
        .map(|maps| {
            io::fastpath::FastPath::new(
                maps,
                io::fastpath::Settings {
                    grace: cfg.ebpf_grace,
                    udp_idle: cfg.io.udp_idle,
                    source4: cfg.io.outbound.v4,
                    source6: cfg.io.outbound.v6,
                    bound_to_device: cfg.io.outbound.iface.is_some(),
                    max_flows: cfg.ebpf_max_flows,
                },
                Instant::now(),
            )
        })
        .transpose()?;
    let (mut ns_tcp, mut ns_udp) = (Vec::new(), Vec::new());
    for (fd, to, udp) in ns_listeners {
        let list = if udp { &mut ns_udp } else { &mut ns_tcp };
        list.push(io::Listener::namespace(fd, to, udp));
    }
    let mut guest = Vec::new();
    if let Some(v4) = &cfg.network.ipv4 {
        guest.push(std::net::IpAddr::V4(v4.guest));
    }
    if let Some(v6) = &cfg.network.ipv6 {
        guest.push(std::net::IpAddr::V6(v6.guest));
    }
    let mut control = Control::new(agent, cfg.auto.clone(), guest.clone());
    control.set_loopback_reach(cfg.io.host_lo_to_ns_lo);
    if let Some(k) = kernel {
        control.set_kernel(k);
    }
    let mut forwards = Vec::new();
    for (kind, maps, listeners) in [
        (Kind::Tcp, &cfg.tcp_forwards, tcp),
        (Kind::Udp, &cfg.udp_forwards, udp),
        (Kind::TcpNs, &cfg.ns_tcp_forwards, ns_tcp),
        (Kind::UdpNs, &cfg.ns_udp_forwards, ns_udp),
    ] {
        if !maps.is_empty() {
            forwards.push((control.record(kind, maps.clone()), listeners));
        }
    }
    if let Some(path) = &cfg.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("write PID file {}", path.display()))?;
    }
    let mut translation = cfg.translation.clone();
    match netconf::local_prefixes() {
        Ok(local) => translation.policy.local = local,
        Err(err) => warn!("reading the host's local routes failed: {err:#}"),
    }
    let engine = Engine::new(
        cfg.network.clone(),
        cfg.services,
        translation,
        Instant::now(),
    );
    // --splice-only: the helper sent a stand-in for the tap; there is none. -F: the frames
    // come over the inherited socket, in passt's stream protocol.
    let tap = match cfg.tap_fd {
        Some(fd) => {
            let fd = forwarder::sys::adopt_inherited_fd(fd)
                .with_context(|| format!("--fd {fd}: not an open descriptor"))?;
            // A stream socket speaks passt's protocol; a tap (or a datagram socket) gives
            // one frame per read.
            let stream = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
                .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
            Some(if stream {
                io::Link::Stream(fd)
            } else {
                io::Link::Tap(fd)
            })
        }
        None => (!cfg.io.splice_only).then_some(io::Link::Tap(tap)),
    };
    let plane = io::spawn(tap, engine, cfg.io.clone(), forwards, fast)?;
    if let Some(agent) = lo_agent {
        plane.send(io::Command::LoopbackSplice(io::LoopbackSplice {
            source: Box::new(agent),
            to_loopback: cfg.io.host_lo_to_ns_lo,
            guest: guest.clone(),
        }));
    }
    if let Some(rules) = &cfg.rules {
        // Bound now, before the namespace's command runs or the foreground returns: a port
        // in use stops start-up, as pasta's does.
        if !rules.tables.iter().all(|(_, t)| t.is_empty()) {
            match netconf::raise_nofile() {
                Ok(n) => debug!(limit = n, "open-file limit raised for the rules"),
                Err(err) => debug!("{err:#}"),
            }
        }
        control.serve_rules(rules.caps);
        control
            .apply_rules(&plane, &rules.tables)
            .context("forwarding rules")?;
    }
    let child = command.map(ns::PendingCommand::release).transpose()?;
    info!(tap = %cfg.ifname, "forwarding");
    let watch = cfg
        .process
        .netns_quit
        .then(|| NamespaceWatch::new(&netns))
        .flatten();
    if let Some((uid, gid)) = cfg.process.runas {
        forwarder::sys::run_as(uid, gid)
            .with_context(|| format!("--runas: change to user {uid}, group {gid}"))?;
        info!(uid, gid, "running as");
    }
    if let Some(b) = background {
        b.ready();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the control runtime")?;
    let outcome = runtime.block_on(supervise(
        child,
        &plane,
        &mut control,
        Sockets { api, conf },
        watch,
        cfg.process.stats_every,
    ));
    if let Some(path) = &cfg.api_socket {
        let _ = std::fs::remove_file(path);
    }
    // pasta leaves its control socket file behind (clients then get ECONNREFUSED); so does
    // forwarder, for the same clients.
    drop(control);
    let stats = plane.stop()?;
    info!("final stats: {}", stats.summary());
    outcome
}

/// API connections served at once; more are closed at once.
const API_CONNECTIONS: usize = 64;

/// Binds a control socket (`option`: the API's or pesto's) before anything is set up: a
/// bad path stops start-up. A stale socket file (nothing accepts on it) is replaced; a live
/// one or another file is an error.
fn unix_listener(option: &str, path: &std::path::Path) -> Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            anyhow::bail!("{option} {}: exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{option} {}: another process serves it", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("{option} {}: remove the stale socket", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("{option} {}", path.display()))?;
    // Whoever can connect can open ports: the socket is the owner's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("{option} {}: restrict to the owner", path.display()))?;
    }
    listener
        .set_nonblocking(true)
        .with_context(|| format!("{option}: non-blocking"))?;
    Ok(listener)
}

/// How long a pesto client may take between connecting and finishing its update; pasta
/// waits forever (and stops forwarding meanwhile), forwarder drops the client and changes
/// nothing.
const PESTO_TIMEOUT: Duration = Duration::from_secs(10);

/// One pesto connection: write the greeting and tables, read one update to its
/// terminator (checked as it arrives, [`forwarder::forward::pesto::Update`]), hand a
/// complete one to the control loop. Never a reply: the server closes, as pasta's does.
async fn pesto_connection(
    mut stream: tokio::net::UnixStream,
    dump: Vec<u8>,
    mut update: forwarder::forward::pesto::Update,
    done: tokio::sync::mpsc::Sender<Option<Tables>>,
) {
    use forwarder::forward::pesto::Progress;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let outcome = tokio::time::timeout(PESTO_TIMEOUT, async {
        stream.write_all(&dump).await.map_err(|e| format!("{e}"))?;
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| format!("{e}"))?;
            if n == 0 {
                return if update.untouched() {
                    Ok(None)
                } else {
                    Err("the update ended early".to_string())
                };
            }
            match update.feed(chunk.get(..n).unwrap_or_default()) {
                Ok(Progress::Complete(tables)) => return Ok(Some(tables)),
                Ok(Progress::More) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let tables = match outcome {
        Ok(Ok(tables)) => tables,
        Ok(Err(why)) => {
            warn!("pesto: update refused, nothing changed: {why}");
            None
        }
        Err(_) => {
            warn!("pesto: the client took too long, nothing changed");
            None
        }
    };
    let _ = done.send(tables).await;
    let _ = stream.shutdown().await;
}

/// One API connection: read the request until the client shuts down its side, keeping at
/// most `MAX_REQUEST` bytes plus one (so a larger request is seen as too large, and the
/// rest is read and dropped, up to `API_DRAIN`, so that closing does not reset the client
/// before it reads the reply), pass it to the control loop, write the reply.
async fn api_connection(
    mut stream: tokio::net::UnixStream,
    requests: tokio::sync::mpsc::Sender<(Vec<u8>, tokio::sync::oneshot::Sender<Vec<u8>>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const API_DRAIN: usize = 1 << 20;
    let keep = forwarder::control::MAX_REQUEST + 1;
    let mut request = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        let mut total = 0usize;
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 || total > API_DRAIN {
                return Ok::<(), std::io::Error>(());
            }
            total += n;
            let room = keep.saturating_sub(request.len()).min(n);
            request.extend_from_slice(chunk.get(..room).unwrap_or_default());
        }
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        debug!("api: the client sent no complete request");
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if requests.send((request, tx)).await.is_err() {
        return;
    }
    if let Ok(reply) = rx.await {
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    }
}

/// The namespace an attached forwarder serves, as it was at start: it is gone when its
/// path no longer names that namespace — deleted (`ip netns del`, podman removing its bind
/// mount), unmounted, or its process exited (`/proc/PID/ns/net`). Polled every
/// [`NamespaceWatch::EVERY`]: a `stat` is cheap and, unlike pasta's inotify watch on the
/// directory, also works on procfs and sees an unmount before the file goes.
struct NamespaceWatch {
    path: std::path::PathBuf,
    ident: (u64, u64),
}

impl NamespaceWatch {
    const EVERY: Duration = Duration::from_millis(250);

    fn new(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => Some(Self {
                path: path.to_owned(),
                ident: (m.dev(), m.ino()),
            }),
            Err(err) => {
                warn!(path = %path.display(), %err, "cannot watch the namespace; it will not be noticed when it goes");
                None
            }
        }
    }

    fn gone(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.ident,
            Err(err) => err.kind() != std::io::ErrorKind::PermissionDenied,
        }
    }
}

/// The control sockets the loop serves.
struct Sockets {
    /// `--api-socket`.
    api: Option<std::os::unix::net::UnixListener>,
    /// `-c/--conf-path` (pesto).
    conf: Option<std::os::unix::net::UnixListener>,
}

async fn supervise(
    child: Option<Pid>,
    plane: &io::Handle,
    control: &mut Control,
    sockets: Sockets,
    watch: Option<NamespaceWatch>,
    stats_every: Option<Duration>,
) -> Result<ExitCode> {
    let Sockets { api, conf } = sockets;
    let conf = conf
        .map(tokio::net::UnixListener::from_std)
        .transpose()
        .context("serve the --conf-path socket")?;
    // One pesto client at a time (pasta's rule): the next waits in the backlog.
    let mut pesto_busy = false;
    let (pesto_tx, mut pesto_rx) = tokio::sync::mpsc::channel(1);
    let mut watch_tick = tokio::time::interval(NamespaceWatch::EVERY);
    let mut stats_tick = tokio::time::interval(stats_every.unwrap_or(Duration::from_secs(3600)));
    stats_tick.tick().await;
    let api = api
        .map(tokio::net::UnixListener::from_std)
        .transpose()
        .context("serve the API socket")?;
    let (req_tx, mut req_rx) = tokio::sync::mpsc::channel(16);
    let api_slots = std::sync::Arc::new(tokio::sync::Semaphore::new(API_CONNECTIONS));
    let mut auto = tokio::time::interval(forwarder::forward::AUTO_SCAN_INTERVAL);
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("install SIGUSR1 handler")?;
    let mut wait = std::pin::pin!(async move {
        match child {
            Some(pid) => tokio::task::spawn_blocking(move || waitpid(pid, None)).await,
            None => std::future::pending().await,
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut rescan = tokio::time::interval(forwarder::policy::RESCAN_INTERVAL);
    rescan.tick().await;
    loop {
        tokio::select! {
            status = &mut wait => {
                return Ok(match status {
                    Ok(Ok(WaitStatus::Exited(_, code))) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                    Ok(Ok(WaitStatus::Signaled(_, sig, _))) => ExitCode::from(128u8.saturating_add(u8::try_from(sig as i32).unwrap_or(0))),
                    other => { warn!(?other, "lost track of the command"); ExitCode::from(1) }
                });
            }
            _ = term.recv() => {
                // With a command, pass the request on and exit with its status.
                match child {
                    Some(pid) => { let _ = kill(pid, Signal::SIGTERM); }
                    None => { info!("terminated"); return Ok(ExitCode::SUCCESS); }
                }
            }
            _ = int.recv() => {
                // A terminal's ^C reaches the command too; it decides. Without one, stop.
                if child.is_none() { info!("interrupted"); return Ok(ExitCode::SUCCESS); }
            }
            _ = usr1.recv() => plane.send(io::Command::LogStats),
            accepted = async { match &api { Some(l) => l.accept().await, None => std::future::pending().await } } => {
                match accepted {
                    Ok((stream, _)) => match api_slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let tx = req_tx.clone();
                            tokio::spawn(async move {
                                api_connection(stream, tx).await;
                                drop(slot);
                            });
                        }
                        // Bounded: a flood of idle clients cannot grow memory; they are closed.
                        Err(_) => debug!("api: too many connections, closing one"),
                    },
                    Err(err) => debug!(%err, "api: accept failed"),
                }
            }
            Some((request, reply)) = req_rx.recv() => {
                let answer = control.handle(plane, &request);
                let _ = reply.send(answer.to_string().into_bytes());
            }
            _ = auto.tick(), if control.has_auto() => control.scan_auto(plane),
            accepted = async { match &conf { Some(l) => l.accept().await, None => std::future::pending().await } }, if !pesto_busy => {
                match (accepted, control.rule_reader()) {
                    (Ok((stream, _)), Some(update)) => {
                        pesto_busy = true;
                        debug!("pesto: client connected");
                        tokio::spawn(pesto_connection(stream, control.rule_dump(), update, pesto_tx.clone()));
                    }
                    (Err(err), _) => debug!(%err, "pesto: accept failed"),
                    (Ok(_), None) => {}
                }
            }
            Some(update) = pesto_rx.recv() => {
                pesto_busy = false;
                if let Some(tables) = update
                    && let Err(err) = control.apply_rules(plane, &tables)
                {
                    warn!("pesto: update not applied, the rules are as they were: {err:#}");
                }
            }
            _ = rescan.tick() => {
                match tokio::task::spawn_blocking(netconf::local_prefixes).await {
                    Ok(Ok(local)) => plane.send(io::Command::SetLocalPrefixes(local)),
                    Ok(Err(err)) => debug!("rescanning local routes failed: {err:#}"),
                    Err(_) => {}
                }
                if control.fast_path() {
                    match tokio::task::spawn_blocking(netconf::ether_links).await {
                        Ok(Ok(links)) => control.set_uplinks(&links),
                        Ok(Err(err)) => debug!("rescanning links failed: {err:#}"),
                        Err(_) => {}
                    }
                }
            }
            _ = watch_tick.tick(), if watch.is_some() => {
                if let Some(w) = &watch && w.gone() {
                    info!(namespace = %w.path.display(), "the namespace is gone, exiting");
                    return Ok(ExitCode::SUCCESS);
                }
            }
            _ = stats_tick.tick(), if stats_every.is_some() => plane.send(io::Command::LogStats),
            _ = tick.tick() => {
                if plane.is_finished() {
                    if plane.link_closed() {
                        return Ok(ExitCode::SUCCESS);
                    }
                    anyhow::bail!("the data plane stopped");
                }
            }
        }
    }
}

fn log_plan(cfg: &forwarder::config::Config) {
    let net = &cfg.network;
    if let Some(v4) = &net.ipv4 {
        info!(address = %format!("{}/{}", v4.guest, v4.prefix_len), gateway = %v4.gateway, dns = ?v4.dns, "IPv4");
    } else {
        info!("IPv4 off");
    }
    if let Some(v6) = &net.ipv6 {
        info!(address = %format!("{}/{}", v6.guest, v6.prefix_len), gateway = %v6.gateway, router = %v6.router_ll, dns = ?v6.dns, "IPv6");
    } else {
        info!("IPv6 off");
    }
    info!(mtu = net.mtu, mac = %net.our_mac, "link");
}

fn init_logging(args: &Args) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let level = if args.trace {
        "trace"
    } else if args.debug {
        "debug"
    } else if args.quiet {
        "warn"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("forwarder={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &args.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(true)
                .open(path)
                .with_context(|| format!("open log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(CappedLog {
                    file,
                    written: 0,
                    limit: args.log_size,
                }))
                .init();
        }
        // pasta's default: syslog too (what the daemon says once its streams are gone),
        // unless debugging to the terminal.
        None if args.face == Face::Pasta && !args.debug && !args.trace => {
            use tracing_subscriber::fmt::writer::MakeWriterExt;
            builder
                .with_ansi(false)
                .with_writer(std::io::stderr.and(Syslog::connect("pasta")))
                .init();
        }
        None => {
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init();
        }
    }
    Ok(())
}

/// The system log, as pasta writes it: one datagram per message to `/dev/log`
/// (`FORWARDER_SYSLOG_SOCKET` names another socket, for tests), RFC 3164's
/// `<PRI>IDENT[PID]: MESSAGE`, facility daemon. No socket there: nothing is sent.
struct Syslog {
    sock: Option<std::os::unix::net::UnixDatagram>,
    ident: &'static str,
    pid: u32,
}

impl Syslog {
    fn connect(ident: &'static str) -> Self {
        let path = std::env::var_os("FORWARDER_SYSLOG_SOCKET")
            .unwrap_or_else(|| std::ffi::OsString::from("/dev/log"));
        let sock = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.connect(&path).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .ok();
        Self {
            sock,
            ident,
            pid: std::process::id(),
        }
    }
}

/// One message being formatted for [`Syslog`]; sent when dropped.
struct SyslogLine<'a> {
    to: &'a Syslog,
    severity: u8,
    text: Vec<u8>,
}

impl Write for SyslogLine<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // Bounded: one message is one datagram.
        let room = 8192usize.saturating_sub(self.text.len()).min(data.len());
        self.text
            .extend_from_slice(data.get(..room).unwrap_or_default());
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        let Some(sock) = &self.to.sock else {
            return;
        };
        let text = String::from_utf8_lossy(&self.text);
        let line = format!(
            "<{}>{}[{}]: {}",
            3 * 8 + self.severity,
            self.to.ident,
            self.to.pid,
            text.trim_end()
        );
        // A full or gone log socket loses the message, never blocks forwarding.
        let _ = sock.send(line.as_bytes());
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
    type Writer = SyslogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine {
            to: self,
            severity: 6,
            text: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let severity = match *meta.level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        SyslogLine {
            to: self,
            severity,
            text: Vec::new(),
        }
    }
}

/// The `-l` log file, kept under `--log-size` bytes: a write that would pass the limit first
/// drops the oldest half of the file (whole lines), as pasta makes room by removing old
/// entries at the beginning.
struct CappedLog {
    file: std::fs::File,
    written: u64,
    limit: u64,
}

impl CappedLog {
    fn shrink(&mut self) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut text = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut text)?;
        let half = usize::try_from(self.limit / 2).unwrap_or(usize::MAX);
        let from = text.len().saturating_sub(half);
        let start = text
            .get(from..)
            .and_then(|t| t.iter().position(|b| *b == b'\n'))
            .map_or(text.len(), |p| from + p + 1);
        let tail = text.get(start..).unwrap_or_default();
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(tail)?;
        self.written = tail.len() as u64;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.shrink()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_file_stays_under_its_limit_and_keeps_the_newest_lines() {
        let path = std::env::temp_dir().join(format!("fw-capped-{}.log", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut log = CappedLog {
            file,
            written: 0,
            limit: 4096,
        };
        for i in 0..1000 {
            writeln!(log, "line {i:04} of the log").unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(text.len() <= 4096, "{} bytes", text.len());
        assert!(text.ends_with("line 0999 of the log\n"));
        assert!(text.starts_with("line "), "cut mid-line: {:?}", &text[..20]);
        assert!(!text.contains("line 0000 "));
    }
}
