//! # Theory of operation
//!
//! The control plane's table of port forwards, the runtime API that changes it, and `auto`.
//! It runs on the control thread (tokio); the data plane only serves the sockets it is
//! given ([`io::Command::AddForward`]) and closes them on request
//! ([`io::Command::RemoveForward`]).
//!
//! ## One table, three origins
//!
//! Every forward — from the command line, from the API, or found by `auto` — is an entry
//! with an id (counting from 1, never reused), a kind (`tcp`, `udp`, `tcp-ns`, `udp-ns`,
//! see [`Kind`]) and its ports. Host-side sockets are bound here; namespace-side ones by the
//! namespace agent ([`ns::Agent`]).
//!
//! ## Atomic changes
//!
//! An add binds every socket it needs before anything is recorded or sent to the data
//! plane; the first failure drops the sockets bound so far (closing them) and is the error.
//! So a request either takes effect whole or changes nothing. Removing a forward closes its
//! listening sockets only: connections already accepted, relays and flows go on until they
//! end; UDP flows that answered through a removed port's socket lose their reply path and
//! time out.
//!
//! ## The API (`--api-socket PATH`; protocol in `docs/api.md`)
//!
//! slirp4netns' framing: one JSON request per connection, the client shuts down its write
//! side, reads one JSON reply until EOF; requests of [`MAX_REQUEST`] bytes or more are
//! refused. Native operations: `add_forward`, `list_forwards`, `remove_forward`, `stats`,
//! `list_flows` (the data plane's one flow table, kernel flows included);
//! slirp4netns' `add_hostfwd`, `list_hostfwd`, `remove_hostfwd` are served too, with its
//! exact error texts.
//!
//! ## pasta's rules (`-c/--conf-path`, pesto)
//!
//! With `-c`, the `-t/-u/-T/-U` forwards are pasta's rules (`forward::rule`), kept per
//! table (HOST, SPLICE) with what serves each: a forward of this table (origin `rule`; the
//! API cannot remove it), or an `auto` state for a scanning rule. An update
//! ([`Control::apply_rules`], already checked by `forward::pesto`) is applied by difference:
//! rules in both keep their sockets; rules gone are closed first (their ports may be reused
//! by the new ones); new rules are bound in order. The first that cannot be bound undoes
//! the update: the new rules are closed, the old ones bound again, and the tables are left
//! as they were. pasta instead keeps the new table and retries failed ports every second
//! (`docs/faces.md`). Best-effort (`WEAK`) rules bind what they can.
//!
//! ## `auto`
//!
//! Every [`forward::AUTO_SCAN_INTERVAL`] the other side's bound sockets are listed (see
//! `forward`), and the difference with what `auto` forwards now is applied: new ports are
//! added as entries of origin `auto` (a port that cannot be bound is logged once and
//! retried at every scan), vanished ones removed. Entries of origin `auto` cannot be removed
//! through the API: they go when their port closes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::forward::rule::{Caps, Pif, Realize, Rule};
use crate::forward::{self, Auto, Kind, MAX_FORWARDS, PortMap, pesto};
use crate::{io, ns};

/// Largest request accepted (slirp4netns' limit).
pub const MAX_REQUEST: usize = 4096;

/// Where a forward came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The command line.
    Cli,
    /// The runtime API.
    Api,
    /// `auto` found the port bound.
    Auto,
    /// A pasta rule (`-c/--conf-path`: pesto changes it).
    Rule,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Api => "api",
            Self::Auto => "auto",
            Self::Rule => "rule",
        }
    }
}

/// One forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id.
    pub id: u32,
    /// Which way, which protocol.
    pub kind: Kind,
    /// The ports.
    pub maps: Vec<PortMap>,
    /// Who made it.
    pub origin: Origin,
}

#[derive(Debug)]
struct AutoState {
    kind: Kind,
    spec: Auto,
    /// Port → entry id.
    ports: BTreeMap<u16, u32>,
    /// Ports that could not be bound (logged once).
    failed: BTreeSet<u16>,
    /// The pasta rule it serves (`None`: the command line's `auto`).
    rule: Option<u32>,
}

/// What serves one pasta rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// A forward of the table.
    Entry(u32),
    /// An `auto` state, by its rule tag.
    Scan(u32),
    /// Nothing: a best-effort rule none of whose ports could be bound.
    Nothing,
}

/// pasta's rule tables, when `-c/--conf-path` serves them: each rule with what serves it.
#[derive(Debug)]
struct RuleTables {
    caps: Caps,
    tables: Vec<(Pif, Vec<(Rule, Served)>)>,
    next_tag: u32,
}

/// The forward table and what changes it.
#[derive(Debug)]
pub struct Control {
    entries: BTreeMap<u32, Entry>,
    next_id: u32,
    agent: Option<ns::Agent>,
    auto: Vec<AutoState>,
    guest: Vec<IpAddr>,
    kernel: Option<crate::ebpf::Kernel>,
    rules: Option<RuleTables>,
    /// `--host-lo-to-ns-lo`: the namespace's loopback is reachable from the host's, so
    /// `-t`/`-u` `auto` follows loopback-bound sockets too.
    loopback_reach: bool,
}

/// The data plane, as the control plane sees it (a trait so the table is testable without
/// one).
pub trait Plane {
    /// Sends a command.
    fn send(&self, cmd: io::Command);
    /// The engine's counters.
    fn stats(&self) -> Option<crate::engine::Stats>;
    /// Every flow, userspace's and the kernel's.
    fn flows(&self) -> Option<Vec<io::FlowRow>> {
        None
    }
}

impl Plane for io::Handle {
    fn send(&self, cmd: io::Command) {
        io::Handle::send(self, cmd);
    }

    fn stats(&self) -> Option<crate::engine::Stats> {
        let (tx, rx) = std::sync::mpsc::channel();
        io::Handle::send(self, io::Command::Stats(tx));
        rx.recv_timeout(Duration::from_secs(2)).ok()
    }

    fn flows(&self) -> Option<Vec<io::FlowRow>> {
        let (tx, rx) = std::sync::mpsc::channel();
        io::Handle::send(self, io::Command::Flows(tx));
        rx.recv_timeout(Duration::from_secs(2)).ok()
    }
}

impl Control {
    /// A table with the namespace agent (if one runs), the `auto` specs, and the guest's
    /// addresses (`add_hostfwd`'s `guest_addr` must be one of them).
    #[must_use]
    pub fn new(agent: Option<ns::Agent>, auto: Vec<(Kind, Auto)>, guest: Vec<IpAddr>) -> Self {
        Self {
            entries: BTreeMap::new(),
            next_id: 1,
            agent,
            auto: auto
                .into_iter()
                .map(|(kind, spec)| AutoState {
                    kind,
                    spec,
                    ports: BTreeMap::new(),
                    failed: BTreeSet::new(),
                    rule: None,
                })
                .collect(),
            guest,
            kernel: None,
            rules: None,
            loopback_reach: false,
        }
    }

    /// `--host-lo-to-ns-lo`: `auto` of `-t`/`-u` forwards the namespace's loopback-bound
    /// ports too (host loopback clients reach them).
    pub fn set_loopback_reach(&mut self, on: bool) {
        self.loopback_reach = on;
    }

    /// The eBPF programs, whose counters join the engine's in `stats`.
    pub fn set_kernel(&mut self, kernel: crate::ebpf::Kernel) {
        self.kernel = Some(kernel);
    }

    /// Whether the kernel's fast path runs (its uplinks are rescanned).
    #[must_use]
    pub fn fast_path(&self) -> bool {
        self.kernel.as_ref().is_some_and(crate::ebpf::Kernel::fast)
    }

    /// Keeps the fast path's `uplink_ingress` on exactly these host interfaces.
    pub fn set_uplinks(&mut self, links: &[(u32, String)]) {
        if let Some(k) = &mut self.kernel {
            k.set_uplinks(links);
        }
    }

    /// Records forwards bound at start-up; returns the id for their sockets.
    pub fn record(&mut self, kind: Kind, maps: Vec<PortMap>) -> u32 {
        self.insert(kind, maps, Origin::Cli)
    }

    /// Adds an entry under the next id.
    fn insert(&mut self, kind: Kind, maps: Vec<PortMap>, origin: Origin) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                id,
                kind,
                maps,
                origin,
            },
        );
        id
    }

    /// The table.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Whether `auto` is configured.
    #[must_use]
    pub fn has_auto(&self) -> bool {
        !self.auto.is_empty()
    }

    /// Binds `maps` and adds them as one forward, all or nothing.
    ///
    /// # Errors
    ///
    /// The first socket that cannot be bound (nothing changed), or too many forwards.
    pub fn add(
        &mut self,
        plane: &dyn Plane,
        kind: Kind,
        maps: Vec<PortMap>,
        origin: Origin,
    ) -> Result<u32> {
        if maps.is_empty() {
            bail!("no port to forward");
        }
        let have: usize = self
            .entries
            .values()
            .filter(|e| e.kind == kind)
            .map(|e| e.maps.len())
            .sum();
        if have + maps.len() > MAX_FORWARDS {
            bail!("more than {MAX_FORWARDS} {} ports", kind.name());
        }
        let listeners = self.bind(kind, &maps)?;
        let id = self.insert(kind, maps, origin);
        plane.send(io::Command::AddForward(id, listeners));
        Ok(id)
    }

    fn bind(&self, kind: Kind, maps: &[PortMap]) -> Result<Vec<io::Listener>> {
        if !kind.in_namespace() {
            return io::bind_forwards(maps, kind.is_udp());
        }
        let agent = self.agent.as_ref().ok_or_else(|| {
            anyhow!(
                "{} forwards cannot be added: no namespace agent runs",
                kind.name()
            )
        })?;
        let mut out = Vec::new();
        for m in maps {
            for addr in ns::ns_bind_addrs(m) {
                let fd = agent
                    .bind(addr, kind.is_udp())
                    .with_context(|| format!("forward namespace {} port {addr}", kind.name()))?;
                out.push(io::Listener::namespace(fd, m.to, kind.is_udp()));
            }
        }
        Ok(out)
    }

    /// Removes forward `id`.
    ///
    /// # Errors
    ///
    /// An unknown id, or an `auto` entry.
    pub fn remove(&mut self, plane: &dyn Plane, id: u32) -> Result<()> {
        match self.entries.get(&id) {
            None => bail!("no forward has id {id}"),
            Some(e) if e.origin == Origin::Auto => {
                bail!("forward {id} follows auto: it goes when its port closes")
            }
            Some(e) if e.origin == Origin::Rule => {
                bail!("forward {id} serves a pasta rule: change it with pesto")
            }
            Some(_) => {}
        }
        self.entries.remove(&id);
        plane.send(io::Command::RemoveForward(id));
        Ok(())
    }

    /// One `auto` pass: forwards ports newly bound on the other side, drops vanished ones.
    pub fn scan_auto(&mut self, plane: &dyn Plane) {
        for i in 0..self.auto.len() {
            let Some(kind) = self.auto.get(i).map(|a| a.kind) else {
                continue;
            };
            let bound = match self.other_side(kind) {
                Ok(b) => b,
                Err(err) => {
                    debug!("auto {}: listing ports failed: {err:#}", kind.name());
                    continue;
                }
            };
            let Some(state) = self.auto.get(i) else {
                continue;
            };
            let want: BTreeSet<u16> = bound.into_iter().filter(|p| state.spec.wants(*p)).collect();
            let bind = state.spec.bind;
            let gone: Vec<(u16, u32)> = state
                .ports
                .iter()
                .filter(|(p, _)| !want.contains(p))
                .map(|(p, id)| (*p, *id))
                .collect();
            let new: Vec<u16> = want
                .iter()
                .filter(|p| !state.ports.contains_key(p))
                .copied()
                .collect();
            for (port, id) in gone {
                self.entries.remove(&id);
                plane.send(io::Command::RemoveForward(id));
                if let Some(s) = self.auto.get_mut(i) {
                    s.ports.remove(&port);
                }
                info!(
                    kind = kind.name(),
                    port, "auto: port closed, forward removed"
                );
            }
            for port in new {
                let map = PortMap::new(bind, port, port);
                let added = self.add(plane, kind, vec![map], Origin::Auto);
                let Some(s) = self.auto.get_mut(i) else {
                    continue;
                };
                match added {
                    Ok(id) => {
                        s.ports.insert(port, id);
                        s.failed.remove(&port);
                        info!(kind = kind.name(), port, id, "auto: port bound, forwarded");
                    }
                    Err(err) => {
                        if s.failed.insert(port) {
                            warn!(kind = kind.name(), port, "auto: cannot forward: {err:#}");
                        }
                    }
                }
            }
            if let Some(s) = self.auto.get_mut(i) {
                s.failed.retain(|p| want.contains(p));
            }
        }
    }

    /// The ports `auto` of `kind` could forward: bound on the side the traffic goes to, on an
    /// address the forward can reach, and not forwarder's own.
    fn other_side(&self, kind: Kind) -> Result<BTreeSet<u16>> {
        let udp = kind.is_udp();
        // Ports forwarder itself bound on the side being listed.
        let own_kind = match kind {
            Kind::Tcp => Kind::TcpNs,
            Kind::Udp => Kind::UdpNs,
            Kind::TcpNs => Kind::Tcp,
            Kind::UdpNs => Kind::Udp,
        };
        let own: BTreeSet<u16> = self
            .entries
            .values()
            .filter(|e| e.kind == own_kind)
            .flat_map(|e| e.maps.iter().map(|m| m.listen))
            .collect();
        let bound = if kind.in_namespace() {
            // -T/-U auto: the host's sockets that its loopback reaches.
            let mut all = forward::read_bound(udp, |path| {
                std::fs::read_to_string(path).with_context(|| format!("read {path}"))
            })?;
            all.retain(|b| b.addr.is_loopback() || b.addr.is_unspecified());
            all
        } else {
            // -t/-u auto: the namespace's sockets that the tap reaches (and, with
            // --host-lo-to-ns-lo, those host loopback clients reach).
            let agent = self
                .agent
                .as_ref()
                .ok_or_else(|| anyhow!("no namespace agent runs"))?;
            let mut all = agent.bound(udp)?;
            if !self.loopback_reach {
                all.retain(|b| !b.addr.is_loopback());
            }
            all
        };
        Ok(bound
            .into_iter()
            .map(|b| b.port)
            .filter(|p| !own.contains(p))
            .collect())
    }

    /// Serves pasta's rule tables (`-c/--conf-path`), empty until [`Self::apply_rules`],
    /// with the capabilities reported to pesto.
    pub fn serve_rules(&mut self, caps: Caps) {
        self.rules = Some(RuleTables {
            caps,
            tables: Pif::ALL.iter().map(|p| (*p, Vec::new())).collect(),
            next_tag: 1,
        });
    }

    /// The capabilities and tables an update is read against (`None`: no rules served).
    #[must_use]
    pub fn rule_reader(&self) -> Option<pesto::Update> {
        let r = self.rules.as_ref()?;
        let served: Vec<Pif> = r.tables.iter().map(|(p, _)| *p).collect();
        Some(pesto::Update::new(r.caps, &served))
    }

    /// What a pesto client reads on connecting: the greeting and the tables.
    #[must_use]
    pub fn rule_dump(&self) -> Vec<u8> {
        let mut out = pesto::hello();
        if let Some(r) = &self.rules {
            let tables: Vec<(Pif, Vec<Rule>)> = r
                .tables
                .iter()
                .map(|(p, rules)| (*p, rules.iter().map(|(rule, _)| *rule).collect()))
                .collect();
            let refs: Vec<(Pif, &[Rule])> = tables
                .iter()
                .map(|(p, rules)| (*p, rules.as_slice()))
                .collect();
            out.extend(pesto::dump(r.caps, &refs));
        }
        out
    }

    /// Replaces the rule tables with `new` (checked already: [`pesto::Update`]), all or
    /// nothing: rules in both stay as they are (their sockets are not touched), rules gone
    /// are closed, new rules are bound; when one of those cannot be bound, the new ones
    /// are closed, the old ones bound again, and the error is returned with the tables as
    /// they were.
    ///
    /// # Errors
    ///
    /// The rule that could not be served, and why.
    pub fn apply_rules(&mut self, plane: &dyn Plane, new: &[(Pif, Vec<Rule>)]) -> Result<()> {
        let Some(mut tables) = self.rules.take() else {
            bail!("no rule tables are served");
        };
        let old: Vec<(Pif, Rule, Served)> = tables
            .tables
            .iter()
            .flat_map(|(p, rules)| rules.iter().map(|(r, s)| (*p, *r, *s)))
            .collect();
        let is_new = |pif: Pif, rule: &Rule| {
            new.iter()
                .any(|(p, rules)| *p == pif && rules.contains(rule))
        };
        let gone: Vec<&(Pif, Rule, Served)> =
            old.iter().filter(|(p, r, _)| !is_new(*p, r)).collect();
        for (_, _, served) in &gone {
            self.unserve(plane, *served);
        }
        let mut added: Vec<(Pif, Rule, Served)> = Vec::new();
        let mut failure = None;
        'all: for (pif, rules) in new {
            for rule in rules {
                if old.iter().any(|(p, r, _)| p == pif && r == rule) {
                    continue;
                }
                match self.serve(plane, &mut tables, *pif, rule) {
                    Ok(served) => added.push((*pif, *rule, served)),
                    Err(err) => {
                        failure = Some(err.context(format!("{} rule {rule}", pif.name())));
                        break 'all;
                    }
                }
            }
        }
        if let Some(err) = failure {
            for (_, _, served) in added {
                self.unserve(plane, served);
            }
            // The old rules' sockets were closed: bind them again. A port taken in the
            // meantime is lost, and said.
            let mut restored = Vec::new();
            for (pif, rule, _) in &gone {
                let served = self
                    .serve(plane, &mut tables, *pif, rule)
                    .unwrap_or_else(|e| {
                        warn!("{} rule {rule}: cannot be restored: {e:#}", pif.name());
                        Served::Nothing
                    });
                restored.push((*pif, *rule, served));
            }
            for (pif, rules) in &mut tables.tables {
                for (rule, served) in rules.iter_mut() {
                    if let Some((_, _, s)) = restored.iter().find(|(p, r, _)| p == pif && r == rule)
                    {
                        *served = *s;
                    }
                }
            }
            self.rules = Some(tables);
            return Err(err);
        }
        tables.tables = new
            .iter()
            .map(|(pif, rules)| {
                let served = rules
                    .iter()
                    .map(|rule| {
                        let s = old
                            .iter()
                            .chain(added.iter())
                            .find(|(p, r, _)| p == pif && r == rule)
                            .map_or(Served::Nothing, |(_, _, s)| *s);
                        (*rule, s)
                    })
                    .collect();
                (*pif, served)
            })
            .collect();
        for (pif, rules) in &tables.tables {
            info!(
                table = pif.name(),
                rules = rules.len(),
                "new forwarding rules"
            );
            for (rule, _) in rules {
                info!("    {rule}");
            }
        }
        self.rules = Some(tables);
        Ok(())
    }

    /// Binds what `rule` asks for and records it.
    fn serve(
        &mut self,
        plane: &dyn Plane,
        tables: &mut RuleTables,
        pif: Pif,
        rule: &Rule,
    ) -> Result<Served> {
        match rule.realize(pif)? {
            Realize::Scan(kind, spec) => {
                let tag = tables.next_tag;
                tables.next_tag = tables.next_tag.wrapping_add(1);
                self.auto.push(AutoState {
                    kind,
                    spec,
                    ports: BTreeMap::new(),
                    failed: BTreeSet::new(),
                    rule: Some(tag),
                });
                Ok(Served::Scan(tag))
            }
            Realize::Ports {
                kind,
                maps,
                weak: false,
            } => self.add(plane, kind, maps, Origin::Rule).map(Served::Entry),
            Realize::Ports {
                kind,
                maps,
                weak: true,
            } => {
                let (listeners, bound) = if kind.in_namespace() {
                    let mut listeners = Vec::new();
                    let mut bound = Vec::new();
                    for m in &maps {
                        if let Ok(mut l) = self.bind(kind, std::slice::from_ref(m)) {
                            listeners.append(&mut l);
                            bound.push(*m);
                        }
                    }
                    (listeners, bound)
                } else {
                    match io::bind_best_effort(&maps, kind.is_udp()) {
                        Ok(got) => got,
                        Err(err) => {
                            // pasta: a best-effort rule with no port bound is a failure
                            // unless it scans; forwarder keeps the rule and says so.
                            warn!("{} rule {rule}: {err:#}", pif.name());
                            return Ok(Served::Nothing);
                        }
                    }
                };
                if bound.is_empty() {
                    return Ok(Served::Nothing);
                }
                let id = self.insert(kind, bound, Origin::Rule);
                plane.send(io::Command::AddForward(id, listeners));
                Ok(Served::Entry(id))
            }
        }
    }

    /// Closes what serves a rule.
    fn unserve(&mut self, plane: &dyn Plane, served: Served) {
        match served {
            Served::Entry(id) => {
                if self.entries.remove(&id).is_some() {
                    plane.send(io::Command::RemoveForward(id));
                }
            }
            Served::Scan(tag) => {
                let Some(i) = self.auto.iter().position(|a| a.rule == Some(tag)) else {
                    return;
                };
                let state = self.auto.remove(i);
                for id in state.ports.values() {
                    self.entries.remove(id);
                    plane.send(io::Command::RemoveForward(*id));
                }
            }
            Served::Nothing => {}
        }
    }

    /// Serves one API request; the reply is a JSON document.
    pub fn handle(&mut self, plane: &dyn Plane, request: &[u8]) -> Value {
        match self.dispatch(plane, request) {
            Ok(ret) => json!({ "return": ret }),
            Err(desc) => json!({ "error": { "desc": desc } }),
        }
    }

    fn dispatch(&mut self, plane: &dyn Plane, request: &[u8]) -> Result<Value, String> {
        if request.len() >= MAX_REQUEST {
            return Err("bad request: too large message".into());
        }
        let req: Value = serde_json::from_slice(request)
            .map_err(|_| "bad request: cannot parse JSON".to_string())?;
        let execute = req
            .get("execute")
            .and_then(Value::as_str)
            .ok_or("bad request: no execute found")?;
        let args = req.get("arguments").cloned().unwrap_or(Value::Null);
        match execute {
            "add_forward" => self.api_add(plane, &args),
            "list_forwards" => Ok(json!({
                "entries": self.entries.values().map(entry_json).collect::<Vec<_>>()
            })),
            "remove_forward" => {
                let id = args
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("bad request: remove_forward: bad arguments.id")?;
                self.remove(plane, id)
                    .map_err(|e| format!("remove_forward: {e:#}"))?;
                Ok(json!({}))
            }
            "stats" => {
                let stats = plane
                    .stats()
                    .ok_or("stats: the data plane did not answer")?;
                let kernel = self
                    .kernel
                    .as_mut()
                    .map(crate::ebpf::Kernel::counters)
                    .unwrap_or_default();
                let counters: serde_json::Map<String, Value> = stats
                    .iter()
                    .chain(kernel)
                    .map(|(name, n)| (name, Value::from(n)))
                    .collect();
                Ok(json!({ "counters": counters, "forwards": self.entries.len() }))
            }
            "list_flows" => {
                let rows = plane
                    .flows()
                    .ok_or("list_flows: the data plane did not answer")?;
                Ok(json!({ "flows": rows.iter().map(flow_json).collect::<Vec<_>>() }))
            }
            "add_hostfwd" => self.hostfwd_add(plane, &args),
            "list_hostfwd" => Ok(json!({ "entries": self.hostfwd_list() })),
            "remove_hostfwd" => {
                let id = args
                    .get("id")
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|id| {
                        self.entries
                            .get(id)
                            .is_some_and(|e| e.origin == Origin::Api || e.origin == Origin::Cli)
                    })
                    .ok_or("bad request: remove_hostfwd: bad arguments.id")?;
                self.remove(plane, id)
                    .map_err(|_| "bad request: remove_hostfwd: bad arguments.id".to_string())?;
                Ok(json!({}))
            }
            _ => Err("bad request: unknown execute".into()),
        }
    }

    fn api_add(&mut self, plane: &dyn Plane, args: &Value) -> Result<Value, String> {
        let kind = args
            .get("kind")
            .and_then(Value::as_str)
            .and_then(Kind::from_name)
            .ok_or("bad request: add_forward: bad arguments.kind (tcp, udp, tcp-ns or udp-ns)")?;
        let spec = args
            .get("spec")
            .and_then(Value::as_str)
            .ok_or("bad request: add_forward: bad arguments.spec")?;
        let maps = match forward::parse_spec(spec) {
            Ok(forward::Spec::Ports(maps)) => maps,
            Ok(forward::Spec::Auto(_) | forward::Spec::All(_)) => {
                return Err(
                    "bad request: add_forward: auto and all are given on the command line only"
                        .into(),
                );
            }
            Err(e) => return Err(format!("bad request: add_forward: {e}")),
        };
        // A port already forwarded by forwarder: refused here, with the entry named, since
        // the kernel would only say "in use".
        for m in &maps {
            if let Some(e) = self.entries.values().find(|e| {
                e.kind == kind
                    && e.maps.iter().any(|o| {
                        o.listen == m.listen
                            && (o.bind.is_none() || m.bind.is_none() || o.bind == m.bind)
                    })
            }) {
                return Err(format!(
                    "add_forward: {} port {} is already forwarded (id {})",
                    kind.name(),
                    m.listen,
                    e.id
                ));
            }
        }
        let n = maps.len();
        let id = self
            .add(plane, kind, maps, Origin::Api)
            .map_err(|e| format!("add_forward: {e:#}"))?;
        info!(
            id,
            kind = kind.name(),
            spec,
            ports = n,
            "api: forward added"
        );
        Ok(json!({ "id": id }))
    }

    fn hostfwd_add(&mut self, plane: &dyn Plane, args: &Value) -> Result<Value, String> {
        let bad = |field: &str| format!("bad request: add_hostfwd: bad arguments.{field}");
        let kind = match args.get("proto").and_then(Value::as_str) {
            Some("tcp") => Kind::Tcp,
            Some("udp") => Kind::Udp,
            _ => return Err(bad("proto")),
        };
        let host_addr: IpAddr = match args.get("host_addr") {
            None | Some(Value::Null) => IpAddr::from([0, 0, 0, 0]),
            Some(v) => v
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("host_addr"))?,
        };
        let port = |field: &str| {
            args.get(field)
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(field))
        };
        let host_port = port("host_port")?;
        let guest_port = port("guest_port")?;
        if let Some(v) = args.get("guest_addr").filter(|v| !v.is_null()) {
            let addr: IpAddr = v
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("guest_addr"))?;
            if !self.guest.contains(&addr) {
                return Err(bad("guest_addr"));
            }
        }
        let map = PortMap::new(Some(host_addr), host_port, guest_port);
        let id = self
            .add(plane, kind, vec![map], Origin::Api)
            .map_err(|_| "bad request: add_hostfwd: slirp_add_hostfwd failed".to_string())?;
        Ok(json!({ "id": id }))
    }

    fn hostfwd_list(&self) -> Vec<Value> {
        let guest = self
            .guest
            .iter()
            .find(|a| a.is_ipv4())
            .or(self.guest.first())
            .map(ToString::to_string);
        self.entries
            .values()
            .filter(|e| matches!(e.kind, Kind::Tcp | Kind::Udp))
            .flat_map(|e| {
                let guest = guest.clone();
                e.maps.iter().map(move |m| {
                    json!({
                        "id": e.id,
                        "proto": e.kind.name(),
                        "host_addr": m.bind.map_or_else(|| "::".to_string(), |a| a.to_string()),
                        "host_port": m.listen,
                        "guest_addr": guest,
                        "guest_port": m.to,
                    })
                })
            })
            .collect()
    }
}

fn flow_json(f: &io::FlowRow) -> Value {
    let mut v = json!({
        "id": f.id,
        "protocol": f.protocol,
        "guest": f.guest.to_string(),
        "remote": f.remote.to_string(),
        "path": f.path,
        "state": f.state,
    });
    if let Some(map) = v.as_object_mut() {
        if let Some(h) = f.host {
            map.insert("host".into(), Value::from(h.to_string()));
        }
        if let Some(counters) = f.counters {
            for (name, n) in ["packets_out", "bytes_out", "packets_in", "bytes_in"]
                .iter()
                .zip(counters)
            {
                map.insert((*name).into(), Value::from(n));
            }
        }
    }
    v
}

fn entry_json(e: &Entry) -> Value {
    json!({
        "id": e.id,
        "kind": e.kind.name(),
        "origin": e.origin.name(),
        "ports": e.maps.iter().map(|m| json!({
            "bind": m.bind.map(|a| a.to_string()),
            "listen": m.listen,
            "to": m.to,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoPlane(std::cell::RefCell<Vec<String>>);

    impl Plane for NoPlane {
        fn send(&self, cmd: io::Command) {
            self.0.borrow_mut().push(format!("{cmd:?}"));
        }
        fn stats(&self) -> Option<crate::engine::Stats> {
            Some(crate::engine::Stats::default())
        }
    }

    fn call(c: &mut Control, p: &NoPlane, req: &str) -> Value {
        c.handle(p, req.as_bytes())
    }

    fn desc(v: &Value) -> &str {
        v.pointer("/error/desc")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut c = Control::new(None, Vec::new(), vec!["198.51.100.2".parse().unwrap()]);
        let p = NoPlane(Default::default());
        for (req, want) in [
            ("{", "bad request: cannot parse JSON"),
            ("{}", "bad request: no execute found"),
            (
                r#"{"execute":"frobnicate"}"#,
                "bad request: unknown execute",
            ),
            (
                r#"{"execute":"add_forward","arguments":{"kind":"sctp","spec":"80"}}"#,
                "bad arguments.kind",
            ),
            (
                r#"{"execute":"add_forward","arguments":{"kind":"tcp","spec":"70000"}}"#,
                "70000",
            ),
            (
                r#"{"execute":"add_forward","arguments":{"kind":"tcp-ns","spec":"80"}}"#,
                "no namespace agent",
            ),
            (
                r#"{"execute":"remove_forward","arguments":{"id":7}}"#,
                "no forward has id 7",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"sctp","host_port":1,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":0,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_port":1,"guest_addr":"203.0.113.9"}}"#,
                "bad request: add_hostfwd: bad arguments.guest_addr",
            ),
            (
                r#"{"execute":"remove_hostfwd","arguments":{"id":1}}"#,
                "bad request: remove_hostfwd: bad arguments.id",
            ),
        ] {
            let v = call(&mut c, &p, req);
            assert!(desc(&v).contains(want), "{req}: {v}");
        }
        let big = format!(
            r#"{{"execute":"list_forwards","x":"{}"}}"#,
            "a".repeat(5000)
        );
        assert_eq!(
            desc(&call(&mut c, &p, &big)),
            "bad request: too large message"
        );
        assert_eq!(c.entries().count(), 0);
        assert!(p.0.borrow().is_empty(), "nothing reached the data plane");
    }

    #[test]
    fn add_list_remove() {
        let mut c = Control::new(None, Vec::new(), Vec::new());
        let p = NoPlane(Default::default());
        let v = call(
            &mut c,
            &p,
            r#"{"execute":"add_forward","arguments":{"kind":"udp","spec":"127.0.0.1/0"}}"#,
        );
        // Port 0 is not a port.
        assert!(desc(&v).contains("\"0\""), "{v}");
        let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let v = call(
            &mut c,
            &p,
            &format!(
                r#"{{"execute":"add_forward","arguments":{{"kind":"udp","spec":"127.0.0.1/{port}"}}}}"#
            ),
        );
        assert_eq!(v.pointer("/return/id"), Some(&json!(1)), "{v}");
        // The same port again: named, nothing changed.
        let again = call(
            &mut c,
            &p,
            &format!(
                r#"{{"execute":"add_forward","arguments":{{"kind":"udp","spec":"127.0.0.1/{port}"}}}}"#
            ),
        );
        assert!(desc(&again).contains("already forwarded (id 1)"), "{again}");
        let list = call(&mut c, &p, r#"{"execute":"list_forwards"}"#);
        assert_eq!(
            list.pointer("/return/entries/0/ports/0/listen"),
            Some(&json!(port))
        );
        assert_eq!(
            call(
                &mut c,
                &p,
                r#"{"execute":"remove_forward","arguments":{"id":1}}"#
            ),
            json!({"return": {}})
        );
        assert_eq!(c.entries().count(), 0);
        assert_eq!(p.0.borrow().len(), 2, "{:?}", p.0.borrow());
    }

    #[test]
    fn rule_updates_are_all_or_nothing() {
        use crate::forward::rule::{Side, parse};
        let caps = Caps(0x1d); // IPv4, TCP, UDP, auto
        let rule = |port: u16| {
            parse(
                &format!("127.0.0.1/{port}"),
                Side {
                    splice: false,
                    udp: false,
                },
                caps,
                (32768, 60999),
            )
            .unwrap()[0]
        };
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut c = Control::new(None, Vec::new(), Vec::new());
        let p = NoPlane(Default::default());
        c.serve_rules(caps);
        let (a, b) = (free(), free());
        c.apply_rules(&p, &[(Pif::Host, vec![rule(a)]), (Pif::Splice, vec![])])
            .unwrap();
        let before = c.rule_dump();
        assert_eq!(c.entries().count(), 1);
        // b is taken: an update replacing a with b fails, and a is served again.
        let blocker = std::net::TcpListener::bind(("127.0.0.1", b)).unwrap();
        let e = c
            .apply_rules(&p, &[(Pif::Host, vec![rule(b)]), (Pif::Splice, vec![])])
            .unwrap_err();
        assert!(format!("{e:#}").contains(&b.to_string()), "{e:#}");
        assert_eq!(c.rule_dump(), before, "the tables are as they were");
        // a's forward was closed for the update, then bound and handed to the data plane
        // again (this test's plane drops the sockets it is given).
        let ports: Vec<u16> = c
            .entries()
            .flat_map(|e| e.maps.iter().map(|m| m.listen))
            .collect();
        assert_eq!(ports, [a]);
        let sent = p.0.borrow().clone();
        assert!(
            sent.iter().any(|c| c.starts_with("RemoveForward"))
                && sent.last().is_some_and(|c| c.starts_with("AddForward")),
            "{sent:?}"
        );
        drop(blocker);
        // Now it works; a is closed.
        c.apply_rules(&p, &[(Pif::Host, vec![rule(b)]), (Pif::Splice, vec![])])
            .unwrap();
        assert_ne!(c.rule_dump(), before);
        let ports: Vec<u16> = c
            .entries()
            .flat_map(|e| e.maps.iter().map(|m| m.listen))
            .collect();
        assert_eq!(ports, [b]);
        // A rule that cannot be served (no such interface) is refused by name; nothing
        // changes.
        let now = c.rule_dump();
        let mut on_iface = rule(a);
        on_iface.0[32..41].copy_from_slice(b"fwt-nope0");
        let e = c
            .apply_rules(&p, &[(Pif::Host, vec![on_iface]), (Pif::Splice, vec![])])
            .unwrap_err();
        assert!(format!("{e:#}").contains("%fwt-nope0"), "{e:#}");
        assert_eq!(c.rule_dump(), now);
        // An entry serving a rule is pesto's to change, not the API's.
        let id = c.entries().next().unwrap().id;
        let v = call(
            &mut c,
            &p,
            &format!(r#"{{"execute":"remove_forward","arguments":{{"id":{id}}}}}"#),
        );
        assert!(desc(&v).contains("pasta rule"), "{v}");
    }
}
