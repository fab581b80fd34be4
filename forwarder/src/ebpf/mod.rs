//! # Theory of operation
//!
//! `--ebpf`: forwarder's TC programs (`forwarder-ebpf`) loaded onto the tap when the host
//! allows it; everywhere else the same command keeps working in userspace and says why, in
//! one line, with the exit status unaffected.
//!
//! ## The fallback chain
//!
//! 1. **Object**: the build script embeds the programs when the eBPF toolchain was there
//!    (`cargo xtask ebpf-setup`); otherwise "built without eBPF support".
//! 2. **Privileges**: `CAP_BPF` (or `CAP_SYS_ADMIN`) and `CAP_NET_ADMIN`, effective, in the
//!    *initial* user namespace. The capability check is only a pre-filter: inside a user
//!    namespace a process has every capability and loading still fails with `EPERM`, so a
//!    process whose user namespace is not the initial one (its `uid_map` is not the identity
//!    of all ids) is refused here too, and the real answer is the load itself.
//! 3. **Kernel features**: TCX links need Linux 6.6; below it the program is attached with
//!    netlink TC (clsact), which stays attached if forwarder is killed (logged).
//! 4. **Load and attach**. The program is attached from a thread that has entered the
//!    namespace (interface names resolve in the caller's namespace); the link is an fd of
//!    this process, so with TCX nothing stays attached when it dies.
//!
//! Each feature degrades on its own: ARP answering needs IPv4 and the ARP service on, NDP
//! answering IPv6 and the NDP service; the log names what is active. What the program does
//! not answer, userspace still does.
//!
//! ## The fast path's set-up (part 2; `io::fastpath` runs it)
//!
//! It needs TCX (6.6): netlink filters on the host's uplinks would outlive a killed
//! forwarder and send replies of dead flows nowhere. In order: the veth pair is created
//! from here (`netconf::create_veth`: host end `fwdfp<pid>` stays, `fwdns<pid>` moves into
//! the namespace) with its reaper (`forwarder reap-link`, which deletes the host end when
//! a pipe only this process holds ends — however forwarder ends); inside the namespace the
//! veth end is hidden (no ARP, no IPv6), the programs are loaded with every index in the
//! configuration, `tap_egress` and `fp_ns_ingress` attached, and the `AF_PACKET`
//! re-injection socket bound to the tap; back here `fp_host_ingress` goes on the host end
//! and `uplink_ingress` on every Ethernet interface but forwarder's own veths
//! ([`Kernel::set_uplinks`], again at every rescan of the host's routes). The maps the data
//! plane needs are taken out of the object ([`FastMaps`]). Any failure switches the fast
//! path off (the configuration's bit cleared, the veth removed) with one `warn` line,
//! ARP/NDP staying.
//!
//! ## Metrics
//!
//! The programs' per-CPU counters are summed into `bpf_*` counters next to the engine's in
//! the API's `stats` (`forwarder ctl stats`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, PerCpuArray};
use aya::programs::tc::{SchedClassifier, SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, TestRun, TestRunOptions};
use forwarder_ebpf::{
    CONFIG_MAP, Config, Counter, EVENTS_MAP, FEAT_ARP, FEAT_FASTPATH, FEAT_NDP, FLOWS_MAP,
    FP_HOST_INGRESS, FP_NS_INGRESS, FlowKey, REVERSE_MAP, STATS_MAP, TAP_EGRESS, UPLINK_INGRESS,
};
use tracing::{debug, info, warn};

use crate::flow::{Key, Protocol};
use crate::plan::Network;
use crate::services::Switches;

/// The embedded object, if the build had the eBPF toolchain.
#[must_use]
pub fn object() -> Option<&'static [u8]> {
    #[cfg(forwarder_ebpf)]
    {
        Some(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/forwarder-ebpf"
        )))
    }
    #[cfg(not(forwarder_ebpf))]
    {
        None
    }
}

/// The message when the object is missing.
pub const NO_OBJECT: &str = "built without eBPF support (the eBPF toolchain was missing at build time; `cargo xtask ebpf-setup`, then rebuild)";

/// The loaded programs; dropping it detaches them (and removes the fast path's veth).
pub struct Kernel {
    bpf: aya::Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// What is active, for the log.
    pub features: Vec<&'static str>,
    /// The fast path's hidden veth (its host end), when the fast path is on.
    veth: Option<Veth>,
    /// Uplinks carrying `uplink_ingress`: index → (name, link).
    uplinks: HashMap<u32, (String, SchedClassifierLinkId)>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// What the data plane needs to run the fast path (see `io::fastpath`).
#[derive(Debug)]
pub struct FastMaps {
    /// `FLOWS`.
    pub flows: aya::maps::Map,
    /// `REVERSE`.
    pub reverse: aya::maps::Map,
    /// `EVENTS`.
    pub events: aya::maps::Map,
    /// `AF_PACKET` socket on the tap, in the namespace: re-injects a flow's first frame.
    pub inject: OwnedFd,
}

/// The hidden veth's host end. Deleted on drop; if forwarder dies without dropping it
/// (`kill -9`), its reaper — a child waiting for the end of a pipe only forwarder holds —
/// deletes it.
struct Veth {
    host: String,
    index: u32,
    reaper: Option<(std::process::Child, OwnedFd)>,
}

impl Drop for Veth {
    fn drop(&mut self) {
        if let Err(err) = crate::netconf::delete_link(&self.host) {
            warn!("removing the fast path's veth {}: {err:#}", self.host);
        }
        if let Some((mut child, pipe)) = self.reaper.take() {
            drop(pipe);
            let _ = child.wait();
        }
    }
}

/// Starts `forwarder reap-link NAME`: it deletes NAME when its standard input ends, i.e.
/// when forwarder is gone, however it went.
fn reaper(name: &str) -> Result<(std::process::Child, OwnedFd)> {
    use std::os::unix::process::CommandExt;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let child = std::process::Command::new("/proc/self/exe")
        .args(["reap-link", name])
        .stdin(std::process::Stdio::from(read))
        .stdout(std::process::Stdio::null())
        // Its own process group: a terminal's ^C is forwarder's to handle, not the reaper's.
        .process_group(0)
        .spawn()
        .context("start the veth reaper")?;
    Ok((child, write))
}

/// `forwarder reap-link NAME` (internal): waits for standard input to end, then deletes
/// the interface NAME of this namespace.
#[must_use]
pub fn reap_main(args: impl Iterator<Item = std::ffi::OsString>) -> std::process::ExitCode {
    use std::io::Read;
    let args: Vec<_> = args.collect();
    let Some(name) = args.get(1).and_then(|a| a.to_str()) else {
        return std::process::ExitCode::from(2);
    };
    let mut sink = [0u8; 64];
    while std::io::stdin().read(&mut sink).is_ok_and(|n| n > 0) {}
    match crate::netconf::delete_link(name) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("forwarder reap-link: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The configuration map's entry for `net` and `services` (the tap's index is filled in
/// where the tap is visible).
#[must_use]
pub fn config(net: &Network, services: &Switches) -> Config {
    let mut cfg = Config {
        gw_mac: net.our_mac.0,
        ..Config::default()
    };
    if let Some(v4) = &net.ipv4
        && services.arp
    {
        cfg.flags |= FEAT_ARP;
        cfg.guest4 = v4.guest.octets();
    }
    if let Some(v6) = &net.ipv6
        && services.ndp
    {
        cfg.flags |= FEAT_NDP;
        cfg.guest6 = v6.guest.octets();
    }
    cfg
}

/// Why `--ebpf` cannot work here, judged before trying (no object, no privileges); `None`
/// when it may (the load decides).
#[must_use]
pub fn precheck() -> Option<String> {
    if object().is_none() {
        return Some(NO_OBJECT.into());
    }
    privilege_problem()
}

/// Why this process cannot use eBPF, judged before trying (a pre-filter: the load decides).
fn privilege_problem() -> Option<String> {
    use caps::{CapSet, Capability, has_cap};
    let has = |c| has_cap(None, CapSet::Effective, c).unwrap_or(false);
    if !(has(Capability::CAP_BPF) || has(Capability::CAP_SYS_ADMIN))
        || !has(Capability::CAP_NET_ADMIN)
    {
        return Some(format!(
            "needs CAP_BPF and CAP_NET_ADMIN in the initial user namespace (uid {} has not)",
            nix::unistd::geteuid()
        ));
    }
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let identity = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    if !identity {
        return Some(
            "runs inside a user namespace: loading eBPF needs privileges in the initial one".into(),
        );
    }
    None
}

/// Loads the object, fills its configuration map and verifies `tap_egress`.
fn load(cfg: &Config) -> Result<aya::Ebpf> {
    let object = object().ok_or_else(|| anyhow!(NO_OBJECT))?;
    let mut bpf = aya::EbpfLoader::new().load(object).map_err(|e| {
        let text = format!("{e:#}");
        if text.contains("Operation not permitted") || text.contains("EPERM") {
            anyhow!("the kernel refused to load the programs (EPERM): not privileged in the initial user namespace")
        } else {
            anyhow!("loading the programs failed: {text}")
        }
    })?;
    write_config(&mut bpf, cfg)?;
    classifier(&mut bpf, TAP_EGRESS)?
        .load()
        .context("verify the tap egress program")?;
    Ok(bpf)
}

fn write_config(bpf: &mut aya::Ebpf, cfg: &Config) -> Result<()> {
    let mut map: Array<_, Config> = Array::try_from(
        bpf.map_mut(CONFIG_MAP)
            .ok_or_else(|| anyhow!("no {CONFIG_MAP} map in the object"))?,
    )?;
    map.set(0, *cfg, 0).context("write the configuration map")
}

fn classifier<'a>(bpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(bpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no {name} program in the object"))?
        .try_into()?)
}

/// Attaches program `name` to `iface` (in the calling thread's namespace), first in line.
fn attach(
    bpf: &mut aya::Ebpf,
    name: &str,
    iface: &str,
    kind: TcAttachType,
    tcx: bool,
) -> Result<SchedClassifierLinkId> {
    let program = classifier(bpf, name)?;
    if tcx {
        program
            .attach_with_options(iface, kind, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .with_context(|| format!("attach {name} to {iface} (TCX)"))
    } else {
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        program
            .attach(iface, kind)
            .with_context(|| format!("attach {name} to {iface} (netlink TC)"))
    }
}

/// The fast path's part inside the namespace: the veth end hidden and its program, the
/// re-injection socket.
fn fast_in_namespace(bpf: &mut aya::Ebpf, peer: &str, tap_index: u32) -> Result<(u32, OwnedFd)> {
    for name in [FP_NS_INGRESS, FP_HOST_INGRESS, UPLINK_INGRESS] {
        classifier(bpf, name)?
            .load()
            .with_context(|| format!("verify {name}"))?;
    }
    attach(bpf, FP_NS_INGRESS, peer, TcAttachType::Ingress, true)?;
    let inject = crate::sys::packet_socket(tap_index).context("open the re-injection socket")?;
    let index = nix::net::if_::if_nametoindex(peer)
        .with_context(|| format!("find {peer} in the namespace"))?;
    Ok((index, inject))
}

/// Loads the programs and attaches them to `tap` inside the namespace at `netns`, or says
/// why not (the caller stays in userspace and logs the reason). Also the flow fast path:
/// the hidden veth pair, its programs, and `uplink_ingress` on the host's Ethernet
/// interfaces; when that part fails, ARP and NDP stay in the kernel and the log says why
/// the fast path is off.
///
/// # Errors
///
/// The first link of the fallback chain that fails, as one sentence.
pub fn start(
    netns: &Path,
    tap: &str,
    net: &Network,
    services: &Switches,
) -> Result<(Kernel, Option<FastMaps>)> {
    if let Some(why) = precheck() {
        bail!(why);
    }
    let mut cfg = config(net, services);
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    let netns_fd = std::fs::File::open(netns)
        .with_context(|| format!("open the namespace {}", netns.display()))?;
    // The veth first, from here (forwarder's namespace); its peer moves into the namespace.
    let mut fast_off: Option<String> = None;
    let mut veth = None;
    let pid = std::process::id();
    let (host_end, peer) = (format!("fwdfp{pid}"), format!("fwdns{pid}"));
    if !tcx {
        fast_off = Some("needs TCX links (Linux 6.6): netlink filters on the uplinks would outlive a killed forwarder".into());
    } else {
        let made =
            crate::netconf::create_veth(&host_end, &peer, u32::from(net.mtu), netns_fd.as_raw_fd())
                .and_then(|index| {
                    Ok(Veth {
                        host: host_end.clone(),
                        index,
                        reaper: Some(reaper(&host_end)?),
                    })
                });
        match made {
            Ok(v) => veth = Some(v),
            Err(err) => {
                let _ = crate::netconf::delete_link(&host_end);
                fast_off = Some(format!("{err:#}"));
            }
        }
    }
    // A thread of our own enters the namespace: interface names and indexes resolve there,
    // and the rest of the process stays where it is. The configuration needs the indexes,
    // so the programs are loaded there too.
    type Attached = (aya::Ebpf, u32, Option<Result<OwnedFd>>);
    let attached: Result<Attached> = std::thread::scope(|s| {
        s.spawn(|| -> Result<Attached> {
            nix::sched::setns(&netns_fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("enter the namespace to attach")?;
            let ifindex = nix::net::if_::if_nametoindex(tap)
                .with_context(|| format!("find {tap} in the namespace"))?;
            cfg.tap_ifindex = ifindex;
            let peer_index = match &veth {
                Some(v) => match crate::netconf::hide_veth_end(&peer) {
                    Ok(i) => {
                        cfg.fp_ns_ifindex = i;
                        cfg.fp_host_ifindex = v.index;
                        cfg.flags |= FEAT_FASTPATH;
                        Some(Ok(i))
                    }
                    Err(err) => Some(Err(err)),
                },
                None => None,
            };
            let mut bpf = load(&cfg)?;
            attach(&mut bpf, TAP_EGRESS, tap, TcAttachType::Egress, tcx)
                .context("attach to the tap's egress")?;
            let inject = peer_index.map(|r| {
                r.and_then(|_| fast_in_namespace(&mut bpf, &peer, ifindex).map(|(_, fd)| fd))
            });
            Ok((bpf, ifindex, inject))
        })
        .join()
        .map_err(|_| anyhow!("the attaching thread panicked"))?
    });
    let (bpf, ifindex, inject) = attached?;
    let mut kernel = Kernel {
        bpf,
        logger: None,
        features: Vec::new(),
        veth: None,
        uplinks: HashMap::new(),
    };
    let mut maps = None;
    match inject {
        Some(Ok(inject)) => match kernel.start_host_side(veth.take(), inject) {
            Ok(m) => maps = Some(m),
            Err(err) => fast_off = Some(format!("{err:#}")),
        },
        Some(Err(err)) => fast_off = Some(format!("{err:#}")),
        None => {}
    }
    if maps.is_none() && cfg.flags & FEAT_FASTPATH != 0 {
        // Whatever was attached for it stays inert.
        cfg.flags &= !FEAT_FASTPATH;
        write_config(&mut kernel.bpf, &cfg)?;
        kernel.veth = None;
    }
    drop(veth);
    kernel.logger = match aya_log::EbpfLogger::init(&mut kernel.bpf) {
        Ok(l) => Some(l),
        Err(err) => {
            debug!(%err, "eBPF log unavailable");
            None
        }
    };
    if cfg.flags & FEAT_ARP != 0 {
        kernel.features.push("ARP");
    }
    if cfg.flags & FEAT_NDP != 0 {
        kernel.features.push("NDP");
    }
    if maps.is_some() {
        kernel.features.push("fast path");
    }
    if let Some(why) = fast_off {
        warn!("--ebpf: fast path off, flows stay in userspace: {why}");
    }
    info!(
        tap, ifindex,
        link = if tcx { "TCX" } else { "netlink TC (stays attached if forwarder is killed)" },
        active = ?kernel.features,
        uplinks = ?kernel.uplinks.values().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        "eBPF: programs attached"
    );
    Ok((kernel, maps))
}

impl Kernel {
    /// The fast path's host side: the veth's host end and the uplinks get their programs;
    /// the maps the data plane needs are taken out.
    fn start_host_side(&mut self, veth: Option<Veth>, inject: OwnedFd) -> Result<FastMaps> {
        let veth = veth.ok_or_else(|| anyhow!("no veth"))?;
        attach(
            &mut self.bpf,
            FP_HOST_INGRESS,
            &veth.host,
            TcAttachType::Ingress,
            true,
        )?;
        self.veth = Some(veth);
        let links = crate::netconf::ether_links().context("list the host's interfaces")?;
        self.set_uplinks(&links);
        if self.uplinks.is_empty() {
            bail!("no Ethernet interface to attach {UPLINK_INGRESS} to");
        }
        let mut take = |name: &str| {
            self.bpf
                .take_map(name)
                .ok_or_else(|| anyhow!("no {name} map in the object"))
        };
        Ok(FastMaps {
            flows: take(FLOWS_MAP)?,
            reverse: take(REVERSE_MAP)?,
            events: take(EVENTS_MAP)?,
            inject,
        })
    }

    /// Keeps `uplink_ingress` on exactly the host's Ethernet interfaces `links` (as
    /// `(index, name)`), except forwarder's own veths: attaches to new ones, forgets gone
    /// ones. Called at start and at every rescan of the host's routes.
    pub fn set_uplinks(&mut self, links: &[(u32, String)]) {
        let Some(own) = self.veth.as_ref().map(|v| v.index) else {
            return;
        };
        let wanted: Vec<&(u32, String)> = links
            .iter()
            .filter(|(i, n)| *i != own && !n.starts_with("fwdfp"))
            .collect();
        let gone: Vec<u32> = self
            .uplinks
            .keys()
            .filter(|i| !wanted.iter().any(|(w, _)| w == *i))
            .copied()
            .collect();
        for index in gone {
            if let Some((name, link)) = self.uplinks.remove(&index)
                && let Ok(p) = classifier(&mut self.bpf, UPLINK_INGRESS)
            {
                let _ = p.detach(link);
                info!(uplink = %name, "eBPF: uplink gone");
            }
        }
        for (index, name) in wanted {
            if self.uplinks.contains_key(index) {
                continue;
            }
            match attach(
                &mut self.bpf,
                UPLINK_INGRESS,
                name,
                TcAttachType::Ingress,
                true,
            ) {
                Ok(link) => {
                    debug!(uplink = %name, "eBPF: uplink_ingress attached");
                    self.uplinks.insert(*index, (name.clone(), link));
                }
                Err(err) => {
                    warn!("--ebpf: fast path replies on {name} stay with the host: {err:#}");
                }
            }
        }
    }

    /// Whether the fast path runs.
    #[must_use]
    pub fn fast(&self) -> bool {
        self.veth.is_some()
    }

    /// The programs' counters, summed over CPUs, as `(name, value)`.
    #[must_use]
    pub fn counters(&mut self) -> Vec<(String, u64)> {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
        let Some(map) = self.bpf.map(STATS_MAP) else {
            return Vec::new();
        };
        let Ok(stats) = PerCpuArray::<_, u64>::try_from(map) else {
            return Vec::new();
        };
        Counter::ALL
            .iter()
            .map(|c| {
                let n = stats
                    .get(&(*c as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.name().to_string(), n)
            })
            .collect()
    }
}

/// `forwarder ebpf-status IFACE`: prints the programs attached to IFACE (in the caller's
/// network namespace) with TCX, one `DIRECTION NAME ID` per line, or `none`. A diagnostic:
/// after forwarder ends, however it ended, nothing of its should be listed.
#[must_use]
pub fn status_main(args: impl Iterator<Item = std::ffi::OsString>) -> std::process::ExitCode {
    let args: Vec<_> = args.collect();
    let Some(iface) = args.get(1).and_then(|a| a.to_str()) else {
        eprintln!("usage: forwarder ebpf-status IFACE");
        return std::process::ExitCode::from(2);
    };
    let mut any = false;
    for (name, kind) in [
        ("ingress", TcAttachType::Ingress),
        ("egress", TcAttachType::Egress),
    ] {
        match SchedClassifier::query_tcx(iface, kind) {
            Ok((_, programs)) => {
                for p in programs {
                    any = true;
                    println!("{name} {} {}", p.name_as_str().unwrap_or("?"), p.id());
                }
            }
            Err(err) => {
                eprintln!("forwarder ebpf-status: {iface} {name}: {err}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    if !any {
        println!("none");
    }
    std::process::ExitCode::SUCCESS
}

/// Runs the tap egress program once on `frame` with `cfg` (`BPF_PROG_TEST_RUN`); returns
/// the program's verdict and the frame as it left the program. For tests; needs the same
/// privileges as `--ebpf`.
///
/// # Errors
///
/// No object, no privileges, or the kernel's error.
pub fn test_tap_egress(cfg: &Config, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    test_program(cfg, TAP_EGRESS, &[], &[], frame)
}

/// Runs program `name` once on `frame` (`BPF_PROG_TEST_RUN`) with `cfg` and these
/// forward and reverse fast-path entries; returns the verdict and the frame as it left.
/// For tests; needs the same privileges as `--ebpf`.
///
/// # Errors
///
/// No object, no privileges, or the kernel's error.
pub fn test_program(
    cfg: &Config,
    name: &str,
    flows: &[(FlowKey, forwarder_ebpf::FlowValue)],
    reverse: &[(FlowKey, forwarder_ebpf::ReverseValue)],
    frame: &[u8],
) -> Result<(u32, Vec<u8>)> {
    use aya::maps::HashMap as BpfHashMap;
    let mut bpf = load(cfg)?;
    if name != TAP_EGRESS {
        classifier(&mut bpf, name)?.load()?;
    }
    {
        let mut map: BpfHashMap<_, FlowKey, forwarder_ebpf::FlowValue> =
            BpfHashMap::try_from(bpf.map_mut(FLOWS_MAP).ok_or_else(|| anyhow!("no map"))?)?;
        for (k, v) in flows {
            map.insert(k, v, 0)?;
        }
    }
    {
        let mut map: BpfHashMap<_, FlowKey, forwarder_ebpf::ReverseValue> =
            BpfHashMap::try_from(bpf.map_mut(REVERSE_MAP).ok_or_else(|| anyhow!("no map"))?)?;
        for (k, v) in reverse {
            map.insert(k, v, 0)?;
        }
    }
    let program: &SchedClassifier = bpf
        .program(name)
        .ok_or_else(|| anyhow!("no {name} program"))?
        .try_into()?;
    let mut out = vec![0u8; frame.len().max(128) + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(usize::try_from(result.data_size_out).unwrap_or(0));
    Ok((result.return_value, out))
}

/// The map key of `addr`: IPv4 in the first 4 bytes.
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            if let Some(s) = b.get_mut(..4) {
                s.copy_from_slice(&a.octets());
            }
        }
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Icmp => 0,
    }
}

/// The forward key of an engine flow key: the flow table's projection into `FLOWS`.
#[must_use]
pub fn forward_key(key: &Key) -> FlowKey {
    FlowKey {
        saddr: addr_bytes(key.guest_addr),
        daddr: addr_bytes(key.remote_addr),
        sport: key.guest_port.to_be_bytes(),
        dport: key.remote_port.to_be_bytes(),
        proto: proto_number(key.protocol),
        family: if key.guest_addr.is_ipv4() { 4 } else { 6 },
        _pad: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    //! The programs run on crafted frames with `BPF_PROG_TEST_RUN`, and compared byte for
    //! byte with the userspace services' replies (the differential test). Root only: CI
    //! runs them (and requires them, `FORWARDER_REQUIRE_PRIVILEGED=1`); elsewhere they
    //! skip with a message.

    use std::time::Instant;

    use super::*;
    use crate::engine::fake::FakeHost;
    use crate::engine::{Engine, Settings};
    use crate::plan::testing::network;
    use crate::services::Switches;

    const ARP_REQUEST: &[u8] = include_bytes!("../wire/testdata/arp_request.bin");
    const NS: &[u8] = include_bytes!("../wire/testdata/ndp_ns.bin");
    /// `TCX_NEXT`: the programs pass what they leave alone to the next program.
    const PASS: u32 = u32::MAX;
    const TC_ACT_REDIRECT: u32 = 7;

    fn can_run() -> bool {
        let required = std::env::var_os("FORWARDER_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1");
        let why = if object().is_none() {
            Some(NO_OBJECT.to_string())
        } else {
            privilege_problem()
        };
        match why {
            None => true,
            Some(why) if required => panic!("eBPF program tests must run here: {why}"),
            Some(why) => {
                eprintln!("SKIP eBPF program tests: {why}");
                false
            }
        }
    }

    fn cfg() -> Config {
        let mut c = config(&network(), &Switches::default());
        c.tap_ifindex = 1;
        c
    }

    /// What userspace (the engine with the ARP/NDP services) answers to `frame`.
    fn userspace(frame: &[u8]) -> Option<Vec<u8>> {
        let t0 = Instant::now();
        let mut e = Engine::new(
            network(),
            Switches {
                ra: false,
                ..Switches::default()
            },
            Settings::default(),
            t0,
        );
        e.handle_frame(t0, frame, &mut FakeHost::new());
        e.poll_transmit()
    }

    fn run(frame: &[u8]) -> (u32, Vec<u8>) {
        test_tap_egress(&cfg(), frame).expect("test run")
    }

    #[test]
    fn arp_request_becomes_the_exact_reply() {
        if !can_run() {
            return;
        }
        let (verdict, out) = run(ARP_REQUEST);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mac = network().our_mac.0;
        let mut want = Vec::new();
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0x0a]); // to the requester
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[198, 51, 100, 1]); // the gateway
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0x0a, 198, 51, 100, 10]);
        assert_eq!(out, want);
    }

    #[test]
    fn neighbour_solicitation_becomes_the_exact_advert_with_a_valid_checksum() {
        if !can_run() {
            return;
        }
        let (verdict, out) = run(NS);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let mac = network().our_mac.0;
        let gw: [u8; 16] = "2001:db8:1::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let solicitor: [u8; 16] = "2001:db8:1::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let mut want = Vec::new();
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0x0a]);
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
        want.extend_from_slice(&gw);
        want.extend_from_slice(&solicitor);
        want.extend_from_slice(&[136, 0]);
        want.extend_from_slice(out.get(56..58).unwrap()); // the checksum, checked below
        want.extend_from_slice(&[0xe0, 0, 0, 0]);
        want.extend_from_slice(&gw);
        want.extend_from_slice(&[2, 1]);
        want.extend_from_slice(&mac);
        assert_eq!(out, want);
        // The packet layer (smoltcp) verifies the checksum while parsing.
        let frame = crate::wire::parse(&out).expect("the advert parses, checksum included");
        assert!(format!("{frame:?}").contains("NeighborAdvert"), "{frame:?}");
    }

    #[test]
    fn the_kernel_answers_byte_for_byte_like_userspace() {
        if !can_run() {
            return;
        }
        let mut frames = vec![ARP_REQUEST.to_vec(), NS.to_vec()];
        // Other targets: an off-link address, forwarder's router link-local address.
        let mut arp = ARP_REQUEST.to_vec();
        arp.splice(38..42, [198, 51, 100, 77]);
        frames.push(arp);
        let net = network();
        let v6 = net.ipv6.clone().unwrap();
        for target in [
            "2001:db8:1::99".parse::<std::net::Ipv6Addr>().unwrap(),
            v6.router_ll,
        ] {
            let mut ns = NS.to_vec();
            ns.splice(62..78, target.octets());
            fix_icmpv6_checksum(&mut ns);
            frames.push(ns);
        }
        for frame in frames {
            let (verdict, kernel) = run(&frame);
            let user = userspace(&frame).expect("userspace answers");
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(kernel, user, "kernel and userspace differ for {frame:02x?}");
        }
    }

    #[test]
    fn everything_else_passes_untouched() {
        if !can_run() {
            return;
        }
        let net = network();
        let v4 = net.ipv4.clone().unwrap();
        let v6 = net.ipv6.clone().unwrap();
        let mut others: Vec<Vec<u8>> = [
            &include_bytes!("../wire/testdata/arp_reply.bin")[..],
            include_bytes!("../wire/testdata/dhcp4_discover.bin"),
            include_bytes!("../wire/testdata/dhcp6_solicit.bin"),
            include_bytes!("../wire/testdata/icmp4_echo_request.bin"),
            include_bytes!("../wire/testdata/icmp6_echo_request.bin"),
            include_bytes!("../wire/testdata/mld_report_hbh.bin"),
            include_bytes!("../wire/testdata/ndp_na.bin"),
            include_bytes!("../wire/testdata/ndp_rs.bin"),
            include_bytes!("../wire/testdata/tcp_syn.bin"),
            include_bytes!("../wire/testdata/udp4.bin"),
        ]
        .iter()
        .map(|f| f.to_vec())
        .collect();
        // ARP for the guest's own address (a probe), and a gratuitous announcement.
        let mut own = ARP_REQUEST.to_vec();
        own.splice(38..42, v4.guest.octets());
        others.push(own);
        let mut announce = ARP_REQUEST.to_vec();
        announce.splice(38..42, [198, 51, 100, 10]);
        others.push(announce);
        // A padded ARP request (60 bytes): userspace's to answer.
        let mut padded = ARP_REQUEST.to_vec();
        padded.resize(60, 0);
        others.push(padded);
        // DAD probe (source ::), a solicitation for the guest itself, a bad checksum.
        let mut dad = NS.to_vec();
        dad.splice(22..38, [0u8; 16]);
        fix_icmpv6_checksum(&mut dad);
        others.push(dad);
        let mut own6 = NS.to_vec();
        own6.splice(62..78, v6.guest.octets());
        fix_icmpv6_checksum(&mut own6);
        others.push(own6);
        let mut bad = NS.to_vec();
        if let Some(b) = bad.get_mut(57) {
            *b ^= 0xff;
        }
        others.push(bad);
        // Truncated requests, every length the kernel will test-run: from the Ethernet header
        // for ARP, from the IPv6 header for the solicitation (BPF_PROG_TEST_RUN refuses an
        // IPv6 frame shorter than its IPv6 header with EINVAL).
        for len in 14..ARP_REQUEST.len() {
            others.push(ARP_REQUEST.get(..len).unwrap().to_vec());
        }
        for len in 54..NS.len() {
            others.push(NS.get(..len).unwrap().to_vec());
        }
        for frame in others {
            let (verdict, out) = test_tap_egress(&cfg(), &frame)
                .unwrap_or_else(|e| panic!("{} bytes: {e:#}", frame.len()));
            assert_eq!(verdict, PASS, "{frame:02x?}");
            assert_eq!(out, frame, "a passed frame was changed");
        }
    }

    // ---- The fast path's NAT (part 2) ----

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];

    fn fast_cfg() -> Config {
        let mut c = cfg();
        c.flags |= FEAT_FASTPATH;
        c.fp_ns_ifindex = 1;
        c.fp_host_ifindex = 1;
        c
    }

    /// A TCP (with payload) or UDP frame between two addresses of one family.
    fn packet(
        (src, dst): (IpAddr, IpAddr),
        (sport, dport): (u16, u16),
        tcp: bool,
        macs: ([u8; 6], [u8; 6]),
    ) -> Vec<u8> {
        use crate::wire::build::{self, Payload};
        use crate::wire::{EthernetAddress, TcpControl, TcpRepr, TcpSeqNumber};
        let data = b"fast path payload";
        let payload = if tcp {
            Payload::Tcp(TcpRepr {
                src_port: sport,
                dst_port: dport,
                control: TcpControl::Psh,
                seq_number: TcpSeqNumber(1000),
                ack_number: Some(TcpSeqNumber(2000)),
                window_len: 500,
                window_scale: None,
                max_seg_size: None,
                sack_permitted: false,
                sack_ranges: [None; 3],
                timestamp: None,
                payload: data,
            })
        } else {
            Payload::Udp {
                src_port: sport,
                dst_port: dport,
                data,
            }
        };
        let macs = (EthernetAddress(macs.0), EthernetAddress(macs.1));
        let mut out = Vec::new();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                build::ipv4(&mut out, macs, (s, d), 64, &payload).unwrap();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                build::ipv6(&mut out, macs, (s, d), 64, &payload).unwrap();
            }
            _ => unreachable!(),
        }
        out
    }

    /// Addresses and ports of a frame the packet layer accepts (checksums verified).
    fn endpoints(frame: &[u8]) -> (std::net::SocketAddr, std::net::SocketAddr) {
        use crate::wire::{L3, L4};
        let parsed = crate::wire::parse(frame).expect("valid frame, checksums included");
        let (src, dst, l4): (IpAddr, IpAddr, _) = match parsed.l3 {
            L3::Ipv4 { ip, l4 } => (ip.src_addr.into(), ip.dst_addr.into(), l4),
            L3::Ipv6 { ip, l4 } => (ip.src_addr.into(), ip.dst_addr.into(), l4),
            other => panic!("{other:?}"),
        };
        let (sp, dp) = match l4 {
            L4::Tcp(t) => (t.src_port, t.dst_port),
            L4::Udp { udp, .. } => (udp.src_port, udp.dst_port),
            other => panic!("{other:?}"),
        };
        ((src, sp).into(), (dst, dp).into())
    }

    fn key((src, dst): (IpAddr, IpAddr), (sport, dport): (u16, u16), tcp: bool) -> FlowKey {
        forward_key(&Key {
            protocol: if tcp { Protocol::Tcp } else { Protocol::Udp },
            guest_addr: src,
            guest_port: sport,
            remote_addr: dst,
            remote_port: dport,
        })
    }

    /// Guest, remote and the host address a flow leaves from: with an address change and
    /// without (the guest mirrors the host's address), both families.
    const CASES: [(&str, &str, &str); 4] = [
        ("198.51.100.2", "203.0.113.1", "203.0.113.77"),
        ("198.51.100.2", "203.0.113.1", "198.51.100.2"),
        ("2001:db8:1::2", "2001:db8:2::1", "2001:db8:9::77"),
        ("2001:db8:1::2", "2001:db8:2::1", "2001:db8:1::2"),
    ];

    type Addrs = (IpAddr, IpAddr, IpAddr);

    fn addresses(cases: &[(&str, &str, &str)]) -> Vec<Addrs> {
        cases
            .iter()
            .map(|(g, r, h)| (g.parse().unwrap(), r.parse().unwrap(), h.parse().unwrap()))
            .collect()
    }

    /// The reverse entry of a flow from `guest`:40000.
    fn to_guest(guest: IpAddr) -> forwarder_ebpf::ReverseValue {
        forwarder_ebpf::ReverseValue {
            guest_addr: bytes16(guest),
            guest_port: 40000u16.to_be_bytes(),
            guest_mac: GUEST_MAC,
            ..Default::default()
        }
    }

    fn bytes16(a: IpAddr) -> [u8; 16] {
        key((a, a), (0, 0), true).saddr
    }

    #[test]
    fn the_fast_path_translates_both_ways_with_valid_checksums() {
        if !can_run() {
            return;
        }
        let gw = network().our_mac.0;
        for (guest, remote, host) in addresses(&CASES) {
            for tcp in [true, false] {
                let what = format!("{guest} → {remote} via {host}, tcp {tcp}");
                // Out: the guest's packet leaves from the host address and reserved port.
                let out = packet((guest, remote), (40000, 5201), tcp, (GUEST_MAC, gw));
                let fwd = key((guest, remote), (40000, 5201), tcp);
                let value = forwarder_ebpf::FlowValue {
                    nat_addr: bytes16(host),
                    nat_port: 55555u16.to_be_bytes(),
                    ..Default::default()
                };
                let (verdict, sent) =
                    test_program(&fast_cfg(), TAP_EGRESS, &[(fwd, value)], &[], &out).unwrap();
                assert_eq!(verdict, TC_ACT_REDIRECT, "{what}");
                assert_eq!(
                    endpoints(&sent),
                    ((host, 55555).into(), (remote, 5201).into()),
                    "{what}"
                );
                assert_eq!(sent.len(), out.len());
                assert_eq!(
                    sent[sent.len() - 17..],
                    out[out.len() - 17..],
                    "payload kept"
                );
                // In: the reply to the host address and port reaches the guest, from the
                // gateway's MAC to the guest's.
                let reply = packet((remote, host), (5201, 55555), tcp, ([6; 6], [7; 6]));
                let rev = key((remote, host), (5201, 55555), tcp);
                let value = to_guest(guest);
                let (verdict, back) =
                    test_program(&fast_cfg(), UPLINK_INGRESS, &[], &[(rev, value)], &reply)
                        .unwrap();
                assert_eq!(verdict, TC_ACT_REDIRECT, "{what}");
                assert_eq!(
                    endpoints(&back),
                    ((remote, 5201).into(), (guest, 40000).into()),
                    "{what}"
                );
                assert_eq!(back[..12], [GUEST_MAC, gw].concat(), "{what}");
            }
        }
    }

    /// An ICMP destination-unreachable from `remote` to `host`, quoting a packet `host`:`port`
    /// → `remote`:5201 (UDP, or TCP's first 8 bytes).
    fn icmp_error(host: IpAddr, remote: IpAddr, port: u16, tcp: bool) -> Vec<u8> {
        use crate::wire::build::{self, Payload};
        use crate::wire::{EthernetAddress, IpProtocol};
        let mut quote = [0u8; 8];
        quote[..2].copy_from_slice(&port.to_be_bytes());
        quote[2..4].copy_from_slice(&5201u16.to_be_bytes());
        let next_header = if tcp {
            IpProtocol::Tcp
        } else {
            IpProtocol::Udp
        };
        let macs = (EthernetAddress([6; 6]), EthernetAddress([7; 6]));
        let mut out = Vec::new();
        match (host, remote) {
            (IpAddr::V4(h), IpAddr::V4(r)) => {
                let repr = crate::wire::Icmpv4Repr::DstUnreachable {
                    reason: smoltcp::wire::Icmpv4DstUnreachable::PortUnreachable,
                    header: crate::wire::Ipv4Repr {
                        src_addr: h,
                        dst_addr: r,
                        next_header,
                        payload_len: 8,
                        hop_limit: 64,
                    },
                    data: &quote,
                };
                build::ipv4(&mut out, macs, (r, h), 64, &Payload::Icmpv4(repr)).unwrap();
            }
            (IpAddr::V6(h), IpAddr::V6(r)) => {
                let repr = crate::wire::Icmpv6Repr::PktTooBig {
                    mtu: 1280,
                    header: smoltcp::wire::Ipv6Repr {
                        src_addr: h,
                        dst_addr: r,
                        next_header,
                        payload_len: 8,
                        hop_limit: 64,
                    },
                    data: &quote,
                };
                build::ipv6(
                    &mut out,
                    macs,
                    (r, h),
                    64,
                    &Payload::Icmpv6 { repr, options: &[] },
                )
                .unwrap();
            }
            _ => unreachable!(),
        }
        out
    }

    #[test]
    fn icmp_errors_about_fast_path_flows_reach_the_guest_translated() {
        if !can_run() {
            return;
        }
        let gw = network().our_mac.0;
        for (guest, remote, host) in addresses(&CASES[..3]) {
            for tcp in [true, false] {
                let what = format!("{guest} via {host}, tcp {tcp}");
                let frame = icmp_error(host, remote, 55555, tcp);
                let rev = key((remote, host), (5201, 55555), tcp);
                let value = to_guest(guest);
                let (verdict, back) =
                    test_program(&fast_cfg(), UPLINK_INGRESS, &[], &[(rev, value)], &frame)
                        .unwrap();
                assert_eq!(verdict, TC_ACT_REDIRECT, "{what}");
                assert_eq!(back[..12], [GUEST_MAC, gw].concat(), "{what}");
                // The packet layer verifies the outer, ICMP and quoted IPv4 checksums.
                let parsed = crate::wire::parse(&back).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                let text = format!("{parsed:?}");
                let g = guest.to_string();
                assert!(
                    text.matches(&g).count() >= 2,
                    "{what}: outer and quoted: {text}"
                );
                assert!(
                    !text.contains(&host.to_string()) || host == guest,
                    "{what}: {text}"
                );
                let quoted_port = if guest.is_ipv4() {
                    14 + 20 + 8 + 20
                } else {
                    14 + 40 + 8 + 40
                };
                assert_eq!(
                    back[quoted_port..quoted_port + 2],
                    40000u16.to_be_bytes(),
                    "{what}"
                );
                if guest.is_ipv4() {
                    // The quoted IPv4 header's own checksum still holds.
                    let q = back.get(42..62).unwrap();
                    assert_eq!(
                        crate::wire::checksum::sum(q),
                        0xffff,
                        "{what}: quoted header"
                    );
                    assert_eq!(q[12..16], bytes16(guest)[..4], "{what}");
                }
                // Another flow's error passes on.
                let other = key((remote, host), (5201, 55556), tcp);
                let (verdict, same) =
                    test_program(&fast_cfg(), UPLINK_INGRESS, &[], &[(other, value)], &frame)
                        .unwrap();
                assert_eq!((verdict, &same), (PASS, &frame), "{what}");
            }
        }
    }

    #[test]
    fn the_fast_path_passes_misses_untouched_and_keeps_a_zero_udp_checksum() {
        if !can_run() {
            return;
        }
        let gw = network().our_mac.0;
        let (guest, remote): (IpAddr, IpAddr) = (
            "198.51.100.2".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
        );
        let out = packet((guest, remote), (40000, 5201), true, (GUEST_MAC, gw));
        // An entry for another port: a miss, passed to userspace as it was.
        let other = key((guest, remote), (40001, 5201), true);
        let (verdict, sent) = test_program(
            &fast_cfg(),
            TAP_EGRESS,
            &[(other, forwarder_ebpf::FlowValue::default())],
            &[],
            &out,
        )
        .unwrap();
        assert_eq!((verdict, &sent), (PASS, &out));
        let (verdict, sent) = test_program(&fast_cfg(), UPLINK_INGRESS, &[], &[], &out).unwrap();
        assert_eq!((verdict, &sent), (PASS, &out));
        // Without the feature bit nothing is translated even on a hit.
        let fwd = key((guest, remote), (40000, 5201), true);
        let (verdict, _) = test_program(
            &cfg(),
            TAP_EGRESS,
            &[(fwd, forwarder_ebpf::FlowValue::default())],
            &[],
            &out,
        )
        .unwrap();
        assert_eq!(verdict, PASS);
        // A UDP datagram without checksum (IPv4 allows it) keeps none after the rewrite.
        let mut udp = packet((guest, remote), (40000, 5201), false, (GUEST_MAC, gw));
        udp[40..42].copy_from_slice(&[0, 0]);
        let fwd = key((guest, remote), (40000, 5201), false);
        let value = forwarder_ebpf::FlowValue {
            nat_addr: bytes16("203.0.113.77".parse().unwrap()),
            nat_port: 55555u16.to_be_bytes(),
            ..Default::default()
        };
        let (verdict, sent) =
            test_program(&fast_cfg(), TAP_EGRESS, &[(fwd, value)], &[], &udp).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(sent[40..42], [0, 0], "checksum 0 stays 0");
        assert_eq!(sent[34..36], 55555u16.to_be_bytes());
        assert_eq!(sent[26..30], [203, 0, 113, 77]);
    }

    /// Recomputes the ICMPv6 checksum of an 86-byte NS frame.
    fn fix_icmpv6_checksum(f: &mut [u8]) {
        use crate::wire::checksum;
        if let Some(c) = f.get_mut(56..58) {
            c.copy_from_slice(&[0, 0]);
        }
        // Pseudo-header: the addresses are in the summed range; length 32, next header 58.
        let c = !checksum::add(checksum::sum(f.get(22..86).unwrap()), 32 + 58);
        if let Some(b) = f.get_mut(56..58) {
            b.copy_from_slice(&c.to_be_bytes());
        }
    }
}
