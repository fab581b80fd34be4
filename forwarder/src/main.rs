//! The `forwarder` binary: parse, resolve the plan, set up the namespace, run the data plane,
//! supervise. See `docs/architecture.md` for the order of start-up and why it matters (the
//! namespace helper is forked while the process still has one thread).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use forwarder::cli::Args;
use forwarder::engine::Engine;
use forwarder::{io, netconf, ns};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(err) = init_logging(&args) {
        eprintln!("forwarder: {err:#}");
        return ExitCode::from(1);
    }
    match run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("forwarder: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    let host = netconf::host_info().context("read the host's routes")?;
    debug!(?host, "host network");
    let mut cfg = args.into_config(&host)?;
    if cfg.services.icmp && !io::ping_sockets_allowed() {
        cfg.services.echo_local_only = true;
        info!(
            "ping sockets are not allowed for this group (net.ipv4.ping_group_range): answering ICMP echo locally"
        );
    }
    log_plan(&cfg);
    // Bound before anything else starts: a port in use stops start-up with nothing half done.
    let listeners = io::bind_forwards(&cfg.tcp_forwards, &cfg.udp_forwards)?;
    for m in &cfg.tcp_forwards {
        debug!(listen = m.listen, to = m.to, bind = ?m.bind, "forwarding tcp");
    }
    for m in &cfg.udp_forwards {
        debug!(listen = m.listen, to = m.to, bind = ?m.bind, "forwarding udp");
    }
    if !listeners.is_empty() {
        info!(
            tcp = cfg.tcp_forwards.len(),
            udp = cfg.udp_forwards.len(),
            "port forwards bound"
        );
    }
    let ns::Namespace {
        tap,
        ns_listeners,
        command,
    } = ns::setup(&cfg)?;
    let mut listeners = listeners;
    listeners.extend(
        ns_listeners
            .into_iter()
            .map(|(fd, to)| io::Listener::namespace_tcp(fd, to)),
    );
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
    let plane = io::spawn(tap, engine, cfg.io.clone(), listeners)?;
    let child = command.map(ns::PendingCommand::release).transpose()?;
    info!(tap = %cfg.ifname, "forwarding");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the control runtime")?;
    let outcome = runtime.block_on(supervise(child, &plane));
    let stats = plane.stop()?;
    info!("final stats: {}", stats.summary());
    outcome
}

async fn supervise(child: Option<Pid>, plane: &io::Handle) -> Result<ExitCode> {
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
            _ = rescan.tick() => {
                match tokio::task::spawn_blocking(netconf::local_prefixes).await {
                    Ok(Ok(local)) => plane.send(io::Command::SetLocalPrefixes(local)),
                    Ok(Err(err)) => debug!("rescanning local routes failed: {err:#}"),
                    Err(_) => {}
                }
            }
            _ = tick.tick() => {
                if plane.is_finished() {
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
                .append(true)
                .open(path)
                .with_context(|| format!("open log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
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
