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
//! ## Metrics
//!
//! The programs' per-CPU counters are summed into `bpf_*` counters next to the engine's in
//! the API's `stats` (`forwarder ctl stats`).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{Array, PerCpuArray};
use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
use aya::programs::{LinkOrder, TestRun, TestRunOptions};
use forwarder_ebpf::{CONFIG_MAP, Config, Counter, FEAT_ARP, FEAT_NDP, STATS_MAP, TAP_EGRESS};
use tracing::{debug, info};

use crate::config::{Network, Services};

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

/// The loaded programs; dropping it detaches them.
pub struct Kernel {
    bpf: aya::Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// What is active, for the log.
    pub features: Vec<&'static str>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// The configuration map's entry for `net` and `services` (the tap's index is filled in
/// where the tap is visible).
#[must_use]
pub fn config(net: &Network, services: &Services) -> Config {
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

/// Loads the object and fills its configuration map.
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
    let mut map: Array<_, Config> = Array::try_from(
        bpf.map_mut(CONFIG_MAP)
            .ok_or_else(|| anyhow!("no {CONFIG_MAP} map in the object"))?,
    )?;
    map.set(0, *cfg, 0).context("write the configuration map")?;
    let program: &mut SchedClassifier = bpf
        .program_mut(TAP_EGRESS)
        .ok_or_else(|| anyhow!("no {TAP_EGRESS} program in the object"))?
        .try_into()?;
    program.load().context("verify the tap egress program")?;
    Ok(bpf)
}

/// Loads the programs and attaches them to `tap` inside the namespace at `netns`, or says
/// why not (the caller stays in userspace and logs the reason).
///
/// # Errors
///
/// The first link of the fallback chain that fails, as one sentence.
pub fn start(netns: &Path, tap: &str, net: &Network, services: &Services) -> Result<Kernel> {
    if object().is_none() {
        bail!(NO_OBJECT);
    }
    if let Some(why) = privilege_problem() {
        bail!(why);
    }
    let mut cfg = config(net, services);
    if cfg.flags == 0 {
        bail!("nothing to do in the kernel: ARP and NDP are both off");
    }
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    let netns_fd = std::fs::File::open(netns)
        .with_context(|| format!("open the namespace {}", netns.display()))?;
    // A thread of our own enters the namespace: the interface name and index resolve there,
    // and the rest of the process stays where it is. The configuration needs the index, so
    // the programs are loaded there too.
    let attached: Result<(aya::Ebpf, u32)> = std::thread::scope(|s| {
        s.spawn(|| -> Result<(aya::Ebpf, u32)> {
            nix::sched::setns(&netns_fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("enter the namespace to attach")?;
            let ifindex = nix::net::if_::if_nametoindex(tap)
                .with_context(|| format!("find {tap} in the namespace"))?;
            cfg.tap_ifindex = ifindex;
            let mut bpf = load(&cfg)?;
            let program: &mut SchedClassifier = bpf
                .program_mut(TAP_EGRESS)
                .ok_or_else(|| anyhow!("no {TAP_EGRESS} program"))?
                .try_into()?;
            if tcx {
                program
                    .attach_with_options(
                        tap,
                        TcAttachType::Egress,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .context("attach to the tap's egress (TCX)")?;
            } else {
                let _ = aya::programs::tc::qdisc_add_clsact(tap);
                program
                    .attach(tap, TcAttachType::Egress)
                    .context("attach to the tap's egress (netlink TC)")?;
            }
            Ok((bpf, ifindex))
        })
        .join()
        .map_err(|_| anyhow!("the attaching thread panicked"))?
    });
    let (mut bpf, ifindex) = attached?;
    let logger = match aya_log::EbpfLogger::init(&mut bpf) {
        Ok(l) => Some(l),
        Err(err) => {
            debug!(%err, "eBPF log unavailable");
            None
        }
    };
    let mut features = Vec::new();
    if cfg.flags & FEAT_ARP != 0 {
        features.push("ARP");
    }
    if cfg.flags & FEAT_NDP != 0 {
        features.push("NDP");
    }
    info!(
        tap, ifindex,
        link = if tcx { "TCX" } else { "netlink TC (stays attached if forwarder is killed)" },
        active = ?features,
        "eBPF: answering in TC egress on the tap"
    );
    Ok(Kernel {
        bpf,
        logger,
        features,
    })
}

impl Kernel {
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
    let bpf = load(cfg)?;
    let program: &SchedClassifier = bpf
        .program(TAP_EGRESS)
        .ok_or_else(|| anyhow!("no {TAP_EGRESS} program"))?
        .try_into()?;
    let mut out = vec![0u8; frame.len().max(128) + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(usize::try_from(result.data_size_out).unwrap_or(0));
    Ok((result.return_value, out))
}

#[cfg(test)]
mod tests {
    //! The programs run on crafted frames with `BPF_PROG_TEST_RUN`, and compared byte for
    //! byte with the userspace services' replies (the differential test). Root only: CI
    //! runs them (and requires them, `FORWARDER_REQUIRE_PRIVILEGED=1`); elsewhere they
    //! skip with a message.

    use std::time::Instant;

    use super::*;
    use crate::config::Services;
    use crate::engine::fake::FakeHost;
    use crate::engine::{Engine, Settings};
    use crate::services::testing::network;

    const ARP_REQUEST: &[u8] = include_bytes!("../src/wire/testdata/arp_request.bin");
    const NS: &[u8] = include_bytes!("../src/wire/testdata/ndp_ns.bin");
    const TC_ACT_OK: u32 = 0;
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
        let mut c = config(&network(), &Services::default());
        c.tap_ifindex = 1;
        c
    }

    /// What userspace (the engine with the ARP/NDP services) answers to `frame`.
    fn userspace(frame: &[u8]) -> Option<Vec<u8>> {
        let t0 = Instant::now();
        let mut e = Engine::new(
            network(),
            Services {
                ra: false,
                ..Services::default()
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
            &include_bytes!("../src/wire/testdata/arp_reply.bin")[..],
            include_bytes!("../src/wire/testdata/dhcp4_discover.bin"),
            include_bytes!("../src/wire/testdata/dhcp6_solicit.bin"),
            include_bytes!("../src/wire/testdata/icmp4_echo_request.bin"),
            include_bytes!("../src/wire/testdata/icmp6_echo_request.bin"),
            include_bytes!("../src/wire/testdata/mld_report_hbh.bin"),
            include_bytes!("../src/wire/testdata/ndp_na.bin"),
            include_bytes!("../src/wire/testdata/ndp_rs.bin"),
            include_bytes!("../src/wire/testdata/tcp_syn.bin"),
            include_bytes!("../src/wire/testdata/udp4.bin"),
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
            assert_eq!(verdict, TC_ACT_OK, "{frame:02x?}");
            assert_eq!(out, frame, "a passed frame was changed");
        }
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
