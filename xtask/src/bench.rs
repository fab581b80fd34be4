//! `cargo xtask bench [--quick]`: forwarder against pasta, slirp4netns and plain kernel
//! routing, side by side in one run.
//!
//! Every contender serves the same guest namespace in a fresh copy of the test world
//! (`docs/testing.md`): remote (203.0.113.1 on its `lo`) ↔ veth ↔ host ↔ contender ↔ guest.
//! forwarder and pasta run in the host namespace attached to the guest (`--config-net`),
//! slirp4netns likewise (its own 10.0.2.0/24 plan), and the kernel ceiling is a veth pair
//! guest ↔ host with IP forwarding. For each repetition, MTU and contender (interleaved, so
//! drift hits all alike):
//!
//! * TCP throughput guest → remote (`up`) and remote → guest (`down`), iperf3 single stream
//!   and 4 streams, `-O 1` to skip slow start; the figure is what the *receiver* counted, so
//!   a contender that carried nothing shows 0, not a sender's optimism;
//! * the inbound port-forward path: a client in the remote reaches an iperf3 server in the
//!   guest through a forwarded host port (forwarder and pasta `-t 5202`, slirp4netns
//!   `add_hostfwd` over its API socket, the kernel by routing to the guest directly);
//! * the local spliced path: guest loopback → host loopback (forwarder and pasta `-T 5203`,
//!   an iperf3 server on the host's 127.0.0.1); slirp4netns and the kernel have no such
//!   path and show "–";
//! * UDP guest → remote at a fixed offered rate ([`UDP_RATE`], 1400-byte datagrams):
//!   received Gbit/s and loss;
//! * connection rate (`tests/scripts/crr.py`: connect, 1-byte exchange, close);
//! * request/response latency over one TCP connection (`tests/scripts/rr.py`, 1 byte each
//!   way, p50 and p99; Python's own cost is in every contender's figure alike);
//! * uploads through a slower uplink ([`BOTTLENECKS`]: a `tbf` token bucket on the host's
//!   veth toward the remote, 100 Mbit/s, 1 Gbit/s and 5 Gbit/s, 1 and 4 streams; at the
//!   first MTU only): received Gbit/s, and the guest's retransmissions as a share of its
//!   segments (iperf3's `retransmits`; the worst of the six). The kernel column routes the
//!   guest through the same bucket, so it is the host's own upload;
//! * the contender process's CPU time (utime + stime from `/proc/PID/stat`) during the
//!   throughput runs, and its peak RSS (`VmHWM`).
//!
//! Figures are medians over the repetitions. Output: `target/bench/results.json`,
//! `target/bench/results.md` (also printed), and `target/bench/throughput.svg`.
//! A contender that cannot run here is reported with the reason, never skipped silently.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Debian packages the benchmark needs beyond the test tools.
pub const PACKAGES: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("pasta", "passt"),
    ("slirp4netns", "slirp4netns"),
    ("python3", "python3"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Contender {
    Forwarder,
    /// forwarder with `--ebpf` (part 1: ARP/NDP in the kernel; the fast path is issue 6).
    ForwarderEbpf,
    Pasta,
    Slirp,
    Kernel,
}

impl Contender {
    const ALL: [Self; 5] = [
        Self::Forwarder,
        Self::ForwarderEbpf,
        Self::Pasta,
        Self::Slirp,
        Self::Kernel,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Forwarder => "forwarder",
            Self::ForwarderEbpf => "forwarder --ebpf",
            Self::Pasta => "pasta",
            Self::Slirp => "slirp4netns",
            Self::Kernel => "kernel veth",
        }
    }
}

/// One measurement of one contender.
#[derive(Debug, Default, Clone)]
struct Sample {
    up_gbps: f64,
    down_gbps: f64,
    up4_gbps: f64,
    down4_gbps: f64,
    inbound_gbps: f64,
    splice_gbps: Option<f64>,
    udp_gbps: f64,
    udp_loss_pct: f64,
    crr_per_s: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    cpu_s: Option<f64>,
    rss_kib: Option<u64>,
    /// Gbit/s through each of [`BOTTLENECKS`] (first MTU only).
    bottleneck_gbps: [Option<f64>; 6],
    /// The guest's retransmissions in % of its segments, the worst bottleneck run.
    bottleneck_retr_pct: Option<f64>,
}

/// The uplink bottlenecks measured: `tbf` rate and iperf3 streams.
const BOTTLENECKS: [(&str, u32); 6] = [
    ("100mbit", 1),
    ("100mbit", 4),
    ("1gbit", 1),
    ("1gbit", 4),
    ("5gbit", 1),
    ("5gbit", 4),
];

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    // `--only NAME` (forwarder, pasta, slirp4netns, kernel): one contender, for debugging.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let reps = if quick { 1 } else { 3 };
    let secs = if quick { 1 } else { 4 };
    let mtus: &[u16] = if quick { &[65520] } else { &[65520, 1500] };
    crate::ensure_packages(PACKAGES)?;
    if !crate::is_root() {
        bail!("the benchmark builds network namespaces: run it as root");
    }
    crate::run(Command::new("cargo").args(["build", "--release", "-p", "forwarder"]))?;
    let root = crate::workspace_root()?;
    let forwarder = root.join("target/release/forwarder");
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir).context("create target/bench")?;

    let mut samples: BTreeMap<(u16, Contender), Vec<Sample>> = BTreeMap::new();
    let mut failures: BTreeMap<(u16, Contender), String> = BTreeMap::new();
    let started = Instant::now();
    for rep in 0..reps {
        for &mtu in mtus {
            for c in Contender::ALL {
                if failures.contains_key(&(mtu, c))
                    || only.as_deref().is_some_and(|o| !c.name().starts_with(o))
                {
                    continue;
                }
                eprintln!(
                    "bench: repetition {}/{reps}, MTU {mtu}, {}",
                    rep + 1,
                    c.name()
                );
                let shaped = mtus.first() == Some(&mtu);
                match measure(c, mtu, secs, shaped, &forwarder, &root) {
                    Ok(s) => samples.entry((mtu, c)).or_default().push(s),
                    Err(err) => {
                        eprintln!("bench: {} at MTU {mtu} cannot run: {err:#}", c.name());
                        failures.insert((mtu, c), format!("{err:#}"));
                    }
                }
            }
        }
    }
    let report = Report {
        samples,
        failures,
        mtus: mtus.to_vec(),
        reps,
        secs,
        elapsed: started.elapsed(),
    };
    let md = report.markdown();
    std::fs::write(out_dir.join("results.md"), &md).context("write results.md")?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&report.json())?,
    )
    .context("write results.json")?;
    std::fs::write(out_dir.join("throughput.svg"), report.svg()).context("write svg")?;
    println!("{md}");
    println!(
        "bench: wrote {}/results.{{md,json}} and throughput.svg",
        out_dir.display()
    );
    Ok(())
}

/// One contender in one fresh world: throughput both ways, then latency.
fn measure(
    c: Contender,
    mtu: u16,
    secs: u32,
    bottlenecks: bool,
    forwarder: &Path,
    root: &Path,
) -> Result<Sample> {
    let mut w = World::new()?;
    let pid = w.start(c, mtu, forwarder)?;
    let remote = w.remote.clone();
    w.serve(&remote, "exec iperf3 -s -p 5201 -B 203.0.113.1")?;
    w.serve(
        &remote,
        &format!(
            "exec python3 {} 7000",
            root.join("tests/scripts/tcp_echo.py").display()
        ),
    )?;
    w.wait_listening(&remote, 5201)?;
    w.wait_listening(&remote, 7000)?;
    let t = Instant::now();
    let lap = |what: &str| eprintln!("bench:   {what} done at {:.1} s", t.elapsed().as_secs_f64());
    let cpu0 = pid.map(cpu_seconds).transpose()?;
    let mut s = Sample {
        up_gbps: w.iperf(secs, "")?,
        down_gbps: w.iperf(secs, "-R")?,
        ..Sample::default()
    };
    if let (Some(p), Some(c0)) = (pid, cpu0) {
        s.cpu_s = Some(cpu_seconds(p)? - c0);
        s.rss_kib = peak_rss(p).ok();
    }
    lap("single stream");
    s.up4_gbps = w.iperf(secs, "-P 4")?;
    s.down4_gbps = w.iperf(secs, "-P 4 -R")?;
    lap("4 streams");
    if bottlenecks {
        let mut worst: f64 = 0.0;
        for (slot, (rate, streams)) in s.bottleneck_gbps.iter_mut().zip(BOTTLENECKS) {
            w.shape(Some(rate))?;
            let (gbps, retr_pct) = w.iperf_retransmits(secs + 1, streams, mtu)?;
            *slot = Some(gbps);
            worst = worst.max(retr_pct);
        }
        w.shape(None)?;
        s.bottleneck_retr_pct = Some(worst);
        lap("bottlenecks");
    }
    (s.udp_gbps, s.udp_loss_pct) = w.iperf_udp(secs)?;
    let guest = w.guest.clone();
    w.serve(&guest, "exec iperf3 -s -p 5202")?;
    w.wait_listening(&guest, 5202)?;
    if c == Contender::Slirp {
        w.slirp_hostfwd(5202)?;
    }
    let target = if c == Contender::Kernel {
        "203.0.113.130"
    } else {
        "198.51.100.2"
    };
    s.inbound_gbps = w.iperf_from_remote(secs, target, 5202)?;
    lap("inbound");
    if matches!(
        c,
        Contender::Forwarder | Contender::ForwarderEbpf | Contender::Pasta
    ) {
        let host = w.host.clone();
        w.serve(&host, "exec iperf3 -s -p 5203 -B 127.0.0.1")?;
        w.wait_listening(&host, 5203)?;
        let out = w.guest_output(&format!("iperf3 -c 127.0.0.1 -p 5203 -t {secs} -O 1 -J"))?;
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        let bps = v
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        s.splice_gbps = Some(bps / 1e9);
        lap("splice");
    }
    lap("udp");
    let crr = w.guest_output(&format!(
        "python3 {} 203.0.113.1 7000 2",
        root.join("tests/scripts/crr.py").display()
    ))?;
    s.crr_per_s = crr
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("crr.py printed {crr:?}"))?;
    lap("connections");
    let rr = w.guest_output(&format!(
        "python3 {} 203.0.113.1 7000 2",
        root.join("tests/scripts/rr.py").display()
    ))?;
    let mut it = rr.split_whitespace().map(str::parse::<f64>);
    if let (Some(Ok(p50)), Some(Ok(p99))) = (it.next(), it.next()) {
        s.rr_p50_us = p50;
        s.rr_p99_us = p99;
    } else {
        bail!("rr.py printed {rr:?}");
    }
    Ok(s)
}

struct World {
    host: String,
    remote: String,
    guest: String,
    children: Vec<Child>,
}

impl World {
    fn new() -> Result<Self> {
        let tag = format!("{}", std::process::id());
        let w = Self {
            host: format!("fwb-h-{tag}"),
            remote: format!("fwb-r-{tag}"),
            guest: format!("fwb-g-{tag}"),
            children: Vec::new(),
        };
        let (h, r, g) = (&w.host, &w.remote, &w.guest);
        sh(&format!(
            "set -e
            ip netns add {h}; ip netns add {r}; ip netns add {g}
            ip -n {h} link add up0 type veth peer name dn0 netns {r}
            ip -n {h} link set up0 mtu 65520; ip -n {r} link set dn0 mtu 65520
            for n in {h} {r} {g}; do ip -n $n link set lo up; done
            ip -n {r} addr add 198.51.100.1/24 dev dn0; ip -n {r} addr add 203.0.113.1/32 dev lo
            ip -n {h} addr add 198.51.100.2/24 dev up0
            ip -n {h} link set up0 up; ip -n {r} link set dn0 up
            ip -n {r} route add 203.0.113.128/25 via 198.51.100.2
            ip -n {h} route add default via 198.51.100.1
            ip netns exec {h} sysctl -qw net.ipv4.ping_group_range='0 2147483647'"
        ))?;
        Ok(w)
    }

    /// Starts the contender; returns the PID whose CPU time is its cost (none for the
    /// kernel).
    fn start(&mut self, c: Contender, mtu: u16, forwarder: &Path) -> Result<Option<u32>> {
        let (h, g) = (self.host.clone(), self.guest.clone());
        let mtu_s = mtu.to_string();
        let mut args: Vec<String> = match c {
            Contender::Forwarder | Contender::ForwarderEbpf => vec![
                forwarder.display().to_string(),
                "--netns".into(),
                g.clone(),
                "--config-net".into(),
                "-4".into(),
                "-q".into(),
                "-m".into(),
                mtu_s,
                "-t".into(),
                "5202".into(),
                "-T".into(),
                "5203".into(),
            ],
            Contender::Pasta => [
                "pasta",
                "--runas",
                "0:0",
                "-q",
                "-f",
                "--config-net",
                "-4",
                "-I",
                "tap0",
                "-t",
                "5202",
                "-u",
                "none",
                "-T",
                "5203",
                "-U",
                "none",
                "-m",
                &mtu_s,
                "--netns",
            ]
            .iter()
            .map(|s| (*s).to_string())
            .chain([format!("/run/netns/{g}")])
            .collect(),
            Contender::Slirp => vec![
                "slirp4netns".into(),
                "--configure".into(),
                format!("--mtu={mtu}"),
                format!("--api-socket={}", self.slirp_api().display()),
                "--netns-type=path".into(),
                format!("/run/netns/{g}"),
                "tap0".into(),
            ],
            Contender::Kernel => {
                sh(&format!(
                    "set -e
                    ip -n {h} link add vg0 mtu {mtu} type veth peer name vg1 mtu {mtu} netns {g}
                    ip -n {h} addr add 203.0.113.129/25 dev vg0; ip -n {h} link set vg0 up
                    ip -n {g} addr add 203.0.113.130/25 dev vg1; ip -n {g} link set vg1 up
                    ip -n {g} route add default via 203.0.113.129
                    ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1"
                ))?;
                return Ok(None);
            }
        };
        if c == Contender::ForwarderEbpf {
            args.push("--ebpf".into());
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &h])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.contender_log())
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .with_context(|| format!("start {}", args.join(" ")))?;
        let pid = child.id();
        self.children.push(child);
        // Ready when the guest can reach the remote.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if Command::new("ip")
                .args(["netns", "exec", &g, "ping", "-c1", "-W1", "203.0.113.1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                || self.tcp_reaches()
            {
                return Ok(Some(pid));
            }
            if let Some(child) = self.children.last_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let err = std::fs::read_to_string(self.contender_log()).unwrap_or_default();
                bail!("exited with {status}: {}", err.trim());
            }
            if Instant::now() > deadline {
                bail!("the guest cannot reach the remote after 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a TCP connection from the guest reaches the remote's SSH-less port 9 (a
    /// refusal counts: it came back through the contender). For contenders without ICMP.
    fn tcp_reaches(&self) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.guest, "python3", "-c"])
            .arg(
                "import socket,sys\ns=socket.socket();s.settimeout(1)\n\
                 try:\n s.connect(('203.0.113.1',9))\nexcept ConnectionRefusedError: sys.exit(0)\n\
                 except Exception: sys.exit(1)",
            )
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Adds a TCP host forward of `port` through slirp4netns's API socket.
    fn slirp_hostfwd(&self, port: u16) -> Result<()> {
        let request = format!(
            "{{\"execute\":\"add_hostfwd\",\"arguments\":{{\"proto\":\"tcp\",\"host_addr\":\"0.0.0.0\",\"host_port\":{port},\"guest_port\":{port}}}}}"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.host, "sh", "-c"])
            .arg(format!(
                "echo '{request}' | socat - UNIX-CONNECT:{}",
                self.slirp_api().display()
            ))
            .output()
            .context("slirp4netns API")?;
        let reply = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || reply.contains("error") {
            bail!("slirp4netns add_hostfwd: {reply}");
        }
        Ok(())
    }

    /// Where the contender's standard error goes (a pipe nobody reads could block it).
    fn contender_log(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{}.contender.log", self.guest))
    }

    fn slirp_api(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{}.slirp.sock", self.guest))
    }

    /// Receiver-side Gbit/s of iperf3 run from the remote against `target:port`.
    fn iperf_from_remote(&self, secs: u32, target: &str, port: u16) -> Result<f64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.remote, "sh", "-c"])
            .arg(format!("iperf3 -c {target} -p {port} -t {secs} -O 1 -J"))
            .output()
            .context("iperf3 from the remote")?;
        let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        if let Some(err) = v.get("error") {
            let listening = Command::new("ip")
                .args(["netns", "exec", &self.host, "ss", "-Htlnp"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let log = std::fs::read_to_string(self.contender_log()).unwrap_or_default();

            eprintln!(
                "bench:   iperf3 from the remote to {target}:{port}: {err}; host listens on: {}; contender said: {}",
                listening.trim(),
                log.trim()
            );
        }
        let bytes = v
            .pointer("/end/sum_received/bytes")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let bps = v
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        Ok(if bytes > 0.0 { bps / 1e9 } else { 0.0 })
    }

    fn serve(&mut self, ns: &str, script: &str) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start server")?;
        self.children.push(child);
        Ok(())
    }

    fn wait_listening(&self, ns: &str, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c"])
            .arg(format!("ss -Htln | grep -q ':{port} '"))
            .status()
            .is_ok_and(|s| s.success())
        {
            if Instant::now() > deadline {
                bail!("nothing listens on {port} in {ns}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn guest_output(&self, script: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.guest, "sh", "-c", script])
            .output()
            .context("run in guest")?;
        if !out.status.success() {
            bail!("{script}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Received Gbit/s and loss % of a UDP run at [`UDP_RATE`].
    fn iperf_udp(&self, secs: u32) -> Result<(f64, f64)> {
        let out = self.guest_output(&format!(
            "iperf3 -c 203.0.113.1 -p 5201 -u -b {UDP_RATE} -l 1400 -t {secs} -J"
        ))?;
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        let get = |path: &str| v.pointer(path).and_then(Value::as_f64);
        let lost = get("/end/sum/lost_percent").unwrap_or(100.0);
        let sent_bps = get("/end/sum/bits_per_second").unwrap_or(0.0);
        Ok((sent_bps * (100.0 - lost) / 100.0 / 1e9, lost))
    }

    /// The JSON report of one TCP iperf3 run from the guest to the remote (`extra`: `-R`,
    /// `-P 4`).
    fn iperf_json(&self, secs: u32, extra: &str) -> Result<Value> {
        let out = self.guest_output(&format!(
            "iperf3 -c 203.0.113.1 -p 5201 -t {secs} -O 1 {extra} -J"
        ))?;
        serde_json::from_str(&out).context("iperf3 JSON")
    }

    /// Receiver-side Gbit/s of one TCP iperf3 run (`extra`: `-R`, `-P 4`); 0 when nothing
    /// arrived.
    fn iperf(&self, secs: u32, extra: &str) -> Result<f64> {
        let v = self.iperf_json(secs, extra)?;
        let field = |name: &str| {
            v.pointer(&format!("/end/sum_received/{name}"))
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
        };
        let (bytes, bps) = (field("bytes"), field("bits_per_second"));
        if bytes <= 0.0 {
            return Ok(0.0);
        }
        Ok(bps / 1e9)
    }

    /// Puts a `tbf` bucket of `rate` on the host's uplink toward the remote (`None`: takes
    /// it off).
    fn shape(&self, rate: Option<&str>) -> Result<()> {
        let h = &self.host;
        match rate {
            Some(r) => sh(&format!(
                "ip netns exec {h} tc qdisc replace dev up0 root tbf rate {r} burst 256kb latency 50ms"
            )),
            None => sh(&format!("ip netns exec {h} tc qdisc del dev up0 root")),
        }
    }

    /// Receiver-side Gbit/s of a guest → remote iperf3 run with `streams` streams, and the
    /// sender's retransmissions in % of the segments it sent (MSS from `mtu`).
    fn iperf_retransmits(&self, secs: u32, streams: u32, mtu: u16) -> Result<(f64, f64)> {
        let v = self.iperf_json(secs, &format!("-P {streams}"))?;
        let get = |path: &str| v.pointer(path).and_then(Value::as_f64).unwrap_or(0.0);
        let bps = get("/end/sum_received/bits_per_second");
        let sent = get("/end/sum_sent/bytes");
        let retr = get("/end/sum_sent/retransmits");
        let segments = (sent / f64::from(mtu.saturating_sub(40).max(536))).max(1.0);
        Ok((bps / 1e9, 100.0 * retr / segments))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.slirp_api());
        let _ = std::fs::remove_file(self.contender_log());
        for ns in [&self.guest, &self.remote, &self.host] {
            let _ = Command::new("sh")
                .args(["-c", &format!("ip netns pids {ns} | xargs -r kill -9")])
                .status();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(script: &str) -> Result<()> {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .context("sh")?;
    if !out.status.success() {
        bail!(
            "set-up failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after ')'.
    Ok((ticks(11) + ticks(12)) / CLOCK_TICKS)
}

fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let upper = v.get(mid).copied().unwrap_or(f64::NAN);
    if v.len().is_multiple_of(2) {
        (v.get(mid - 1).copied().unwrap_or(upper) + upper) / 2.0
    } else {
        upper
    }
}

struct Report {
    samples: BTreeMap<(u16, Contender), Vec<Sample>>,
    failures: BTreeMap<(u16, Contender), String>,
    mtus: Vec<u16>,
    reps: usize,
    secs: u32,
    elapsed: Duration,
}

/// The metrics, in table order: name, unit, higher is better, accessor.
type Metric = (&'static str, &'static str, bool, fn(&Sample) -> Option<f64>);
const METRICS: [Metric; 20] = [
    ("TCP guest → remote", "Gbit/s", true, |s| Some(s.up_gbps)),
    ("TCP remote → guest", "Gbit/s", true, |s| {
        Some(s.down_gbps)
    }),
    ("TCP guest → remote, 4 streams", "Gbit/s", true, |s| {
        Some(s.up4_gbps)
    }),
    ("TCP remote → guest, 4 streams", "Gbit/s", true, |s| {
        Some(s.down4_gbps)
    }),
    (
        "TCP remote → forwarded port → guest",
        "Gbit/s",
        true,
        |s| Some(s.inbound_gbps),
    ),
    (
        "TCP guest loopback → host loopback (splice)",
        "Gbit/s",
        true,
        |s| s.splice_gbps,
    ),
    ("UDP received, 1 Gbit/s offered", "Gbit/s", true, |s| {
        Some(s.udp_gbps)
    }),
    ("UDP loss, 1 Gbit/s offered", "%", false, |s| {
        Some(s.udp_loss_pct)
    }),
    ("TCP connections", "per s", true, |s| Some(s.crr_per_s)),
    ("RR p50", "µs", false, |s| Some(s.rr_p50_us)),
    ("RR p99", "µs", false, |s| Some(s.rr_p99_us)),
    (
        "TCP guest → remote via 100 Mbit/s uplink",
        "Gbit/s",
        true,
        |s| s.bottleneck_gbps[0],
    ),
    ("… 4 streams via 100 Mbit/s", "Gbit/s", true, |s| {
        s.bottleneck_gbps[1]
    }),
    (
        "TCP guest → remote via 1 Gbit/s uplink",
        "Gbit/s",
        true,
        |s| s.bottleneck_gbps[2],
    ),
    ("… 4 streams via 1 Gbit/s", "Gbit/s", true, |s| {
        s.bottleneck_gbps[3]
    }),
    (
        "TCP guest → remote via 5 Gbit/s uplink",
        "Gbit/s",
        true,
        |s| s.bottleneck_gbps[4],
    ),
    ("… 4 streams via 5 Gbit/s", "Gbit/s", true, |s| {
        s.bottleneck_gbps[5]
    }),
    (
        "guest retransmissions via the uplinks, worst",
        "% of segments",
        false,
        |s| s.bottleneck_retr_pct,
    ),
    ("CPU during the single-stream runs", "s", false, |s| s.cpu_s),
    ("peak RSS", "MiB", false, |s| {
        s.rss_kib.map(|k| k as f64 / 1024.0)
    }),
];

impl Report {
    fn value(&self, mtu: u16, c: Contender, metric: &Metric) -> Option<f64> {
        let v: Vec<f64> = self
            .samples
            .get(&(mtu, c))?
            .iter()
            .filter_map(metric.3)
            .collect();
        (!v.is_empty()).then(|| median(v))
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Medians of {} interleaved repetitions, iperf3 runs of {} s; generated by \
             `cargo xtask bench` in {:.0} s.\n",
            self.reps,
            self.secs,
            self.elapsed.as_secs_f64()
        );
        for &mtu in &self.mtus {
            let _ = writeln!(md, "### MTU {mtu}\n");
            let _ = writeln!(
                md,
                "| metric | forwarder | forwarder --ebpf | pasta | slirp4netns | kernel veth | forwarder / pasta | forwarder / kernel | --ebpf / userspace | --ebpf / kernel |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
            for m in &METRICS {
                let cell =
                    |c: Contender| match (self.value(mtu, c, m), self.failures.get(&(mtu, c))) {
                        (Some(v), _) => format!("{v:.2}"),
                        (None, Some(_)) => "cannot run".into(),
                        (None, None) => "–".into(),
                    };
                let ratio = |a: Contender, b: Contender| match (
                    self.value(mtu, a, m),
                    self.value(mtu, b, m),
                ) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    md,
                    "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    m.0,
                    m.1,
                    cell(Contender::Forwarder),
                    cell(Contender::ForwarderEbpf),
                    cell(Contender::Pasta),
                    cell(Contender::Slirp),
                    cell(Contender::Kernel),
                    ratio(Contender::Forwarder, Contender::Pasta),
                    ratio(Contender::Forwarder, Contender::Kernel),
                    ratio(Contender::ForwarderEbpf, Contender::Forwarder),
                    ratio(Contender::ForwarderEbpf, Contender::Kernel),
                );
            }
            md.push('\n');
        }
        for ((mtu, c), why) in &self.failures {
            let _ = writeln!(md, "- {} at MTU {mtu} could not run: {why}", c.name());
        }
        md
    }

    fn json(&self) -> Value {
        let mut runs = Vec::new();
        for ((mtu, c), list) in &self.samples {
            for s in list {
                runs.push(json!({
                    "mtu": mtu, "contender": c.name(),
                    "tcp_up_gbps": s.up_gbps, "tcp_down_gbps": s.down_gbps,
                    "tcp_up_4_streams_gbps": s.up4_gbps, "tcp_down_4_streams_gbps": s.down4_gbps,
                    "inbound_forward_gbps": s.inbound_gbps,
                    "splice_gbps": s.splice_gbps,
                    "udp_received_gbps": s.udp_gbps, "udp_loss_percent": s.udp_loss_pct,
                    "connections_per_s": s.crr_per_s,
                    "rr_p50_us": s.rr_p50_us, "rr_p99_us": s.rr_p99_us,
                    "cpu_s": s.cpu_s, "peak_rss_kib": s.rss_kib,
                }));
            }
        }
        let failures: Vec<Value> = self
            .failures
            .iter()
            .map(|((mtu, c), why)| json!({"mtu": mtu, "contender": c.name(), "reason": why}))
            .collect();
        json!({"repetitions": self.reps, "seconds": self.secs, "runs": runs, "failures": failures})
    }

    /// A grouped bar chart of the throughput medians.
    fn svg(&self) -> String {
        let groups: Vec<(String, u16, usize)> = self
            .mtus
            .iter()
            .flat_map(|&m| {
                [
                    (format!("up, MTU {m}"), m, 0),
                    (format!("down, MTU {m}"), m, 1),
                ]
            })
            .collect();
        let max = groups
            .iter()
            .flat_map(|(_, mtu, i)| {
                Contender::ALL
                    .iter()
                    .filter_map(|c| METRICS.get(*i).and_then(|m| self.value(*mtu, *c, m)))
                    .collect::<Vec<_>>()
            })
            .fold(1.0_f64, f64::max);
        let colors = ["#1f77b4", "#17becf", "#ff7f0e", "#2ca02c", "#7f7f7f"];
        let (w, h, bar) = (160 * groups.len() + 60, 320, 28);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <text x=\"10\" y=\"16\">TCP throughput, Gbit/s (median)</text>\n"
        );
        for (gi, (label, mtu, i)) in groups.iter().enumerate() {
            let x0 = 50 + gi * 160;
            for (ci, c) in Contender::ALL.iter().enumerate() {
                let v = METRICS
                    .get(*i)
                    .and_then(|m| self.value(*mtu, *c, m))
                    .unwrap_or(0.0);
                let bh = (v / max * 220.0).round();
                let x = x0 + ci * bar;
                let y = 270.0 - bh;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{bh}\" fill=\"{}\"/><text x=\"{x}\" y=\"{}\" font-size=\"9\">{v:.1}</text>",
                    bar - 4,
                    colors.get(ci).unwrap_or(&"#000"),
                    y - 3.0
                );
            }
            let _ = writeln!(s, "<text x=\"{x0}\" y=\"288\">{label}</text>");
        }
        for (ci, c) in Contender::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "<rect x=\"{}\" y=\"300\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"309\">{}</text>",
                50 + ci * 120,
                colors.get(ci).unwrap_or(&"#000"),
                64 + ci * 120,
                c.name()
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Offered UDP rate (iperf3 `-b`).
const UDP_RATE: &str = "1G";
/// `USER_HZ`: what `/proc/PID/stat` counts CPU time in on Linux.
const CLOCK_TICKS: f64 = 100.0;
