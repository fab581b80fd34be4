//! End-to-end test harness: builds the test world of DESIGN.md from network namespaces and
//! always tears it down.
//!
//! ```text
//!  [remote]  198.51.100.1/24 2001:db8:1::1/64 on dn0; 203.0.113.1 and 2001:db8:2::1 on lo
//!     | veth
//!  [host]    198.51.100.2/24 2001:db8:1::2/64 on up0, default routes via remote; forwarder runs here
//!     | tap (owned by forwarder)
//!  [guest]   the namespace under test (created by the test, or by forwarder itself)
//! ```
//!
//! Address rule: only documentation prefixes, only inside namespaces this harness created.
//! The host namespace has no route to the machine's own network, so nothing the guest sends
//! can leave the world. Namespace names carry the test process id and a counter, so
//! parallel tests never collide, and [`World`]'s `Drop` deletes them even when a test panics.
//! `cargo xtask run-integration` also sweeps leftovers (`fwt-*`) before it starts.
#![allow(
    clippy::missing_panics_doc,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: a panic is a test failure"
)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Whether privileged tests can run; when they cannot, says why on stderr. Under
/// `FORWARDER_REQUIRE_PRIVILEGED=1` (set by `cargo xtask run-integration`, which CI runs as
/// root) a missing privilege is a failure, not a skip.
#[must_use]
pub fn privileged() -> bool {
    if nix_euid() == 0 {
        return true;
    }
    assert!(
        std::env::var_os("FORWARDER_REQUIRE_PRIVILEGED").is_none(),
        "FORWARDER_REQUIRE_PRIVILEGED is set but the tests do not run as root"
    );
    eprintln!("SKIP: end-to-end tests need root to create network namespaces");
    false
}

fn nix_euid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(u32::MAX)
}

/// The forwarder binary under test.
#[must_use]
pub fn forwarder_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FORWARDER_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> → target/<profile>/forwarder
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("forwarder");
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo build -p forwarder)",
        bin.display()
    );
    bin
}

/// A test world: remote and host namespaces, optionally a guest namespace.
#[derive(Debug)]
pub struct World {
    /// The host namespace (forwarder runs here).
    pub host: String,
    /// The remote namespace (servers).
    pub remote: String,
    /// A guest namespace created by [`World::add_guest`].
    pub guest: Option<String>,
    /// More guest namespaces ([`World::add_another_guest`]), deleted with the world.
    pub others: Vec<String>,
    children: Vec<Child>,
    /// Scratch directory for logs and scripts.
    pub dir: PathBuf,
}

impl World {
    /// Builds remote ↔ host.
    #[must_use]
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("fwt-{tag}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let world = Self {
            host: format!("fwt-h-{tag}"),
            remote: format!("fwt-r-{tag}"),
            guest: None,
            others: Vec::new(),
            children: vec![],
            dir,
        };
        let (h, r) = (&world.host, &world.remote);
        let script = format!(
            "set -e
            ip netns add {h}; ip netns add {r}
            # No DAD on the world's links: a tentative link-local address cannot send neighbour
            # solicitations, so the first IPv6 packets right after start-up would fail with
            # EHOSTUNREACH (seen once in CI).
            for n in {h} {r}; do ip netns exec $n sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0; done
            ip -n {h} link add up0 type veth peer name dn0 netns {r}
            ip -n {h} link set lo up; ip -n {r} link set lo up
            ip -n {r} addr add 198.51.100.1/24 dev dn0; ip -n {r} addr add 2001:db8:1::1/64 dev dn0 nodad
            ip -n {r} addr add 203.0.113.1/32 dev lo; ip -n {r} addr add 2001:db8:2::1/128 dev lo
            ip -n {h} addr add 198.51.100.2/24 dev up0; ip -n {h} addr add 2001:db8:1::2/64 dev up0 nodad
            ip -n {h} link set up0 up; ip -n {r} link set dn0 up
            ip -n {h} route add default via 198.51.100.1; ip -n {h} -6 route add default via 2001:db8:1::1
            ip netns exec {h} sysctl -qw net.ipv4.ping_group_range='0 2147483647'"
        );
        sh_ok(&script);
        world
    }

    /// Creates an empty guest namespace (`ip netns add`).
    pub fn add_guest(&mut self) -> String {
        let name = self.host.replace("fwt-h-", "fwt-g-");
        sh_ok(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        self.guest = Some(name.clone());
        name
    }

    /// Creates one more empty guest namespace, for a second forwarder on the same host.
    pub fn add_another_guest(&mut self) -> String {
        let name = format!(
            "{}-{}",
            self.host.replace("fwt-h-", "fwt-g-"),
            self.others.len() + 2
        );
        sh_ok(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        self.others.push(name.clone());
        name
    }

    /// Runs `cmd` in namespace `ns` and returns its standard output; panics with its output
    /// and forwarder's log `log` when it fails.
    pub fn run_ok(&self, ns: &str, cmd: &str, log: &std::path::Path) -> String {
        let out = self.run_in(ns, cmd);
        assert!(
            out.status.success(),
            "{cmd} failed: {}{}\nforwarder log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            read(log)
        );
        text(&out.stdout)
    }

    /// Sends `line` from namespace `ns` to socat address `address` and waits up to 2 s for
    /// what comes back (`echo LINE | socat -T2 - ADDRESS`).
    #[must_use]
    pub fn socat(&self, ns: &str, line: &str, address: &str) -> Output {
        self.run_in(ns, &format!("echo {line} | socat -T2 - {address}"))
    }

    /// Asserts that socat address `address`, reached from namespace `ns`, echoes `line`
    /// back; the failure shows socat's errors and forwarder's log `log`.
    pub fn assert_echoes(&self, ns: &str, line: &str, address: &str, log: &std::path::Path) {
        let out = self.socat(ns, line, address);
        assert_eq!(
            text(&out.stdout).trim(),
            line,
            "{address}: {}\n{}",
            text(&out.stderr),
            read(log)
        );
    }

    /// Runs `script` with `sh -c` inside namespace `ns`.
    #[must_use]
    pub fn run_in(&self, ns: &str, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", script])
            .output()
            .expect("ip netns exec")
    }

    /// Starts forwarder in the host namespace attached to the guest, with a log file.
    /// Waits until the tap exists in the guest.
    pub fn start_attached(&mut self, extra: &[&str]) -> (u32, PathBuf) {
        let guest = self.guest.clone().expect("add_guest first");
        self.start_attached_to(&guest, "forwarder.log", extra)
    }

    /// Like [`World::start_attached`], for guest namespace `guest`, logging to `log_name`
    /// in the scratch directory.
    pub fn start_attached_to(
        &mut self,
        guest: &str,
        log_name: &str,
        extra: &[&str],
    ) -> (u32, PathBuf) {
        let guest = guest.to_string();
        let log = self.dir.join(log_name);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host])
            .arg(forwarder_bin())
            .args(["--netns", &guest, "-l"])
            .arg(&log)
            .args(extra)
            .args(mode_args())
            .stdin(Stdio::null())
            .spawn()
            .expect("start forwarder");
        let pid = child.id();
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.run_in(&guest, "ip link show tap0").status.success() {
            assert!(
                Instant::now() < deadline,
                "tap0 did not appear; log:\n{}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (pid, log)
    }

    /// Runs forwarder in the host namespace in spawn mode: `forwarder ARGS -- sh -c SCRIPT`.
    #[must_use]
    pub fn spawn(&self, args: &[&str], script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.host])
            .arg(forwarder_bin())
            .args(args)
            .args(mode_args())
            .args(["--", "sh", "-c", script])
            .output()
            .expect("run forwarder")
    }

    /// Kills every process left in the guest namespace (DHCP clients' daemons).
    pub fn kill_guest_processes(&self) {
        if let Some(g) = &self.guest {
            kill_all_in(g);
        }
    }

    /// Starts a long-running process (a server) in namespace `ns` with `sh -c SCRIPT`; the
    /// script should `exec` the server so that killing the child kills it. Killed with the
    /// world.
    pub fn serve(&mut self, ns: &str, script: &str) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start server");
        self.children.push(child);
    }

    /// Starts the TCP echo server (`tests/scripts/tcp_echo.py`, all addresses) on `port` in
    /// `ns` and waits until it listens.
    pub fn tcp_echo(&mut self, ns: &str, port: u16) {
        let script = scripts().join("tcp_echo.py");
        self.serve(ns, &format!("exec python3 {} {port}", script.display()));
        self.wait_listening(ns, port, false);
    }

    /// Starts the UDP echo server (`tests/scripts/udp_echo.py`) on `addr`:`port` in `ns` and
    /// waits until it is bound.
    pub fn udp_echo(&mut self, ns: &str, addr: &str, port: u16) {
        let script = scripts().join("udp_echo.py");
        self.serve(
            ns,
            &format!("exec python3 {} {addr} {port}", script.display()),
        );
        self.wait_listening(ns, port, true);
    }

    /// Waits until something listens on `port` (TCP, or UDP with `udp`) in `ns`.
    pub fn wait_listening(&self, ns: &str, port: u16, udp: bool) {
        let flag = if udp { "-uln" } else { "-tln" };
        let deadline = Instant::now() + Duration::from_secs(10);
        let script = format!("ss -H {flag} | grep -q ':{port} '");
        while !self.run_in(ns, &script).status.success() {
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in {ns}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGUSR1 to forwarder and returns the stats line it logs.
    #[must_use]
    pub fn stats(pid: u32, log: &std::path::Path) -> String {
        let _ = Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = read(log).lines().rev().find(|l| l.contains("stats: ")) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no stats line in log:\n{}",
                read(log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_guest_processes();
        kill_all_in(&self.remote);
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for other in &self.others {
            kill_all_in(other);
        }
        for ns in [Some(&self.host), Some(&self.remote), self.guest.as_ref()]
            .into_iter()
            .flatten()
            .chain(self.others.iter())
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills every process in namespace `ns` (servers a test started there).
fn kill_all_in(ns: &str) {
    let _ = Command::new("sh")
        .args(["-c", &format!("ip netns pids {ns} | xargs -r kill -9")])
        .status();
}

/// Runs `forwarder ctl --api-socket API ARGS…` against a running forwarder.
#[must_use]
pub fn ctl(api: &std::path::Path, args: &[&str]) -> Output {
    Command::new(forwarder_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()
        .expect("run forwarder ctl")
}

/// The counters `forwarder ctl stats` prints (`NAME VALUE` lines), one snapshot.
#[must_use]
pub fn api_stats(api: &std::path::Path) -> String {
    text(&ctl(api, &["stats"]).stdout)
}

/// Counter `name` of an [`api_stats`] snapshot; panics when it is missing.
#[must_use]
pub fn api_counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{stats}"))
}

/// Extra forwarder arguments for a whole test run, from `FORWARDER_TEST_ARGS` (split on
/// spaces): `cargo xtask run-integration` runs the foundation tests a second time with
/// `--ebpf`, so everything they check must hold in that mode too.
#[must_use]
pub fn mode_args() -> Vec<String> {
    std::env::var("FORWARDER_TEST_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Whether this run passes `--ebpf` to every forwarder (`FORWARDER_TEST_ARGS`): flows to
/// the remote are then carried by the kernel's fast path, not the engine.
#[must_use]
pub fn ebpf_mode() -> bool {
    mode_args().iter().any(|a| a == "--ebpf")
}

/// The tap MTU forwarder gives the guest in this run's mode: 65520, or with `--ebpf` (whose
/// fast path hands packets to the uplink as they are) the world's uplink MTU, 1500.
#[must_use]
pub fn expected_mtu() -> u32 {
    if ebpf_mode() { 1500 } else { 65520 }
}

/// The directory of the helper scripts (`tests/scripts`).
#[must_use]
pub fn scripts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

/// Runs a shell script, panicking with its output on failure.
pub fn sh_ok(script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "script failed: {script}\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Lossy UTF-8.
#[must_use]
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads a file, empty if missing.
#[must_use]
pub fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The value of counter `name` in a stats line (the log omits counters at zero, so absent
/// is 0). Panics when `name` is no counter of the engine's: a renamed counter must fail the
/// test that reads it, not turn it into one that reads 0 forever.
#[must_use]
pub fn counter(stats: &str, name: &str) -> u64 {
    assert!(
        forwarder::engine::Stats::default()
            .iter()
            .any(|(known, _)| known == name),
        "{name} is not one of the engine's counters"
    );
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::counter;

    #[test]
    fn counter_reads_a_value_and_zero_when_the_log_omits_it() {
        assert_eq!(counter("tcp_flows=3 udp_flows=1", "tcp_flows"), 3);
        assert_eq!(counter("udp_flows=1", "tcp_flows"), 0);
    }

    #[test]
    #[should_panic(expected = "tcp_flowz is not one of the engine's counters")]
    fn counter_refuses_a_name_the_engine_does_not_have() {
        let _ = counter("tcp_flows=3", "tcp_flowz");
    }
}
