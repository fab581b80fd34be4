//! The native face: pasta-compatible names (a superset), parsed by clap into [`Args`], then
//! validated into a [`Config`] in one place. Errors name the option and value.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;

use crate::config::{Config, Target};
use crate::flow::DEFAULT_MAX_FLOWS;
use crate::forward::{Kind, PortMap, Spec};
use crate::plan::{self, DEFAULT_MAC, DEFAULT_MTU, HostInfo, Overrides};
use crate::policy::{Policy, Rule};
use crate::services::Switches;
use crate::wire::EthernetAddress;

use super::{
    PortsArg, iss_secret, parse_addr, parse_mac, parse_max_flows, parse_netmask, parse_ports,
    parse_remote, parse_rule,
};

/// forwarder — give a network namespace full IPv4/IPv6 connectivity without privileges.
///
/// Without --netns, forwarder creates a new user and network namespace, runs CMD (default:
/// $SHELL) in it and exits with CMD's status. With --netns it serves an existing namespace
/// until interrupted. The namespace sees the host's address, gateway and DNS (override with
/// -a/-n/-g/-D) and can use DHCP, DHCPv6 and SLAAC against forwarder, or be configured
/// directly with --config-net.
#[derive(Debug, Parser)]
#[command(name = "forwarder", version, max_term_width = 100)]
#[expect(clippy::struct_excessive_bools, reason = "command-line switches")]
pub struct Args {
    /// Serve this existing network namespace: a path (/run/netns/NAME, /proc/PID/ns/net),
    /// an `ip netns` name, or a PID.
    #[arg(long, value_name = "PATH|NAME|PID")]
    pub netns: Option<String>,

    /// Join this user namespace before the network namespace (default for a PID: its own).
    #[arg(long, value_name = "PATH", requires = "netns")]
    pub userns: Option<PathBuf>,

    /// Name of the tap device in the namespace (created if missing).
    #[arg(short = 'I', long, value_name = "NAME", default_value = "tap0")]
    pub ns_ifname: String,

    /// Configure the namespace directly (lo and tap up, MTU, addresses, default routes).
    #[arg(long)]
    pub config_net: bool,

    /// Address for the namespace, ADDR or ADDR/LEN; once per family. Default: the host's.
    #[arg(short = 'a', long = "address", value_name = "ADDR[/LEN]", value_parser = parse_addr)]
    pub addresses: Vec<(IpAddr, Option<u8>)>,

    /// IPv4 netmask, dotted (255.255.255.0) or a prefix length (24).
    #[arg(short = 'n', long, value_name = "MASK", value_parser = parse_netmask)]
    pub netmask: Option<u8>,

    /// Gateway for the namespace; once per family. Default: the host's.
    #[arg(short = 'g', long = "gateway", value_name = "ADDR")]
    pub gateways: Vec<IpAddr>,

    /// MTU advertised to and set in the namespace (68-65520).
    #[arg(short = 'm', long, value_name = "MTU", default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u16).range(68..=65520))]
    pub mtu: u16,

    /// MAC address forwarder uses on the tap.
    #[arg(short = 'M', long, value_name = "MAC", value_parser = parse_mac)]
    pub mac_addr: Option<EthernetAddress>,

    /// DNS server to advertise (repeatable). Default: the host's non-loopback resolvers.
    #[arg(short = 'D', long = "dns", value_name = "ADDR")]
    pub dns: Vec<IpAddr>,

    /// IPv4 only.
    #[arg(short = '4', long = "ipv4-only", conflicts_with = "ipv6_only")]
    pub ipv4_only: bool,

    /// IPv6 only.
    #[arg(short = '6', long = "ipv6-only")]
    pub ipv6_only: bool,

    /// Do not answer ARP.
    #[arg(long)]
    pub no_arp: bool,
    /// Do not answer neighbour solicitations.
    #[arg(long)]
    pub no_ndp: bool,
    /// Do not send router advertisements.
    #[arg(long)]
    pub no_ra: bool,
    /// Do not run the DHCPv4 server.
    #[arg(long)]
    pub no_dhcp: bool,
    /// Do not run the DHCPv6 server.
    #[arg(long)]
    pub no_dhcpv6: bool,
    /// Do not answer or forward ICMP/ICMPv6 echo.
    #[arg(long)]
    pub no_icmp: bool,

    /// DHCP/DHCPv6 lease time in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 86400, value_parser = clap::value_parser!(u64).range(60..=u64::from(u32::MAX)))]
    pub lease_time: u64,

    /// Most flows tracked at once; new flows beyond it are refused.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FLOWS, value_parser = parse_max_flows)]
    pub max_flows: usize,

    /// Forward host TCP ports to the namespace (repeatable): none, PORT, A-B, HOST:NS,
    /// A-B:C-D, ~EXCLUDED, comma lists, optionally ADDR/ in front to listen on one host
    /// address; auto follows the ports bound in the namespace (every second; PORT and A-B
    /// next to it restrict it). Connections arrive in the namespace from the real client's
    /// address.
    #[arg(short = 't', long = "tcp-ports", value_name = "SPEC", value_parser = parse_ports)]
    pub tcp_ports: Vec<PortsArg>,

    /// Forward host UDP ports to the namespace (same syntax as --tcp-ports).
    #[arg(short = 'u', long = "udp-ports", value_name = "SPEC", value_parser = parse_ports)]
    pub udp_ports: Vec<PortsArg>,

    /// Forward TCP ports of the namespace's loopback to the host's loopback (repeatable; same
    /// syntax, LISTEN:TO maps a namespace port to a host port; auto follows the host's bound
    /// ports). Relayed with splice(2), no translation.
    #[arg(short = 'T', long = "tcp-ns", value_name = "SPEC", value_parser = parse_ports)]
    pub tcp_ns: Vec<PortsArg>,

    /// Forward UDP ports of the namespace's loopback to the host's loopback (same syntax as
    /// --tcp-ns). Relayed with recvmmsg/sendmmsg, no translation.
    #[arg(short = 'U', long = "udp-ns", value_name = "SPEC", value_parser = parse_ports)]
    pub udp_ns: Vec<PortsArg>,

    /// Serve the runtime control API on this UNIX socket (JSON, see docs/api.md; used by
    /// `forwarder ctl`): add, list and remove forwards, read the counters.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Once set up, run as this user (and group; default: the user's own), keeping only
    /// the right to listen on ports below 1024. A UID or login name, a GID or group name.
    /// Default: the user forwarder was started as.
    #[arg(long, value_name = "UID[:GID]|LOGIN[:GROUP]", overrides_with = "runas")]
    pub runas: Option<String>,

    /// Derive the namespace's addresses and gateways from this host interface (its default
    /// routes) instead of the interface of the best default route.
    #[arg(short = 'i', long = "interface", value_name = "NAME")]
    pub interface: Option<String>,

    /// The DNS search list (space-separated; `none`: no list), instead of resolv.conf's
    /// `search` line; sent only with --dhcp-search.
    #[arg(short = 'S', long = "search", value_name = "LIST")]
    pub search: Option<String>,

    /// Send the DNS search list (DHCP option 119, DHCPv6 option 24, the RA's DNSSL).
    /// Default: not sent, as pasta.
    #[arg(long, overrides_with = "no_dhcp_search")]
    pub dhcp_search: bool,

    /// Do not send the DNS search list (the default).
    #[arg(long, overrides_with = "dhcp_search")]
    pub no_dhcp_search: bool,

    /// The host name to give the namespace (DHCP option 12).
    #[arg(short = 'H', long = "hostname", value_name = "NAME")]
    pub hostname: Option<String>,

    /// The FQDN to give the namespace (DHCP option 81, DHCPv6 option 39).
    #[arg(long, value_name = "NAME")]
    pub fqdn: Option<String>,

    /// Let -t/-u listen on addresses the host does not have (yet): IP_FREEBIND /
    /// IPV6_FREEBIND on the forwarded ports' sockets.
    #[arg(long)]
    pub freebind: bool,

    /// The tap's MAC address in the namespace (default: the kernel's random one).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub ns_mac_addr: Option<EthernetAddress>,

    /// Capture the tap's frames (both ways) to FILE in pcap format (tcpdump -r FILE).
    #[arg(short = 'p', long = "pcap", value_name = "FILE")]
    pub pcap: Option<PathBuf>,

    /// Serve pasta's runtime forwarding protocol (pesto, version 2) on this UNIX socket:
    /// the -t/-u/-T/-U forwards become pasta's rules, which `pesto PATH` lists, adds,
    /// deletes and replaces while forwarder runs (see docs/faces.md).
    #[arg(short = 'c', long = "conf-path", value_name = "PATH")]
    pub conf_path: Option<PathBuf>,

    /// Load forwarder's eBPF programs (root in the initial user namespace): ARP and NDP
    /// answered in the kernel, and TCP/UDP flows to the world carried by the kernel from
    /// their first packet (a hidden veth, programs on the host's uplinks; the tap's MTU is
    /// capped to the uplink's). Where that is not possible forwarder says why in one line
    /// and works in userspace as without it.
    #[arg(long)]
    pub ebpf: bool,

    /// With --ebpf: seconds a closed fast-path TCP flow keeps its kernel entries and its
    /// reserved host port (the TIME_WAIT of its two ends) before they are released.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub ebpf_grace: u64,

    /// With --ebpf: at most N flows carried by the kernel at once (the maps hold 65536);
    /// more go through userspace. Every flow, kernel or not, also counts in --max-flows.
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub ebpf_max_flows: u32,

    /// Carry the namespace's flows to GUESTIP:PORT to HOSTIP:HOSTPORT on the host
    /// (repeatable): [tcp|udp://][GUESTIP:]PORT[:HOSTIP:HOSTPORT], IPv6 in brackets. GUESTIP
    /// defaults to the gateway (IPv6 gateway if the spec holds an IPv6 address), HOSTIP to the
    /// loopback, HOSTPORT to PORT. Not subject to --deny.
    #[arg(long, value_name = "SPEC", value_parser = parse_remote)]
    pub remote_forward: Vec<crate::forward::RemoteForward>,

    /// Allow flows to RULE even if the blocklist or --enable-* would refuse them
    /// (repeatable, comma lists): [tcp|udp://]ADDR[/LEN][:PORT[-PORT]], IPv6 in brackets.
    #[arg(long, value_name = "RULE", value_delimiter = ',', value_parser = parse_rule)]
    pub allow: Vec<Rule>,

    /// Refuse flows to RULE (same syntax as --allow; checked first). Refused TCP gets a
    /// RST, refused UDP an ICMP administratively-prohibited.
    #[arg(long, value_name = "RULE", value_delimiter = ',', value_parser = parse_rule)]
    pub deny: Vec<Rule>,

    /// Allow destinations beyond the host. Without --enable-routing and --enable-host both
    /// kinds are allowed; with either, only the kinds named are (slirpnetstack's semantics).
    #[arg(long)]
    pub enable_routing: bool,

    /// Allow the host's own addresses and directly connected networks (see --enable-routing).
    #[arg(long)]
    pub enable_host: bool,

    /// Connections to the gateway address reach the host's loopback (the default).
    #[arg(long, overrides_with = "no_map_gw")]
    pub map_gw: bool,

    /// Do not map the gateway address to the host's loopback.
    #[arg(long)]
    pub no_map_gw: bool,

    /// Connections to ADDR reach the host's own address that the namespace mirrors.
    #[arg(long, value_name = "ADDR")]
    pub map_guest_addr: Option<IpAddr>,

    /// Relay DNS (UDP and TCP port 53) sent to ADDR to the host's first resolver from its
    /// resolv.conf (a systemd-resolved stub on 127.0.0.53 works). ADDR is advertised as the
    /// DNS server unless --dns is given.
    #[arg(long, value_name = "ADDR")]
    pub dns_forward: Option<IpAddr>,

    /// Advertise no DNS server over DHCP, DHCPv6 and RA.
    #[arg(long, conflicts_with = "dns")]
    pub no_dns: bool,

    /// The host's resolv.conf (resolvers advertised and used by --dns-forward).
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// Bind outbound sockets to ADDR (once per address family).
    #[arg(short = 'o', long, value_name = "ADDR")]
    pub outbound: Vec<IpAddr>,

    /// Bind outbound sockets to the interface NAME (SO_BINDTODEVICE).
    #[arg(long, value_name = "NAME")]
    pub outbound_if: Option<String>,

    /// Seconds a UDP flow may be idle before its socket is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub udp_timeout: u64,

    /// Test hook: drop every Nth frame on the tap, each direction (deterministic loss).
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u32).range(2..))]
    pub drop_every: Option<u32>,

    /// Write forwarder's PID to FILE once the namespace is ready.
    #[arg(short = 'P', long = "pid", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Log at debug level.
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Log at trace level (per packet).
    #[arg(long)]
    pub trace: bool,
    /// Log warnings and errors only.
    #[arg(short = 'q', long, conflicts_with_all = ["debug", "trace"])]
    pub quiet: bool,
    /// Log to FILE instead of standard error.
    #[arg(short = 'l', long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Stay in the foreground. The pasta face otherwise forks into the background once
    /// the namespace is served (the foreground exits 0 then, or 1 with the reason); the
    /// native face and a spawned command always stay in the foreground.
    #[arg(short = 'f', long)]
    pub foreground: bool,

    /// Deprecated in pasta; accepted and ignored (messages go to standard error until
    /// forwarder is in the background, as without it).
    #[arg(short = 'e', long = "stderr")]
    pub stderr: bool,

    /// Keep running when the namespace served is gone (its bind mount or file removed,
    /// its process exited). Default: exit 0 within a quarter of a second.
    #[arg(long)]
    pub no_netns_quit: bool,

    /// Join only the network namespace of a PID, not its user namespace.
    #[arg(long, conflicts_with = "userns")]
    pub netns_only: bool,

    /// TCP clients of a -t port that connect from the host's loopback reach the
    /// namespace's loopback (the same loopback address, the forward's port) instead of the
    /// namespace's address.
    #[arg(long, conflicts_with = "no_splice")]
    pub host_lo_to_ns_lo: bool,

    /// Carry the namespace's frames over this inherited descriptor instead of a tap made
    /// here: a connected stream socket in passt's protocol (each frame after its length, 4
    /// bytes big-endian), or a tap (or datagram socket) the caller opened, one frame per
    /// read. forwarder exits when a socket closes (pasta's one-off). --config-net does not
    /// apply: the caller owns the interface.
    #[arg(short = 'F', long = "fd", value_name = "FD", value_parser = clap::value_parser!(i32).range(3..),
          conflicts_with_all = ["splice_only", "config_net", "ebpf"])]
    pub fd: Option<i32>,

    /// No tap in the namespace: only loopback traffic is forwarded, -t (TCP) from the
    /// host's loopback to the namespace's, -T/-U from the namespace's loopback to the
    /// host's. -u needs the tap (its default auto is dropped, explicit ports refused).
    #[arg(long, conflicts_with_all = ["no_splice", "ebpf"])]
    pub splice_only: bool,

    /// Do not splice: TCP clients of a -t port from the host's loopback go over the tap
    /// like any other, shown to the namespace from the gateway (or --map-host-loopback)
    /// address. By default they are spliced through a socket made in the namespace and
    /// arrive from the namespace's own address, as with pasta.
    #[arg(long)]
    pub no_splice: bool,

    /// Accepted for pasta (deprecated there): with --config-net forwarder sets up the
    /// default route only.
    #[arg(long)]
    pub no_copy_routes: bool,

    /// Accepted for pasta (deprecated there): with --config-net forwarder sets up one
    /// address per family.
    #[arg(long)]
    pub no_copy_addrs: bool,

    /// Bind IPv4 outbound sockets to the interface NAME.
    #[arg(long, value_name = "NAME")]
    pub outbound_if4: Option<String>,

    /// Bind IPv6 outbound sockets to the interface NAME.
    #[arg(long, value_name = "NAME")]
    pub outbound_if6: Option<String>,

    /// The host resolver --dns-forward relays to (forwarder relays to one: the first given
    /// is used). Default: the first nameserver of the host's resolv.conf.
    #[arg(long, value_name = "ADDR")]
    pub dns_host: Vec<IpAddr>,

    /// Connections to ADDR reach the host's loopback (instead of the gateway address);
    /// `none` maps nothing (like --no-map-gw). Once per family.
    #[arg(long, value_name = "ADDR|none")]
    pub map_host_loopback: Vec<String>,

    /// Advertise the DNS servers over DHCP, DHCPv6 and RA (the pasta face's default is
    /// not to: its namespaces use the host's resolv.conf).
    #[arg(long, overrides_with = "no_dhcp_dns")]
    pub dhcp_dns: bool,

    /// Do not advertise DNS servers over DHCP, DHCPv6 and RA.
    #[arg(long)]
    pub no_dhcp_dns: bool,

    /// Drop the namespace's TCP silently (counted as ignored) and refuse -t/-T forwards.
    #[arg(long)]
    pub no_tcp: bool,

    /// Drop the namespace's UDP silently (DHCP and DHCPv6, forwarder's own services, still
    /// answered) and refuse -u/-U forwards.
    #[arg(long)]
    pub no_udp: bool,

    /// With the pasta face and --foreground: log the counters every DELAY seconds.
    #[arg(long, value_name = "DELAY", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub stats: Option<u64>,

    /// Log file size limit in bytes (with -l, which truncates the file at start): when
    /// full, the oldest half of the entries is dropped.
    #[arg(long, value_name = "SIZE", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    pub log_size: u64,

    /// Options of passt and of later issues that forwarder does not serve yet; refused
    /// with the reason, never ignored.
    #[command(flatten)]
    pub unsupported: Unsupported,

    /// A PID to serve (its network namespace, and its user namespace unless
    /// --netns-only), or a command to run in a new namespace (default: $SHELL); put `--`
    /// before a command that starts with `-`.
    #[arg(value_name = "PID|CMD", trailing_var_arg = true)]
    pub command: Vec<OsString>,

    /// Which face parsed this command line (set by the face, not an option).
    #[arg(skip)]
    pub face: super::Face,
}

/// `--runas UID[:GID]|LOGIN[:GROUP]` as numeric ids; `None` when it names the user and
/// group the process already runs as (pasta run as root is told `--runas 0:0` to stay
/// root): a change of nothing.
fn runas_ids(spec: &str) -> Result<Option<(u32, u32)>> {
    use nix::unistd::{Gid, Group, Uid, User};
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let account = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
        Err(_) => Some(
            User::from_name(user)
                .ok()
                .flatten()
                .ok_or_else(|| anyhow::anyhow!("--runas {spec}: no user {user:?}"))?,
        ),
    };
    let uid = user
        .parse::<u32>()
        .ok()
        .or(account.as_ref().map(|a| a.uid.as_raw()))
        .ok_or_else(|| anyhow::anyhow!("--runas {spec}: no user {user:?}"))?;
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
                .ok_or_else(|| anyhow::anyhow!("--runas {spec}: no group {g:?}"))?,
        },
        // A UID with no account: its group of the same number, as pasta does.
        None => account.map_or(uid, |a| a.gid.as_raw()),
    };
    let same = uid == nix::unistd::geteuid().as_raw() && gid == Gid::effective().as_raw();
    Ok((!same).then_some((uid, gid)))
}

/// pasta/passt options forwarder parses so that it can refuse them by name.
#[derive(Debug, Default, clap::Args)]
pub struct Unsupported {
    /// Not served: a UNIX socket for a VM (passt, vhost-user).
    #[arg(
        short = 's',
        long = "socket",
        visible_alias = "socket-path",
        value_name = "PATH",
        hide = true
    )]
    pub socket: Option<PathBuf>,
    /// Not served: passt's one-off mode.
    #[arg(short = '1', long = "one-off", hide = true)]
    pub one_off: bool,
    /// Not served: vhost-user's capabilities.
    #[arg(long, hide = true)]
    pub print_capabilities: bool,
}

impl Unsupported {
    /// The first option given that forwarder cannot honour, with the reason.
    fn refusal(&self, face: super::Face) -> Option<String> {
        let vm = |o: &str| {
            if face == super::Face::Pasta {
                format!("{o} is for passt / vhost-user mode only")
            } else {
                format!("{o}: VM mode (passt's sockets) is not supported yet")
            }
        };
        [
            self.socket.is_some().then(|| vm("-s")),
            self.one_off.then(|| vm("--one-off")),
            self.print_capabilities.then(|| vm("--print-capabilities")),
        ]
        .into_iter()
        .flatten()
        .next()
    }
}

impl Args {
    /// Builds the configuration, resolving the address plan against `host`.
    ///
    /// # Errors
    ///
    /// An error naming the option and value that cannot work.
    pub fn into_config(self, host: &HostInfo) -> Result<Config> {
        if let Some(why) = self.unsupported.refusal(self.face) {
            bail!("{why}");
        }
        let pid = self.pid_operand();
        let netns = self.netns.clone().or(pid.map(str::to_owned));
        let command_given = !self.command.is_empty() && pid.is_none();
        let target = match (&netns, command_given) {
            (Some(_), true) => {
                bail!("--netns and a command cannot be combined: a command gets a new namespace")
            }
            (Some(netns), false) => {
                let mut t = crate::ns::attach_target(netns, self.userns.clone())?;
                if self.netns_only
                    && let Target::Attach { userns, .. } = &mut t
                {
                    *userns = None;
                }
                t
            }
            (None, true) => Target::Spawn {
                command: self.command.clone(),
            },
            (None, false) => {
                let shell = std::env::var_os("SHELL")
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "/bin/sh".into());
                Target::Spawn {
                    command: vec![shell],
                }
            }
        };
        let per_family = |v: IpAddr| (v.is_ipv4(), v.is_ipv6());
        for (list, option) in [
            (
                self.addresses.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
                "--address",
            ),
            (self.gateways.clone(), "--gateway"),
        ] {
            let v4 = list.iter().filter(|a| per_family(**a).0).count();
            let v6 = list.iter().filter(|a| per_family(**a).1).count();
            if v4 > 1 || v6 > 1 {
                bail!("{option} given more than once for one address family");
            }
        }
        let overrides = Overrides {
            addresses: self.addresses.clone(),
            netmask: self.netmask,
            gateways: self.gateways.clone(),
            dns: self.dns.clone(),
            mtu: self.mtu,
            mac: self.mac_addr.unwrap_or(DEFAULT_MAC),
            families: (!self.ipv6_only, !self.ipv4_only),
            lease: Duration::from_secs(self.lease_time),
        };
        let mut host = host.clone();
        if self.resolv_conf.as_os_str() != "/etc/resolv.conf" {
            let text = std::fs::read_to_string(&self.resolv_conf).map_err(|e| {
                anyhow::anyhow!("--resolv-conf {}: {e}", self.resolv_conf.display())
            })?;
            host.resolvers = crate::netconf::read_resolvers(&text);
        }
        let mut network = plan::resolve(&host, &overrides)?;
        network.names = self.names()?;
        let translation = self.translation(&host, &mut network)?;
        let io = self.io_options()?;
        let mut auto = Vec::new();
        let mut all = Vec::new();
        let mut fixed = Vec::new();
        // With -c, the forwards are pasta's rules (built from the same values) instead.
        let rules = self
            .conf_path
            .as_ref()
            .map(|path| self.rule_tables(path, &network))
            .transpose()?;
        let kinds = if rules.is_some() {
            Vec::new()
        } else {
            vec![
                (Kind::Tcp, &self.tcp_ports),
                (Kind::Udp, &self.udp_ports),
                (Kind::TcpNs, &self.tcp_ns),
                (Kind::UdpNs, &self.udp_ns),
            ]
        };
        for (kind, specs) in kinds {
            let mut lists = Vec::new();
            // pasta's default for each of -t/-u/-T/-U is auto; the native face's is none.
            let pasta_default = [PortsArg {
                text: "auto".into(),
                spec: Spec::Auto(crate::forward::Auto::default()),
            }];
            let defaulted = specs.is_empty() && self.face == super::Face::Pasta;
            let specs = if defaulted {
                &pasta_default[..]
            } else {
                &specs[..]
            };
            let disabled = (kind.is_udp() && self.no_udp) || (!kind.is_udp() && self.no_tcp);
            if kind == Kind::Udp && self.splice_only {
                if specs.iter().any(|s| s.spec != Spec::Ports(Vec::new())) && !defaulted {
                    bail!("--udp-ports: needs the tap, which --splice-only leaves out");
                }
                fixed.push(Vec::new());
                continue;
            }
            if disabled && defaulted {
                // A protocol turned off has no default forwards.
                fixed.push(Vec::new());
                continue;
            }
            if disabled && specs.iter().any(|s| s.spec != Spec::Ports(Vec::new())) {
                bail!(
                    "{}: forwards of a protocol turned off by --no-tcp/--no-udp",
                    kind.option()
                );
            }
            for spec in specs {
                match &spec.spec {
                    Spec::Ports(maps)
                        if kind.in_namespace()
                            && maps
                                .iter()
                                .any(|m| m.iface.is_some() || m.to_addr.is_some()) =>
                    {
                        bail!(
                            "{} {}: the namespace side listens on its loopback and forwards to the host's (no %IF, no target address)",
                            kind.option(),
                            spec.text
                        );
                    }
                    Spec::Ports(maps) => lists.push(maps.clone()),
                    Spec::Auto(a) => {
                        if auto.iter().any(|(k, _)| *k == kind) {
                            bail!("{}: auto given twice", kind.option());
                        }
                        auto.push((kind, a.clone()));
                    }
                    Spec::All(a) => {
                        if kind.in_namespace() {
                            bail!("{}: all is for --tcp-ports and --udp-ports", kind.option());
                        }
                        if all.contains(&kind) {
                            bail!("{}: all given twice", kind.option());
                        }
                        all.push(kind);
                        let below = crate::netconf::ephemeral_start();
                        lists.push(
                            (1..below)
                                .filter(|p| a.wants(*p))
                                .map(|p| PortMap::new(a.bind, p, p))
                                .collect(),
                        );
                    }
                }
            }
            let maps = crate::forward::join(&lists, all.contains(&kind))
                .map_err(|e| anyhow::anyhow!("{}: {e}", kind.option()))?;
            fixed.push(maps);
        }
        let mut fixed = fixed.into_iter();
        let (tcp_forwards, udp_forwards, ns_tcp_forwards, ns_udp_forwards) = (
            fixed.next().unwrap_or_default(),
            fixed.next().unwrap_or_default(),
            fixed.next().unwrap_or_default(),
            fixed.next().unwrap_or_default(),
        );
        let sockets: usize = ns_tcp_forwards
            .iter()
            .chain(&ns_udp_forwards)
            .map(|m| if m.bind.is_some() { 1 } else { 2 })
            .sum();
        if sockets >= crate::ns::MAX_PASSED_FDS {
            bail!(
                "--tcp-ns/--udp-ns: {} ports need {sockets} sockets in the namespace, at most {} fit at start (add more with the API)",
                ns_tcp_forwards.len() + ns_udp_forwards.len(),
                crate::ns::MAX_PASSED_FDS - 1
            );
        }
        if let Some(path) = &self.api_socket
            && path.as_os_str().len() >= 108
        {
            bail!(
                "--api-socket {}: a UNIX socket path must be shorter than 108 bytes",
                path.display()
            );
        }
        let spawned = matches!(target, Target::Spawn { .. });
        let background = self.runs_in_background();
        if self.stats.is_some() && background {
            bail!("--stats: can't display statistics if not running in foreground (-f)");
        }
        let runas = self.runas.as_deref().map(runas_ids).transpose()?.flatten();
        let process = crate::config::Process {
            runas,
            background,
            netns_quit: !self.no_netns_quit && !spawned,
            stats_every: self.stats.map(Duration::from_secs),
        };
        let services = Switches {
            arp: !self.no_arp,
            ndp: !self.no_ndp,
            ra: !self.no_ra,
            dhcp: !self.no_dhcp,
            dhcpv6: !self.no_dhcpv6,
            icmp: !self.no_icmp,
            echo_local_only: false,
            tcp: !self.no_tcp,
            udp: !self.no_udp,
        };
        Ok(Config {
            target,
            ifname: self.ns_ifname,
            config_net: self.config_net,
            network,
            services,
            pid_file: self.pid_file,
            translation,
            io,
            tcp_forwards,
            udp_forwards,
            ns_tcp_forwards,
            ns_udp_forwards,
            auto,
            all,
            api_socket: self.api_socket,
            ebpf: self.ebpf,
            ebpf_grace: Duration::from_secs(self.ebpf_grace),
            ebpf_max_flows: self.ebpf_max_flows as usize,
            process,
            rules,
            ns_mac: self.ns_mac_addr,
            tap_fd: self.fd,
        })
    }

    /// The names handed out: `-H`, `--fqdn`, and with `--dhcp-search` the search list of
    /// `-S` or resolv.conf.
    fn names(&self) -> Result<plan::Names> {
        let check = |option: &str, name: &str| {
            if plan::dns_name_ok(name) {
                Ok(name.to_string())
            } else {
                Err(anyhow::anyhow!(
                    "{option} {name:?}: not a DNS name (labels of 1-63 letters, digits or -, at most 253 bytes)"
                ))
            }
        };
        let mut names = plan::Names {
            hostname: self
                .hostname
                .as_deref()
                .map(|h| check("--hostname", h))
                .transpose()?,
            fqdn: self
                .fqdn
                .as_deref()
                .map(|f| check("--fqdn", f))
                .transpose()?,
            search: Vec::new(),
        };
        let list: Vec<String> = match self.search.as_deref() {
            Some("none") => Vec::new(),
            Some(list) => list.split_whitespace().map(str::to_string).collect(),
            None => std::fs::read_to_string(&self.resolv_conf)
                .map(|t| crate::netconf::read_search(&t))
                .unwrap_or_default(),
        };
        if self.search.is_some() {
            // Given by name: each must be one.
            for name in &list {
                check("--search", name)?;
            }
        }
        if self.dhcp_search {
            names.search = list.into_iter().filter(|n| plan::dns_name_ok(n)).collect();
        }
        Ok(names)
    }

    /// pasta's rule tables for `-c PATH`: each -t/-u/-T/-U value (or pasta's `auto`
    /// default) as pasta's parser builds it, checked as pasta checks a table.
    fn rule_tables(
        &self,
        path: &std::path::Path,
        network: &plan::Network,
    ) -> Result<crate::config::Rules> {
        use crate::forward::rule::{self, Caps, Pif, Side, Table};
        if path.as_os_str().len() >= 108 {
            bail!(
                "--conf-path {}: a UNIX socket path must be shorter than 108 bytes",
                path.display()
            );
        }
        let mut caps = Caps::SCAN;
        for (on, bit) in [
            (network.ipv4.is_some(), Caps::IPV4),
            (network.ipv6.is_some(), Caps::IPV6),
            (!self.no_tcp, Caps::TCP),
            (!self.no_udp, Caps::UDP),
            (crate::io::can_bind_to_device(), Caps::IFNAME),
        ] {
            if on {
                caps |= bit;
            }
        }
        let caps = Caps(caps);
        let ephemeral = crate::netconf::ephemeral_range();
        let mut tables = [
            (Pif::Host, Table::default()),
            (Pif::Splice, Table::default()),
        ];
        for (kind, specs) in [
            (Kind::Tcp, &self.tcp_ports),
            (Kind::Udp, &self.udp_ports),
            (Kind::TcpNs, &self.tcp_ns),
            (Kind::UdpNs, &self.udp_ns),
        ] {
            let disabled = (kind.is_udp() && self.no_udp) || (!kind.is_udp() && self.no_tcp);
            if kind == Kind::Udp && self.splice_only {
                if specs.iter().any(|s| s.text != "none") {
                    bail!("--udp-ports: needs the tap, which --splice-only leaves out");
                }
                continue;
            }
            let texts: Vec<&str> = if specs.is_empty() {
                if self.face == super::Face::Pasta && !disabled {
                    vec!["auto"]
                } else {
                    Vec::new()
                }
            } else {
                specs.iter().map(|s| s.text.as_str()).collect()
            };
            if disabled && texts.iter().any(|t| *t != "none") {
                bail!(
                    "{}: forwards of a protocol turned off by --no-tcp/--no-udp",
                    kind.option()
                );
            }
            let side = Side {
                splice: kind.in_namespace(),
                udp: kind.is_udp(),
            };
            let Some((_, table)) = tables.iter_mut().find(|(p, _)| *p == Pif::of(kind)) else {
                continue;
            };
            for text in texts {
                for r in rule::parse(text, side, caps, ephemeral)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", kind.option()))?
                {
                    table
                        .add(r, caps)
                        .map_err(|e| anyhow::anyhow!("{} {text}: {e}", kind.option()))?;
                }
            }
        }
        Ok(crate::config::Rules {
            path: path.to_owned(),
            caps,
            tables: tables
                .into_iter()
                .map(|(p, t)| (p, t.rules().to_vec()))
                .collect(),
        })
    }

    /// The host interfaces the address plan comes from: `-i`, else `--outbound-if4/6`.
    #[must_use]
    pub fn template(&self) -> crate::netconf::Template<'_> {
        let i = self.interface.as_deref();
        crate::netconf::Template {
            v4: i.or(self.outbound_if4.as_deref()),
            v6: i.or(self.outbound_if6.as_deref()),
        }
    }

    /// Whether this process forks into the background once ready: the pasta face serving
    /// an existing namespace (`--netns` or a PID), without `-f`. Decided from the arguments
    /// alone so that the fork can happen first, while the process has one thread.
    #[must_use]
    pub fn runs_in_background(&self) -> bool {
        let attach = self.netns.is_some() || self.pid_operand().is_some();
        self.face == super::Face::Pasta && !self.foreground && attach
    }

    /// pasta's `PID` operand: the only operand, all digits, and no `--netns`.
    fn pid_operand(&self) -> Option<&str> {
        match self.command.as_slice() {
            [one] if self.netns.is_none() => one
                .to_str()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())),
            _ => None,
        }
    }

    /// The policy and mappings; adjusts the advertised DNS for --dns-forward / --no-dns.
    fn translation(
        &self,
        host: &HostInfo,
        network: &mut plan::Network,
    ) -> Result<crate::engine::Settings> {
        let mut policy = Policy {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            map_gw: !self.no_map_gw,
            ..Policy::default()
        };
        // --map-host-loopback ADDR takes the gateway's place for its family; `none` maps
        // nothing.
        let mut loopback_at: Vec<IpAddr> = Vec::new();
        for value in &self.map_host_loopback {
            if value == "none" {
                policy.map_gw = false;
                loopback_at.clear();
                continue;
            }
            let addr: IpAddr = value.parse().map_err(|_| {
                anyhow::anyhow!("--map-host-loopback {value:?}: not an IP address or none")
            })?;
            loopback_at.retain(|a| a.is_ipv4() != addr.is_ipv4());
            loopback_at.push(addr);
        }
        for addr in &loopback_at {
            let lo = if addr.is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            };
            policy.maps.push((*addr, lo));
        }
        if self.enable_routing || self.enable_host {
            policy.routing = self.enable_routing;
            policy.host = self.enable_host;
        }
        if policy.map_gw {
            if let Some(v4) = network
                .ipv4
                .as_ref()
                .filter(|_| !loopback_at.iter().any(IpAddr::is_ipv4))
            {
                policy.maps.push((
                    IpAddr::V4(v4.gateway),
                    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                ));
            }
            if let Some(v6) = network
                .ipv6
                .as_ref()
                .filter(|_| !loopback_at.iter().any(IpAddr::is_ipv6))
            {
                let lo = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
                policy.maps.push((IpAddr::V6(v6.gateway), lo));
                policy.maps.push((IpAddr::V6(v6.router_ll), lo));
            }
        }
        for r in &self.remote_forward {
            let guest = match (r.guest, r.family_v6) {
                (Some(a), _) => a,
                (None, false) => match &network.ipv4 {
                    Some(p) => IpAddr::V4(p.gateway),
                    None => bail!("--remote-forward: IPv4 is off, name the guest-side address"),
                },
                (None, true) => match &network.ipv6 {
                    Some(p) => IpAddr::V6(p.gateway),
                    None => bail!("--remote-forward: IPv6 is off, name the guest-side address"),
                },
            };
            if policy
                .remote
                .iter()
                .any(|(p, a, n, _)| *p == r.protocol && *a == guest && *n == r.port)
            {
                bail!(
                    "--remote-forward: {guest} port {} is forwarded twice",
                    r.port
                );
            }
            policy.remote.push((r.protocol, guest, r.port, r.host));
        }
        if let Some(addr) = self.map_guest_addr {
            let to = match addr {
                IpAddr::V4(_) => network.ipv4.as_ref().map(|p| IpAddr::V4(p.guest)),
                IpAddr::V6(_) => network.ipv6.as_ref().map(|p| IpAddr::V6(p.guest)),
            };
            let Some(to) = to else {
                bail!("--map-guest-addr {addr}: that address family is off");
            };
            policy.maps.insert(0, (addr, to));
        }
        if let Some(addr) = self.dns_forward {
            let Some(resolver) = self.dns_host.first().or(host.resolvers.first()).copied() else {
                bail!(
                    "--dns-forward {addr}: no nameserver in {}",
                    self.resolv_conf.display()
                );
            };
            policy.dns_forward = Some(addr);
            policy.resolver = Some(resolver);
            if self.dns.is_empty() {
                match addr {
                    IpAddr::V4(a) => {
                        if let Some(p) = &mut network.ipv4 {
                            p.dns = vec![a];
                        }
                    }
                    IpAddr::V6(a) => {
                        if let Some(p) = &mut network.ipv6 {
                            p.dns = vec![a];
                        }
                    }
                }
            }
        }
        // pasta does not advertise resolvers unless --dhcp-dns: its namespaces read the
        // host's resolv.conf. The native face advertises them unless --no-dhcp-dns.
        let advertise = match self.face {
            super::Face::Pasta => self.dhcp_dns,
            super::Face::Native => !self.no_dhcp_dns,
        };
        if self.no_dns || !advertise {
            if let Some(p) = &mut network.ipv4 {
                p.dns.clear();
            }
            if let Some(p) = &mut network.ipv6 {
                p.dns.clear();
            }
        }
        Ok(crate::engine::Settings {
            max_flows: self.max_flows,
            policy,
            udp_idle: Duration::from_secs(self.udp_timeout),
            iss_secret: iss_secret()?,
        })
    }

    fn io_options(&self) -> Result<crate::io::Options> {
        let mut iface = self.outbound_if.clone();
        for name in [&self.outbound_if4, &self.outbound_if6]
            .into_iter()
            .flatten()
        {
            match &iface {
                Some(have) if have != name => bail!(
                    "--outbound-if4/--outbound-if6 {name}: forwarder binds both families to one interface ({have})"
                ),
                _ => iface = Some(name.clone()),
            }
        }
        let mut outbound = crate::io::Outbound {
            iface,
            ..crate::io::Outbound::default()
        };
        for addr in &self.outbound {
            match addr {
                IpAddr::V4(a) if outbound.v4.is_none() => outbound.v4 = Some(*a),
                IpAddr::V6(a) if outbound.v6.is_none() => outbound.v6 = Some(*a),
                _ => bail!("--outbound given more than once for one address family"),
            }
        }
        if let Some(name) = &outbound.iface
            && (name.is_empty() || name.len() >= 16)
        {
            bail!("--outbound-if {name:?}: interface names are 1-15 bytes");
        }
        Ok(crate::io::Options {
            outbound,
            udp_idle: Duration::from_secs(self.udp_timeout),
            drop_every: self.drop_every,
            splice_loopback: !self.no_splice,
            host_lo_to_ns_lo: self.host_lo_to_ns_lo || self.splice_only,
            splice_only: self.splice_only,
            pcap: self.pcap.clone(),
            freebind: self.freebind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("forwarder").chain(args.iter().copied()))
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_netmask("255.255.255.0"), Ok(24));
        assert_eq!(parse_netmask("16"), Ok(16));
        assert!(parse_netmask("255.0.255.0").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert_eq!(
            parse_mac("02:00:00:00:00:01").unwrap(),
            EthernetAddress([2, 0, 0, 0, 0, 1])
        );
        assert_eq!(
            parse_addr("10.0.2.100/24"),
            Ok(("10.0.2.100".parse().unwrap(), Some(24)))
        );
        assert!(parse_addr("10.0.2.100/33").is_err());
    }

    #[test]
    fn bad_values_are_rejected_by_clap() {
        assert!(parse(&["--mtu", "70000"]).is_err());
        assert!(parse(&["--mtu", "12"]).is_err());
        assert!(parse(&["-4", "-6"]).is_err());
        assert!(parse(&["--max-flows", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn command_after_double_dash() {
        let args = parse(&["--config-net", "--", "sh", "-c", "true"]).unwrap();
        let host = HostInfo::default();
        let cfg = args.into_config(&host).unwrap();
        assert_eq!(
            cfg.target,
            Target::Spawn {
                command: vec!["sh".into(), "-c".into(), "true".into()]
            }
        );
        assert!(cfg.config_net);
    }

    #[test]
    fn a_command_without_double_dash_and_a_pid_operand() {
        let args = parse(&["sh", "-c", "true"]).unwrap();
        assert_eq!(args.command, vec!["sh", "-c", "true"]);
        assert!(!args.runs_in_background());
        let cfg = parse(&["--config-net", "1"])
            .unwrap()
            .into_config(&HostInfo::default())
            .unwrap();
        assert!(
            matches!(cfg.target, Target::Attach { ref netns, .. } if netns == std::path::Path::new("/proc/1/ns/net"))
        );
    }

    #[test]
    fn options_not_served_are_refused_by_name() {
        let err = parse(&["-1", "--", "true"])
            .unwrap()
            .into_config(&HostInfo::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--one-off"), "{err}");
    }

    #[test]
    fn fd_takes_an_inherited_descriptor_and_not_config_net() {
        let cfg = parse(&["-F", "5", "--netns", "x"])
            .unwrap()
            .into_config(&HostInfo::default());
        assert_eq!(cfg.map(|c| c.tap_fd).ok().flatten(), Some(5));
        assert!(parse(&["-F", "5", "--config-net", "--", "true"]).is_err());
        assert!(
            parse(&["-F", "1", "--", "true"]).is_err(),
            "the standard streams are not taps"
        );
    }

    #[test]
    fn splice_only_has_no_udp_inbound() {
        let err = parse(&["--splice-only", "-u", "53", "--", "true"])
            .unwrap()
            .into_config(&HostInfo::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--udp-ports") && err.contains("--splice-only"),
            "{err}"
        );
        let cfg = parse(&["--splice-only", "-t", "80", "--", "true"])
            .unwrap()
            .into_config(&HostInfo::default())
            .unwrap();
        assert!(cfg.io.splice_only && cfg.io.host_lo_to_ns_lo);
        assert!(parse(&["--splice-only", "--no-splice", "--", "true"]).is_err());
    }

    #[test]
    fn names_for_dhcp() {
        let cfg = parse(&[
            "-S",
            "a.example b.example",
            "--dhcp-search",
            "-H",
            "box",
            "--fqdn",
            "box.a.example",
            "--",
            "true",
        ])
        .unwrap()
        .into_config(&HostInfo::default())
        .unwrap();
        let n = &cfg.network.names;
        assert_eq!(n.search, ["a.example", "b.example"]);
        assert_eq!(
            (n.hostname.as_deref(), n.fqdn.as_deref()),
            (Some("box"), Some("box.a.example"))
        );
        // Without --dhcp-search the list is not sent (pasta's default).
        let cfg = parse(&["-S", "a.example", "--", "true"])
            .unwrap()
            .into_config(&HostInfo::default())
            .unwrap();
        assert!(cfg.network.names.search.is_empty());
        let err = parse(&["-H", "bad name", "--", "true"])
            .unwrap()
            .into_config(&HostInfo::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--hostname \"bad name\""), "{err}");
    }

    #[test]
    fn duplicate_family_is_refused() {
        let args = parse(&["-a", "10.0.0.2", "-a", "10.0.0.3", "--", "true"]).unwrap();
        let err = args
            .into_config(&HostInfo::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--address given more than once"), "{err}");
    }
}
