//! The one validated configuration every front end produces ("parse, don't validate").
//!
//! Front ends (`cli`) turn their arguments into a [`Config`]; below them nothing re-checks
//! an option or knows which face started the process. `Config` is the aggregate at the top
//! of the layers: it is made of each layer's own settings — the address plan
//! ([`plan::Network`], resolved once at start-up and then never changed), the service
//! switches, the engine's [`engine::Settings`], the data plane's [`io::Options`] and the
//! port maps of [`forward`] — and nothing below it imports it (`docs/architecture.md`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::{engine, forward, io, plan, services};

/// Everything the process needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which namespace to serve.
    pub target: Target,
    /// Name of the tap device in the namespace.
    pub ifname: String,
    /// Configure addresses, routes and MTU in the namespace over rtnetlink.
    pub config_net: bool,
    /// The address plan and what is answered on the tap.
    pub network: plan::Network,
    /// Which built-in services run.
    pub services: services::Switches,
    /// Write the PID here once the namespace is ready.
    pub pid_file: Option<PathBuf>,
    /// Outbound policy, mappings and flow timeouts.
    pub translation: engine::Settings,
    /// The data plane's own options (outbound binding, test hook).
    pub io: io::Options,
    /// Inbound TCP port forwards (`-t`).
    pub tcp_forwards: Vec<forward::PortMap>,
    /// Inbound UDP port forwards (`-u`).
    pub udp_forwards: Vec<forward::PortMap>,
    /// Namespace → host TCP forwards (`-T`): listen in the namespace, splice to the host's
    /// loopback.
    pub ns_tcp_forwards: Vec<forward::PortMap>,
    /// Namespace → host UDP forwards (`-U`).
    pub ns_udp_forwards: Vec<forward::PortMap>,
    /// `auto` specs, at most one per kind.
    pub auto: Vec<(forward::Kind, forward::Auto)>,
    /// Kinds given `all`: their ports are bound best-effort.
    pub all: Vec<forward::Kind>,
    /// The runtime control API's socket.
    pub api_socket: Option<PathBuf>,
    /// `--ebpf`: try the kernel programs.
    pub ebpf: bool,
    /// `--ebpf-grace`: how long a closed fast-path flow keeps its entries and port.
    pub ebpf_grace: Duration,
    /// `--ebpf-max-flows`: the kernel's share of the flow table.
    pub ebpf_max_flows: usize,
    /// How the process runs: background, when it ends, its runtime sockets.
    pub process: Process,
    /// pasta's rule tables, served to pesto on `-c/--conf-path`; with them, the forwards
    /// above are empty and the rules are what is forwarded.
    pub rules: Option<Rules>,
    /// `--ns-mac-addr`: the tap's MAC address in the namespace.
    pub ns_mac: Option<crate::wire::EthernetAddress>,
    /// `-F/--fd`: the tap is this inherited descriptor; none is created.
    pub tap_fd: Option<i32>,
}

/// pasta's forwarding rules and the socket pesto changes them on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The control socket's path.
    pub path: PathBuf,
    /// What the server can do (reported to pesto; checks every rule).
    pub caps: forward::rule::Caps,
    /// The tables from the command line, in order.
    pub tables: forward::rule::Tables,
}

/// The process contract of the face that started forwarder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// `--runas`: the user and group to change to once set up (`None`: stay).
    pub runas: Option<(u32, u32)>,
    /// Fork into the background once the namespace is served; the foreground exits 0 then
    /// (pasta's contract; never with a spawned command).
    pub background: bool,
    /// Exit 0 when the attached namespace is gone.
    pub netns_quit: bool,
    /// `--stats DELAY`: log the counters this often.
    pub stats_every: Option<Duration>,
}

/// The namespace forwarder serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Create a new user and network namespace and run this command in it.
    Spawn {
        /// Program and arguments; never empty.
        command: Vec<OsString>,
    },
    /// Attach to an existing network namespace.
    Attach {
        /// The network namespace (a path such as `/run/netns/NAME` or `/proc/PID/ns/net`).
        netns: PathBuf,
        /// The user namespace to join first, if any.
        userns: Option<PathBuf>,
    },
}
