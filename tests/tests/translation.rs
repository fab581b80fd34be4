//! Translation end to end: TCP and UDP from the guest to servers in the remote namespace
//! (and the host's loopback), v4 and v6, with real clients (curl, iperf3, python sockets,
//! dnsmasq), outbound policy, DNS forwarding and deterministic loss on the tap.
//! Each test builds its own world; without root they skip loudly (fail under xtask).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is a test failure"
)]

use std::time::{Duration, Instant};

use forwarder_tests::{World, counter, privileged, read, scripts, text};

const REMOTE4: &str = "203.0.113.1";
const REMOTE6: &str = "[2001:db8:2::1]";

fn script(name: &str) -> String {
    scripts().join(name).display().to_string()
}

/// A world with a guest and forwarder attached with `--config-net` plus `extra`.
fn world(extra: &[&str]) -> (World, String, u32, std::path::PathBuf) {
    let mut w = World::new();
    let guest = w.add_guest();
    let mut args = vec!["--config-net"];
    args.extend_from_slice(extra);
    let (pid, log) = w.start_attached(&args);
    (w, guest, pid, log)
}

/// TCP flows handled, by the engine or (with `--ebpf`) handed to the kernel at their SYN.
fn tcp_flows(stats: &str) -> u64 {
    counter(stats, "tcp_flows") + counter(stats, "fast_tcp_flows")
}

/// Waits until forwarder's table is empty (flows are removed once both sides closed).
fn wait_table_empty(pid: u32, log: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stats = World::stats(pid, log);
        if counter(&stats, "flows_open") == 0 {
            return stats;
        }
        assert!(Instant::now() < deadline, "flows left open: {stats}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// 100 MB down and up through curl, both families, checksums compared.
fn bulk_transfers(extra: &[&str], megabytes: usize) {
    let (mut w, guest, pid, log) = world(extra);
    let dir = w.dir.join("www");
    std::fs::create_dir_all(&dir).unwrap();
    let src = w.dir.join("src.bin");
    forwarder_tests::sh_ok(&format!(
        "head -c {megabytes}M /dev/urandom > {src} && cp {src} {www}/big.bin",
        src = src.display(),
        www = dir.display()
    ));
    let remote = w.remote.clone();
    w.serve(
        &remote,
        &format!(
            "exec python3 {} 8080 {}",
            script("http_server.py"),
            dir.display()
        ),
    );
    w.wait_listening(&remote, 8080, false);
    let want = text(
        &std::process::Command::new("sha256sum")
            .arg(&src)
            .output()
            .unwrap()
            .stdout,
    );
    let want = want.split_whitespace().next().unwrap().to_string();
    for host in [REMOTE4, REMOTE6] {
        let down = w.run_ok(
            &guest,
            &format!("curl -sSf --max-time 60 http://{host}:8080/big.bin | sha256sum"),
            &log,
        );
        assert!(down.starts_with(&want), "download via {host} corrupted");
        let up = w.run_ok(
            &guest,
            &format!(
                "curl -sSf --max-time 60 -T {} http://{host}:8080/up.bin",
                src.display()
            ),
            &log,
        );
        assert_eq!(up.trim(), want, "upload via {host} corrupted");
    }
    let stats = wait_table_empty(pid, &log);
    assert!(tcp_flows(&stats) >= 4, "{stats}");
}

#[test]
fn curl_moves_100_mb_each_way_v4_and_v6_intact() {
    if !privileged() {
        return;
    }
    bulk_transfers(&[], 100);
}

#[test]
fn tcp_survives_5_percent_loss_on_the_tap() {
    if !privileged() {
        return;
    }
    if forwarder_tests::ebpf_mode() {
        eprintln!(
            "SKIP with --ebpf: the loss hook drops tap frames, and fast-path flows never cross the tap"
        );
        return;
    }
    // Every 20th frame each way is dropped: retransmission on both sides is exercised.
    bulk_transfers(&["--drop-every", "20"], 20);
}

#[test]
fn iperf3_both_directions_v4_and_v6() {
    if !privileged() {
        return;
    }
    let (mut w, guest, _pid, log) = world(&[]);
    let remote = w.remote.clone();
    w.serve(&remote, "exec iperf3 -s -p 5201");
    w.wait_listening(&remote, 5201, false);
    for host in ["203.0.113.1", "2001:db8:2::1"] {
        for reverse in ["", "-R"] {
            let bytes = w.run_ok(&guest,
                &format!(
                    "iperf3 -c {host} -p 5201 -t 2 {reverse} -J | python3 -c \
                     'import json,sys; print(json.load(sys.stdin)[\"end\"][\"sum_received\"][\"bytes\"])'"
                ),
                &log,
            );
            let bytes: u64 = bytes.trim().parse().unwrap();
            assert!(bytes > 10_000_000, "{host} {reverse}: only {bytes} bytes");
        }
    }
}

#[test]
fn uploads_through_a_slower_uplink_lose_nothing_the_window_promised() {
    if !privileged() {
        return;
    }
    if forwarder_tests::ebpf_mode() {
        eprintln!(
            "SKIP with --ebpf: the kernel routes these flows, so the guest meets the uplink's \
             queue like any router's client (its drops are the bucket's, not forwarder's)"
        );
        return;
    }
    let (mut w, guest, pid, log) = world(&[]);
    let (host, remote) = (w.host.clone(), w.remote.clone());
    w.serve(&remote, "exec iperf3 -s -p 5201");
    w.wait_listening(&remote, 5201, false);
    // The host's uplink is the slow link: the host sockets fill and drain at its pace. Slow
    // enough that even a debug build fills them (the rate is not what is tested: with the
    // window of SO_SNDBUF − SIOCOUTQ, 50 Mbit/s cost 40 dropped segments and 13 %
    // retransmissions in 3 s).
    for (target, streams) in [("203.0.113.1", 1), ("2001:db8:2::1", 4)] {
        let rate = "50mbit";
        forwarder_tests::sh_ok(&format!(
            "ip netns exec {host} tc qdisc replace dev up0 root tbf rate {rate} burst 256kb latency 50ms"
        ));
        let out = w.run_ok(
            &guest,
            &format!(
                "iperf3 -c {target} -p 5201 -t 3 -P {streams} -J | python3 -c \
                 'import json,sys; e=json.load(sys.stdin)[\"end\"]; \
                  print(e[\"sum_received\"][\"bytes\"], e[\"sum_sent\"][\"bytes\"], e[\"sum_sent\"][\"retransmits\"])'"
            ),
            &log,
        );
        let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
        let (received, sent, retransmits) = (v[0], v[1], v[2]);
        assert!(
            received > 5_000_000,
            "{rate}: only {received} bytes arrived"
        );
        // Segments of at most the tap's MSS: a lower bound on their count.
        let mss = u64::from(forwarder_tests::expected_mtu()) - 40;
        let segments = sent / mss + 1;
        assert!(
            retransmits * 100 < segments,
            "{rate}, {streams} streams: the guest retransmitted {retransmits} of about {segments} segments"
        );
    }
    let stats = World::stats(pid, &log);
    assert_eq!(counter(&stats, "tcp_in_window_dropped"), 0, "{stats}");
}

#[test]
fn sequential_and_concurrent_connections_complete_and_table_empties() {
    if !privileged() {
        return;
    }
    let (mut w, guest, pid, log) = world(&[]);
    let remote = w.remote.clone();
    w.tcp_echo(&remote, 7000);
    let client = script("conn_client.py");
    for host in ["203.0.113.1", "2001:db8:2::1"] {
        let out = w.run_ok(
            &guest,
            &format!("python3 {client} {host} 7000 sequential 200"),
            &log,
        );
        assert_eq!(out.trim(), "ok 200");
        let out = w.run_ok(
            &guest,
            &format!("python3 {client} {host} 7000 concurrent 100"),
            &log,
        );
        assert_eq!(out.trim(), "ok 100");
    }
    let stats = wait_table_empty(pid, &log);
    assert!(tcp_flows(&stats) >= 600, "{stats}");
}

#[test]
fn refused_blackholed_denied_and_blocklisted_destinations() {
    if !privileged() {
        return;
    }
    let (mut w, guest, pid, log) = world(&[
        "--deny",
        "tcp://203.0.113.1:7001",
        "--deny",
        "udp://[2001:db8:2::1]:7002",
    ]);
    let remote = w.remote.clone();
    w.tcp_echo(&remote, 7001);
    // Nothing listens on 7999: refused at once (curl exit 7), v4 and v6.
    for host in [REMOTE4, REMOTE6] {
        let start = Instant::now();
        let out = w.run_in(&guest, &format!("curl -s --max-time 5 http://{host}:7999/"));
        assert_eq!(out.status.code(), Some(7), "{host}: {}", text(&out.stderr));
        assert!(start.elapsed() < Duration::from_secs(2), "refusal was slow");
    }
    // 203.0.113.99 is routed to the remote, which drops it silently: a timeout (exit 28).
    let out = w.run_in(
        &guest,
        "curl -s --connect-timeout 2 http://203.0.113.99:80/",
    );
    assert_eq!(
        out.status.code(),
        Some(28),
        "blackhole: {}",
        text(&out.stderr)
    );
    // Denied although a server listens there: refused, no connection reaches the remote.
    let out = w.run_in(&guest, "curl -s --max-time 5 http://203.0.113.1:7001/");
    assert_eq!(out.status.code(), Some(7), "deny rule");
    // The same port over IPv6 is not denied: the echo server answers.
    let ok = w.run_in(
        &guest,
        &format!(
            "python3 {} 2001:db8:2::1 7001 sequential 1",
            script("conn_client.py")
        ),
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    // Blocklist: an IPv4-mapped IPv6 destination is refused.
    let out = w.run_in(
        &guest,
        "curl -s --max-time 5 'http://[::ffff:203.0.113.1]:7001/'",
    );
    assert_eq!(out.status.code(), Some(7), "IPv4-mapped IPv6");
    // A denied UDP destination answers with ICMP administratively prohibited.
    let udp = w.run_in(
        &guest,
        "python3 -c 'import socket,errno\n\
         s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM); s.settimeout(2)\n\
         s.connect((\"2001:db8:2::1\",7002)); s.send(b\"x\")\n\
         try:\n  s.recv(10); print(\"answered\")\n\
         except OSError as e: print(errno.errorcode.get(e.errno, e))'",
    );
    let said = text(&udp.stdout);
    assert!(
        said.contains("EACCES") || said.contains("EHOSTUNREACH"),
        "{said}"
    );
    let stats = World::stats(pid, &log);
    assert!(counter(&stats, "tcp_denied") >= 2, "{stats}");
    assert!(counter(&stats, "udp_denied") >= 1, "{stats}");
    if !forwarder_tests::ebpf_mode() {
        // With --ebpf the refused connections are the kernel's: the remote's RST crosses.
        assert!(counter(&stats, "tcp_connect_failed") >= 2, "{stats}");
    }
}

#[test]
fn host_local_destinations_follow_enable_host() {
    if !privileged() {
        return;
    }
    // 203.0.113.50 is an address of the host namespace (its `local` table) from before
    // forwarder starts; 203.0.113.1 is beyond the host (the remote).
    for (extra, host_allowed, routing_allowed) in [
        (&[][..], true, true),
        (&["--enable-routing"][..], false, true),
        (&["--enable-host"][..], true, false),
    ] {
        let mut w = World::new();
        let host = w.host.clone();
        let remote = w.remote.clone();
        forwarder_tests::sh_ok(&format!("ip -n {host} addr add 203.0.113.50/32 dev lo"));
        let guest = w.add_guest();
        let mut args = vec!["--config-net"];
        args.extend_from_slice(extra);
        let (_pid, log) = w.start_attached(&args);
        w.serve(
            &host,
            &format!("exec python3 {} 7003", script("tcp_echo.py")),
        );
        w.serve(
            &remote,
            &format!("exec python3 {} 7003", script("tcp_echo.py")),
        );
        w.wait_listening(&host, 7003, false);
        w.wait_listening(&remote, 7003, false);
        for (addr, allowed) in [("203.0.113.50", host_allowed), (REMOTE4, routing_allowed)] {
            let out = w.run_in(
                &guest,
                &format!(
                    "python3 {} {addr} 7003 sequential 1",
                    script("conn_client.py")
                ),
            );
            assert_eq!(
                out.status.success(),
                allowed,
                "{extra:?} to {addr}: {}\n{}",
                text(&out.stderr),
                read(&log)
            );
        }
    }
}

#[test]
fn udp_echo_keeps_datagram_boundaries_v4_and_v6() {
    if !privileged() {
        return;
    }
    let (mut w, guest, pid, log) = world(&[]);
    let remote = w.remote.clone();
    for addr in ["203.0.113.1", "2001:db8:2::1"] {
        w.serve(
            &remote,
            &format!("exec python3 {} {addr} 7777", script("udp_echo.py")),
        );
    }
    w.wait_listening(&remote, 7777, true);
    for addr in ["203.0.113.1", "2001:db8:2::1"] {
        let out = w.run_ok(
            &guest,
            &format!(
                "python3 {} {addr} 7777 1 1472 16385 65507",
                script("udp_client.py")
            ),
            &log,
        );
        assert_eq!(out, "ok 1\nok 1472\nok 16385\nok 65507\n");
    }
    let stats = World::stats(pid, &log);
    assert!(counter(&stats, "reassembled") >= 2, "{stats}");
    assert!(counter(&stats, "fragments_out") >= 4, "{stats}");
    // A closed port answers with ICMP port unreachable: ECONNREFUSED in the guest.
    let out = w.run_in(
        &guest,
        "python3 -c 'import socket\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2)\n\
         s.connect((\"203.0.113.1\",7778)); s.send(b\"x\")\n\
         try:\n  s.recv(10)\nexcept ConnectionRefusedError: print(\"refused\")'",
    );
    assert_eq!(text(&out.stdout).trim(), "refused", "{}", text(&out.stderr));
}

#[test]
fn dns_forward_relays_udp_and_tcp_to_the_hosts_resolver() {
    if !privileged() {
        return;
    }
    // Once with a resolver in the remote, once with a systemd-resolved-style stub on the
    // host's 127.0.0.53.
    for stub in [false, true] {
        let mut w = World::new();
        let guest = w.add_guest();
        let (ns, listen) = if stub {
            (w.host.clone(), "127.0.0.53")
        } else {
            (w.remote.clone(), "203.0.113.1")
        };
        let resolv = w.dir.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {listen}\n")).unwrap();
        w.serve(
            &ns,
            &format!(
                "exec dnsmasq --no-daemon --no-resolv --no-hosts --user=root --port=53 \
                 --listen-address={listen} --bind-interfaces --address=/test.example/203.0.113.7"
            ),
        );
        w.wait_listening(&ns, 53, true);
        let resolv_arg = resolv.display().to_string();
        let (pid, log) = w.start_attached(&[
            "--config-net",
            "--dns-forward",
            "198.51.100.53",
            "--resolv-conf",
            &resolv_arg,
        ]);
        for transport in ["udp", "tcp"] {
            let out = w.run_ok(
                &guest,
                &format!(
                    "python3 {} 198.51.100.53 test.example {transport}",
                    script("dns_query.py")
                ),
                &log,
            );
            assert_eq!(out.trim(), "203.0.113.7", "{transport}, stub {stub}");
        }
        // The forward address is the DNS server the namespace is told about.
        assert!(read(&log).contains("dns=[198.51.100.53]"), "{}", read(&log));
        let stats = World::stats(pid, &log);
        assert!(
            counter(&stats, "udp_flows") >= 1 && counter(&stats, "tcp_flows") >= 1,
            "{stats}"
        );
    }
}

#[test]
fn map_guest_addr_and_outbound_binding() {
    if !privileged() {
        return;
    }
    // --map-guest-addr: 198.51.100.77 reaches the host's own 198.51.100.2.
    let (mut w, guest, _pid, log) = world(&["--map-guest-addr", "198.51.100.77"]);
    let host = w.host.clone();
    w.tcp_echo(&host, 7005);
    w.run_ok(
        &guest,
        &format!(
            "python3 {} 198.51.100.77 7005 sequential 2",
            script("conn_client.py")
        ),
        &log,
    );
    // --outbound binds the host socket: the remote sees that source address.
    for (arg, works) in [
        (["--outbound", "198.51.100.2"], true),
        (["--outbound", "198.51.100.99"], false),
        (["--outbound-if", "up0"], true),
        (["--outbound-if", "nosuchdev"], false),
    ] {
        let (mut w, guest, _pid, log) = world(&arg);
        let remote = w.remote.clone();
        w.tcp_echo(&remote, 7006);
        let out = w.run_in(
            &guest,
            &format!(
                "python3 {} 203.0.113.1 7006 sequential 1",
                script("conn_client.py")
            ),
        );
        assert_eq!(
            out.status.success(),
            works,
            "{arg:?}: {}\n{}",
            text(&out.stderr),
            read(&log)
        );
    }
}

#[test]
fn gateway_reaches_host_loopback_unless_no_map_gw() {
    if !privileged() {
        return;
    }
    for map in [true, false] {
        let extra: &[&str] = if map { &[] } else { &["--no-map-gw"] };
        let (mut w, guest, _pid, log) = world(extra);
        let host = w.host.clone();
        w.tcp_echo(&host, 7004);
        for gw in ["198.51.100.1", "2001:db8:1::1"] {
            let out = w.run_in(
                &guest,
                &format!(
                    "python3 {} {gw} 7004 sequential 3",
                    script("conn_client.py")
                ),
            );
            assert_eq!(
                out.status.success(),
                map,
                "gateway {gw}, map {map}: {}\n{}",
                text(&out.stderr),
                read(&log)
            );
        }
    }
}
