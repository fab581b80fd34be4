//! The pasta face, driven as podman 5 and rootlesskit 2 drive pasta (`../shared/COMPAT.md`).
//!
//! The binary under test is a link named `pasta` to forwarder. Set `FACES_PASTA` to another
//! pasta (the upstream build in `../shared/peers/`, through a link named `pasta`) to run the
//! same tests against it as the control; `docs/faces.md` lists where they differ.
//!
//! Every test adds `--runas 0:0` (upstream pasta run as root otherwise drops to nobody; for
//! forwarder it names the user it already is) and `--dns-host` in the test world (so that
//! no query goes to this machine's own resolver).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is a test failure"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forwarder_tests::{World, forwarder_bin, privileged, read, scripts, text};

/// The `pasta` under test.
fn pasta(w: &World) -> PathBuf {
    if let Some(p) = std::env::var_os("FACES_PASTA").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let link = w.dir.join("pasta");
    if !link.exists() {
        std::os::unix::fs::symlink(forwarder_bin(), &link).expect("link pasta");
    }
    link
}

/// Kills the daemon named by a PID file when the test ends, passed or not.
struct Daemon(PathBuf);

impl Daemon {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }

    fn alive(&self) -> bool {
        self.pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid))
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Starts a DNS server for `test.example` on the remote's 203.0.113.1.
fn dns_server(w: &mut World) {
    let remote = w.remote.clone();
    w.serve(
        &remote,
        "exec dnsmasq --no-daemon --no-resolv --no-hosts --user=root --port=53 \
         --listen-address=203.0.113.1 --bind-interfaces --address=/test.example/203.0.113.7",
    );
    w.wait_listening(&remote, 53, true);
}

/// Runs the pasta under test in the host namespace the way a supervisor does
/// (`out=$(pasta …)`): returns once the foreground exits *and* both of its output pipes
/// reached EOF, with how long that took. The process also inherits a third copy of the
/// output pipe as descriptor 3 (`3>&1`): a daemon that kept inherited descriptors would
/// hold the pipe open and this would not return.
fn start(w: &World, args: &[&str]) -> (std::process::Output, Duration) {
    start_env(w, &[], args)
}

/// [`start`] with environment variables set.
fn start_env(w: &World, env: &[(&str, &str)], args: &[&str]) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = Command::new("ip")
        .envs(env.iter().copied())
        .args([
            "netns",
            "exec",
            &w.host,
            "sh",
            "-c",
            "exec \"$0\" \"$@\" 3>&1",
        ])
        .arg(pasta(w))
        .args(["--runas", "0:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pasta");
    (out, started.elapsed())
}

/// Asserts that the foreground of `what` exited 0, showing what it printed if not.
fn assert_started(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn podman_5_argv_backgrounds_serves_and_ends_with_the_namespace() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    dns_server(&mut w);
    let pid_file = w.dir.join("pasta.pid");
    let daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    let netns = format!("/run/netns/{guest}");
    let (out, took) = start(
        &w,
        &[
            "--config-net",
            "-t",
            "8080",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--dns-forward",
            "169.254.1.1",
            "--no-map-gw",
            "--quiet",
            "--netns",
            &netns,
            "--map-guest-addr",
            "169.254.1.2",
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "podman");
    println!("foreground returned with its pipes closed after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        daemon.alive(),
        "no daemon behind {}: {}",
        pid_file.display(),
        read(&log)
    );
    // The namespace has the host's address and default routes.
    let addrs = w.run_ok(&guest, "ip -o addr show; ip route; ip -6 route", &log);
    assert!(addrs.contains("198.51.100.2/24"), "{addrs}");
    assert!(addrs.contains("default via 198.51.100.1"), "{addrs}");
    // The published port reaches a server inside from the remote.
    w.tcp_echo(&guest, 8080);
    w.assert_echoes(
        &w.remote.clone(),
        "published",
        "TCP:198.51.100.2:8080",
        &log,
    );
    // And from the host itself (`curl localhost:8080`): from its loopback, both families,
    // and from the address it shares with the namespace.
    let host = w.host.clone();
    w.assert_echoes(&host, "host-lo", "TCP:127.0.0.1:8080", &log);
    w.assert_echoes(&host, "host-lo6", "TCP:[::1]:8080", &log);
    w.assert_echoes(&host, "host-own", "TCP:198.51.100.2:8080", &log);
    // DNS to the --dns-forward address is answered by the host's resolver.
    let answer = w.run_ok(
        &guest,
        &format!(
            "python3 {} 169.254.1.1 test.example udp",
            scripts().join("dns_query.py").display()
        ),
        &log,
    );
    assert_eq!(answer.trim(), "203.0.113.7");
    // --map-guest-addr reaches the host's own address.
    let host = w.host.clone();
    w.tcp_echo(&host, 7005);
    w.assert_echoes(&guest, "to-host", "TCP:169.254.1.2:7005", &log);
    // --no-map-gw: the gateway address is the real gateway (a server on the remote's .1).
    let remote = w.remote.clone();
    w.tcp_echo(&remote, 7006);
    w.assert_echoes(&guest, "to-gateway", "TCP:198.51.100.1:7006", &log);
    // Deleting the namespace ends the daemon within a second.
    let deleted = Instant::now();
    assert!(
        Command::new("ip")
            .args(["netns", "del", &guest])
            .status()
            .unwrap()
            .success()
    );
    while daemon.alive() {
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "still running 1 s after the namespace was deleted: {}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "daemon exited {:?} after the namespace went",
        deleted.elapsed()
    );
    w.guest = None;
}

#[test]
fn rootlesskit_argv_with_a_pid_and_with_namespace_paths() {
    if !privileged() {
        return;
    }
    for form in ["pid", "paths"] {
        let mut w = World::new();
        let guest = w.add_guest();
        // A process of the test's own guest namespace, as rootlesskit's child is.
        w.serve(&guest, "exec sleep 600");
        let deadline = Instant::now() + Duration::from_secs(5);
        let child = loop {
            let pids = text(
                &Command::new("ip")
                    .args(["netns", "pids", &guest])
                    .output()
                    .unwrap()
                    .stdout,
            );
            if let Some(pid) = pids.lines().next() {
                break pid.trim().to_string();
            }
            assert!(Instant::now() < deadline, "no process in {guest}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let theirs = std::fs::read_link(format!("/proc/{child}/ns/net")).unwrap();
        let ours = std::fs::metadata(format!("/run/netns/{guest}")).unwrap();
        assert_eq!(
            theirs.to_string_lossy(),
            format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&ours)),
            "PID {child} is not in the test's namespace"
        );
        let pid_file = w.dir.join("pasta.pid");
        let daemon = Daemon(pid_file.clone());
        let log = w.dir.join("pasta.log");
        let mut args = vec![
            "--stderr".to_string(),
            "--ns-ifname=tap0".into(),
            "--mtu=65520".into(),
            "--config-net".into(),
            "--address=10.0.2.100".into(),
            "--netmask=24".into(),
            "--gateway=10.0.2.2".into(),
            "--dns-forward=10.0.2.3".into(),
        ];
        // rootlesskit's two port setups: none (its own port driver), or pasta's auto with
        // host loopback reaching the namespace's loopback (its "implicit" driver).
        if form == "pid" {
            args.extend([
                "--tcp-ports=auto".to_string(),
                "--udp-ports=auto".into(),
                "--host-lo-to-ns-lo".into(),
            ]);
        } else {
            args.extend(["--tcp-ports=none".to_string(), "--udp-ports=none".into()]);
        }
        args.extend([
            "--pid".to_string(),
            pid_file.display().to_string(),
            "-l".into(),
            log.display().to_string(),
        ]);
        if form == "pid" {
            args.push(child.clone());
        } else {
            args.push(format!("--userns=/proc/{child}/ns/user"));
            args.push(format!("--netns=/proc/{child}/ns/net"));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (out, took) = start(&w, &refs);
        assert_started(&out, form);
        println!("{form}: foreground returned after {took:?}");
        assert!(daemon.alive(), "{form}: no daemon: {}", read(&log));
        let addrs = w.run_ok(&guest, "ip -o addr show tap0; ip route", &log);
        assert!(addrs.contains("10.0.2.100/24"), "{form}: {addrs}");
        assert!(addrs.contains("default via 10.0.2.2"), "{form}: {addrs}");
        let remote = w.remote.clone();
        w.tcp_echo(&remote, 7007);
        w.assert_echoes(&guest, "kit", "TCP:198.51.100.1:7007", &log);
        if form == "pid" {
            // A service on the namespace's loopback only, found by auto, reached from the
            // host's loopback.
            w.serve(
                &guest,
                "exec socat TCP-LISTEN:18091,bind=127.0.0.1,reuseaddr,fork PIPE",
            );
            w.wait_listening(&guest, 18091, false);
            let host = w.host.clone();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let out = w.socat(&host, "lo-to-lo", "TCP:127.0.0.1:18091");
                if text(&out.stdout).trim() == "lo-to-lo" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "host loopback never reached the namespace's loopback service: {}{}",
                    text(&out.stderr),
                    read(&log)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // The PID's process exits: the daemon follows.
        w.kill_guest_processes();
        let killed = Instant::now();
        while daemon.alive() {
            assert!(
                killed.elapsed() < Duration::from_secs(2),
                "{form}: still running after its PID exited: {}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("{form}: daemon exited {:?} after the PID", killed.elapsed());
    }
}

#[test]
fn a_failing_start_returns_non_zero_with_the_reason() {
    if !privileged() {
        return;
    }
    let w = World::new();
    let (out, _) = start(&w, &["--netns", "/run/netns/fwt-no-such-namespace"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("fwt-no-such-namespace"),
        "{}",
        text(&out.stderr)
    );
    let (out, _) = start(&w, &["--version"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("pasta "),
        "{}",
        text(&out.stdout)
    );
}

/// The `pesto` client: `PESTO`, or the upstream build in `../shared/peers/`.
fn pesto_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PESTO").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/pesto"),
        PathBuf::from,
    );
    path.exists().then_some(path)
}

/// Runs `pesto ARGS... CTL` in the host namespace (where the control socket is).
fn pesto(w: &World, pesto: &Path, args: &[&str], ctl: &Path) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &w.host])
        .arg(pesto)
        .args(args)
        .arg(ctl)
        .output()
        .expect("run pesto")
}

/// The HOST table as pesto lists it: the rule lines between `HOST` and `SPLICE`.
fn host_rules(listing: &str) -> Vec<String> {
    listing
        .lines()
        .skip_while(|l| l.trim() != "HOST")
        .skip(1)
        .take_while(|l| l.trim() != "SPLICE")
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn pesto_lists_adds_deletes_and_replaces_forwards_at_run_time() {
    if !privileged() {
        return;
    }
    let Some(client) = pesto_bin() else {
        println!("skipped: no pesto client (set PESTO, or provide ../shared/peers/pesto)");
        return;
    };
    let mut w = World::new();
    let guest = w.add_guest();
    let pid_file = w.dir.join("pasta.pid");
    let _daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    let ctl = w.dir.join("pasta.ctl");
    let netns = format!("/run/netns/{guest}");
    let (out, _) = start(
        &w,
        &[
            "--config-net",
            "-c",
            ctl.to_str().unwrap(),
            "-t",
            "18080",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta -c");
    for port in [18080, 18081, 18082] {
        w.tcp_echo(&guest, port);
    }
    let remote = w.remote.clone();
    let reaches = |port: u16| {
        let out = w.socat(&remote, "hello", &format!("TCP:198.51.100.2:{port}"));
        text(&out.stdout).trim() == "hello"
    };
    let list = |w: &World| {
        let out = pesto(w, &client, &[], &ctl);
        assert!(out.status.success(), "pesto: {}", text(&out.stderr));
        host_rules(&text(&out.stdout))
    };
    // The command line's rule, in pesto's own format.
    assert_eq!(list(&w), ["TCP [*]:18080  =>  18080"], "{}", read(&log));
    assert!(
        reaches(18080),
        "18080 from the command line: {}",
        read(&log)
    );
    assert!(!reaches(18081));
    // Add. pesto gets no reply; the next connection is served after the update is applied,
    // so the listing that follows sees it.
    let out = pesto(&w, &client, &["-A", "-t", "18081"], &ctl);
    assert!(out.status.success(), "pesto -A: {}", text(&out.stderr));
    assert_eq!(
        list(&w),
        ["TCP [*]:18080  =>  18080", "TCP [*]:18081  =>  18081"]
    );
    assert!(reaches(18081), "added 18081: {}", read(&log));
    // Delete: the rule pesto builds from the spec must match the stored one byte for byte.
    let out = pesto(&w, &client, &["-D", "-t", "18081"], &ctl);
    assert!(out.status.success(), "pesto -D: {}", text(&out.stderr));
    assert_eq!(list(&w), ["TCP [*]:18080  =>  18080"]);
    assert!(!reaches(18081), "deleted 18081 still forwards");
    assert!(reaches(18080));
    // Deleting what is not there fails in pesto and changes nothing.
    let out = pesto(&w, &client, &["-D", "-t", "18099"], &ctl);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Couldn't find forwarding rule to delete"),
        "{}",
        text(&out.stderr)
    );
    // Replace the table.
    let out = pesto(&w, &client, &["-t", "18082"], &ctl);
    assert!(out.status.success(), "pesto -t: {}", text(&out.stderr));
    assert_eq!(list(&w), ["TCP [*]:18082  =>  18082"]);
    assert!(reaches(18082), "replacement 18082: {}", read(&log));
    assert!(!reaches(18080), "replaced 18080 still forwards");
}

#[test]
fn pasta_port_grammar_interface_target_address_and_brackets() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let pid_file = w.dir.join("pasta.pid");
    let _daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    let pcap = w.dir.join("tap.pcap");
    let netns = format!("/run/netns/{guest}");
    let (out, _) = start(
        &w,
        &[
            "--config-net",
            "--pcap",
            pcap.to_str().unwrap(),
            "--ns-mac-addr",
            "02:00:00:00:00:42",
            // An address the host does not have: needs --freebind.
            "--freebind",
            "-t",
            "198.51.100.99/18103",
            // Only on the uplink interface.
            "-t",
            "198.51.100.2%up0/18100",
            // To another address of the namespace instead of its main one.
            "-t",
            "0.0.0.0/18101:198.51.100.77",
            // A bracketed IPv6 listening address, to another port.
            "-t",
            "[2001:db8:1::2]/18102:18100",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta with pasta's port forms");
    let links = w.run_ok(&guest, "ip -o link", &log);
    assert!(
        links.contains("02:00:00:00:00:42"),
        "--ns-mac-addr: {links}"
    );
    w.run_ok(&guest, "ip addr add 198.51.100.77/32 dev lo", &log);
    w.tcp_echo(&guest, 18100);
    w.serve(
        &guest,
        "exec socat TCP-LISTEN:18101,bind=198.51.100.77,reuseaddr,fork PIPE",
    );
    w.wait_listening(&guest, 18101, false);
    let remote = w.remote.clone();
    w.assert_echoes(&remote, "on-up0", "TCP:198.51.100.2:18100", &log);
    // The listening socket is bound to the device (SO_BINDTODEVICE), as ss shows it.
    let host = w.host.clone();
    let listening = w.run_ok(&host, "ss -Htln", &log);
    assert!(
        listening.contains("198.51.100.2%up0:18100"),
        "not bound to up0: {listening}"
    );
    assert!(
        listening.contains("198.51.100.99:18103"),
        "--freebind: {listening}"
    );
    w.assert_echoes(&remote, "to-taddr", "TCP:198.51.100.2:18101", &log);
    w.assert_echoes(&remote, "bracketed", "TCP:[2001:db8:1::2]:18102", &log);
    // --pcap recorded the tap's frames, both ways, for tcpdump.
    let host = w.host.clone();
    let seen = w.run_ok(
        &host,
        &format!(
            "tcpdump -nr {} 'tcp port 18101' 2>/dev/null",
            pcap.display()
        ),
        &log,
    );
    assert!(
        seen.contains("> 198.51.100.77.18101: Flags [S]") && seen.contains("198.51.100.77.18101 >"),
        "{seen}"
    );
}

#[test]
fn dhcp_hands_out_the_search_list_hostname_and_fqdn() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let pid_file = w.dir.join("pasta.pid");
    let _daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    let netns = format!("/run/netns/{guest}");
    let (out, _) = start(
        &w,
        &[
            "--ns-ifname",
            "tap0",
            "-S",
            "a.example b.example",
            "--dhcp-search",
            "-H",
            "box",
            "--fqdn",
            "box.a.example",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta -S -H --fqdn");
    let dir = w.dir.display().to_string();
    std::fs::write(
        w.dir.join("udhcpc.sh"),
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip hostname=$hostname search=$search\" > {dir}/udhcpc.out\nexit 0\n"
        ),
    )
    .unwrap();
    w.run_ok(
        &guest,
        &format!(
            "ip link set tap0 up; chmod +x {dir}/udhcpc.sh; timeout 15 busybox udhcpc -i tap0 -n -q -t5 -T1 -O search -O hostname -s {dir}/udhcpc.sh"
        ),
        &log,
    );
    let got = read(&w.dir.join("udhcpc.out"));
    assert!(
        got.contains("ip=198.51.100.2 hostname=box search=a.example b.example"),
        "{got}"
    );
}

#[test]
fn interface_option_takes_the_plan_from_another_host_interface() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    // A second host interface with a worse default route.
    let host = w.host.clone();
    let log = w.dir.join("pasta.log");
    let remote = w.remote.clone();
    w.run_ok(
        &host,
        &format!(
            "ip link add up1 type veth peer name dn1 netns {remote} && ip addr add 203.0.113.50/24 dev up1 && ip link set up1 up && ip -n {remote} link set dn1 up && ip route add default via 203.0.113.49 dev up1 metric 500"
        ),
        &log,
    );
    let pid_file = w.dir.join("pasta.pid");
    let _daemon = Daemon(pid_file.clone());
    let netns = format!("/run/netns/{guest}");
    let (out, _) = start(
        &w,
        &[
            "--config-net",
            "-4",
            "-i",
            "up1",
            "--ns-ifname",
            "tap0",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta -i up1");
    let addrs = w.run_ok(&guest, "ip -o -4 addr show tap0; ip route", &log);
    assert!(addrs.contains("203.0.113.50/24"), "{addrs}");
    assert!(addrs.contains("default via 203.0.113.49"), "{addrs}");
}

#[test]
fn runas_drops_to_another_user_once_set_up() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let pid_file = w.dir.join("pasta.pid");
    let daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    let netns = format!("/run/netns/{guest}");
    // `start` passes --runas 0:0 first; the last one given wins.
    let (out, _) = start(
        &w,
        &[
            "--runas",
            "65534:65534",
            "--config-net",
            "-t",
            "18300",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta --runas 65534:65534");
    let pid = daemon.pid().expect("daemon PID");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{status}");
    // Only the right to listen below port 1024 is kept (CAP_NET_BIND_SERVICE is bit 10).
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(eff, 1 << 10, "{status}");
    // Still forwarding.
    w.tcp_echo(&guest, 18300);
    let remote = w.remote.clone();
    w.assert_echoes(&remote, "as-nobody", "TCP:198.51.100.2:18300", &log);
}

#[test]
fn the_daemon_logs_to_syslog_once_in_the_background() {
    if !privileged() {
        return;
    }
    if std::env::var_os("FACES_PASTA").is_some_and(|p| !p.is_empty()) {
        println!(
            "skipped: the syslog socket's path is forwarder's test hook (pasta uses /dev/log)"
        );
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    let sock = w.dir.join("log.sock");
    let got = w.dir.join("syslog.txt");
    w.serve(
        &host,
        &format!(
            "exec python3 -c \"import socket,sys; s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM); s.bind(sys.argv[1]); f=open(sys.argv[2],'ab',0)\nwhile True: f.write(s.recv(65536)+b'\\n')\" {} {}",
            sock.display(),
            got.display()
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no syslog listener");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid_file = w.dir.join("pasta.pid");
    let daemon = Daemon(pid_file.clone());
    let netns = format!("/run/netns/{guest}");
    let (out, _) = start_env(
        &w,
        &[("FORWARDER_SYSLOG_SOCKET", sock.to_str().unwrap())],
        &[
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta without -l");
    let pid = daemon.pid().expect("daemon PID");
    // Deleting the namespace: the daemon's last words, said with no stderr left.
    assert!(
        Command::new("ip")
            .args(["netns", "del", &guest])
            .status()
            .unwrap()
            .success()
    );
    w.guest = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = read(&got);
        if text.contains(&format!("<30>pasta[{pid}]: ")) && text.contains("the namespace is gone") {
            break;
        }
        assert!(Instant::now() < deadline, "syslog got: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn splice_only_forwards_loopback_traffic_without_a_tap() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    let pid_file = w.dir.join("pasta.pid");
    let _daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    let netns = format!("/run/netns/{guest}");
    let (out, _) = start(
        &w,
        &[
            "--splice-only",
            "-t",
            "18500",
            "-T",
            "18501",
            "-u",
            "none",
            "-U",
            "none",
            "--netns",
            &netns,
            "--dns-host",
            "203.0.113.1",
            "--pid",
            pid_file.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
        ],
    );
    assert_started(&out, "pasta --splice-only");
    let links = w.run_ok(&guest, "ip -o link", &log);
    assert_eq!(links.lines().count(), 1, "only lo: {links}");
    w.serve(
        &guest,
        "exec socat TCP-LISTEN:18500,bind=127.0.0.1,reuseaddr,fork PIPE",
    );
    w.wait_listening(&guest, 18500, false);
    w.serve(
        &host,
        "exec socat TCP-LISTEN:18501,bind=127.0.0.1,reuseaddr,fork PIPE",
    );
    w.wait_listening(&host, 18501, false);
    w.assert_echoes(&host, "host-to-ns", "TCP:127.0.0.1:18500", &log);
    w.assert_echoes(&guest, "ns-to-host", "TCP:127.0.0.1:18501", &log);
}

#[test]
fn fd_option_carries_frames_over_a_socket_in_passts_protocol() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let pid_file = w.dir.join("pasta.pid");
    let daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    // The caller keeps one end of a socket pair and hands the other over as -F; it then
    // asks, in passt's framing, for the gateway's MAC address (ARP), and closes.
    let script = format!(
        r#"import socket, struct, subprocess, sys
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
fd = theirs.fileno()
r = subprocess.run(["{pasta}", "--runas", "0:0", "-F", str(fd), "-t", "none", "-u", "none",
    "-T", "none", "-U", "none", "--netns", "/run/netns/{guest}", "--dns-host", "203.0.113.1",
    "--pid", "{pid}", "-l", "{log}"], pass_fds=(fd,))
if r.returncode != 0:
    sys.exit("pasta exited %d" % r.returncode)
theirs.close()
mac = bytes.fromhex("02000000000b")
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton("198.51.100.2"),
    bytes(6), socket.inet_aton("198.51.100.1"))
frame = b"\xff" * 6 + mac + b"\x08\x06" + arp
ours.sendall(struct.pack("!I", len(frame)) + frame)
ours.settimeout(5)
def exact(n):
    b = b""
    while len(b) < n:
        c = ours.recv(n - len(b))
        if not c:
            sys.exit("closed")
        b += c
    return b
while True:
    (n,) = struct.unpack("!I", exact(4))
    f = exact(n)
    if f[12:14] == b"\x08\x06" and struct.unpack("!H", f[20:22])[0] == 2:
        print("reply", socket.inet_ntoa(f[28:32]), f[22:28].hex(), "to", f[0:6].hex())
        break
ours.close()
"#,
        pasta = pasta(&w).display(),
        guest = guest,
        pid = pid_file.display(),
        log = log.display(),
    );
    let out = w.run_in(
        &w.host,
        &format!("python3 -c '{}'", script.replace('\'', "'\\''")),
    );
    assert!(
        out.status.success(),
        "{}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        read(&log)
    );
    let said = text(&out.stdout);
    assert!(
        said.starts_with("reply 198.51.100.1 ") && said.trim_end().ends_with("to 02000000000b"),
        "{said}"
    );
    // The socket closed: the daemon ends (pasta's one-off).
    let deadline = Instant::now() + Duration::from_secs(3);
    while daemon.alive() {
        assert!(
            Instant::now() < deadline,
            "still running after its socket closed: {}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fd_option_serves_a_tap_the_caller_opened() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let remote = w.remote.clone();
    w.tcp_echo(&remote, 7010);
    let pid_file = w.dir.join("pasta.pid");
    let _daemon = Daemon(pid_file.clone());
    let log = w.dir.join("pasta.log");
    // The caller opens tap `tapf` inside the namespace and hands it over as -F.
    let script = format!(
        r#"import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", b"tapf", 0x0002 | 0x1000))
os.set_inheritable(fd, True)
os.execvp("nsenter", ["nsenter", "--net=/run/netns/{host}", "{pasta}", "--runas", "0:0",
    "-F", str(fd), "-t", "none", "-u", "none", "-T", "none", "-U", "none",
    "--netns", "/run/netns/{guest}", "--dns-host", "203.0.113.1",
    "--pid", "{pid}", "-l", "{log}"])
"#,
        host = w.host,
        pasta = pasta(&w).display(),
        guest = guest,
        pid = pid_file.display(),
        log = log.display(),
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &guest, "python3", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_started(&out, "pasta -F");
    w.run_ok(
        &guest,
        "ip addr add 198.51.100.2/24 dev tapf && ip link set tapf up && ip route add default via 198.51.100.1",
        &log,
    );
    w.assert_echoes(&guest, "via-fd", "TCP:203.0.113.1:7010", &log);
}
