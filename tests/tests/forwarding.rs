//! Inbound port forwarding end to end (`-t`/`-u`): clients in the remote namespace reach
//! servers in the guest through forwarded host ports, and the servers see the clients' own
//! addresses. Each test builds its own world; without root they skip loudly (fail under
//! xtask).

use std::process::Command;

use forwarder_tests::{World, counter, forwarder_bin, privileged, read, scripts, text};

fn script(name: &str) -> String {
    scripts().join(name).display().to_string()
}

/// Runs forwarder with `option spec`, which must be refused as a usage error (exit 2);
/// returns its standard error. In the test's host namespace, and bounded: a spec that wrongly
/// parses must not leave a forwarder running.
#[allow(clippy::expect_used)] // only called from tests: a failure is a failed test
fn refused(w: &World, guest: &str, option: &str, spec: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &w.host, "timeout", "10"])
        .arg(forwarder_bin())
        .args(["--netns", guest, option, spec])
        .output()
        .expect("run ip netns exec");
    assert_eq!(out.status.code(), Some(2), "{option} {spec}");
    text(&out.stderr)
}

#[test]
fn forwarded_tcp_and_udp_ports_show_the_real_client_address() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let (pid, log) = w.start_attached(&[
        "--config-net",
        "-t",
        "8080:80,9000-9001:9100-9101",
        "-u",
        "5353:53",
    ]);
    for (proto, port) in [("tcp", 80), ("tcp", 9101), ("udp", 53)] {
        w.serve(
            &guest,
            &format!("exec python3 {} {proto} {port}", script("peer_server.py")),
        );
        w.wait_listening(&guest, port, proto == "udp");
    }
    let remote = w.remote.clone();
    // The client binds the remote's loopback address, which is neither the gateway nor on
    // the host's link: only forwarding with the real source can show it to the server.
    let cases = [
        ("TCP:198.51.100.2:8080,bind=203.0.113.1", "203.0.113.1"),
        (
            "TCP6:[2001:db8:1::2]:8080,bind=[2001:db8:2::1]",
            "2001:db8:2::1",
        ),
        ("TCP:198.51.100.2:9001,bind=203.0.113.1", "203.0.113.1"),
        ("UDP:198.51.100.2:5353,bind=203.0.113.1", "203.0.113.1"),
        (
            "UDP6:[2001:db8:1::2]:5353,bind=[2001:db8:2::1]",
            "2001:db8:2::1",
        ),
    ];
    for (address, client) in cases {
        let out = w.socat(&remote, "hi", address);
        let said = text(&out.stdout);
        assert!(
            said.starts_with(&format!("{client} ")),
            "{address}: server saw {said:?} {}\n{}",
            text(&out.stderr),
            read(&log)
        );
    }
    let stats = World::stats(pid, &log);
    assert!(counter(&stats, "inbound_tcp") >= 3, "{stats}");
    assert!(counter(&stats, "inbound_udp") >= 2, "{stats}");
}

#[test]
fn forwarded_port_carries_bulk_data_intact() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let (_pid, log) = w.start_attached(&["--config-net", "-t", "8080:80"]);
    let dir = w.dir.join("www");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("big.bin");
    forwarder_tests::sh_ok(&format!("head -c 50M /dev/urandom > {}", file.display()));
    w.serve(
        &guest,
        &format!(
            "exec python3 {} 80 {}",
            script("http_server.py"),
            dir.display()
        ),
    );
    w.wait_listening(&guest, 80, false);
    let want = text(
        &Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap()
            .stdout,
    );
    let want = want.split_whitespace().next().unwrap().to_string();
    let remote = w.remote.clone();
    for url in [
        "http://198.51.100.2:8080/big.bin",
        "http://[2001:db8:1::2]:8080/big.bin",
    ] {
        let out = w.run_in(
            &remote,
            &format!("curl -sSf --max-time 60 {url} | sha256sum"),
        );
        assert!(
            text(&out.stdout).starts_with(&want),
            "{url}: {}\n{}",
            text(&out.stderr),
            read(&log)
        );
        let up = w.run_in(
            &remote,
            &format!(
                "curl -sSf --max-time 60 -T {} {}",
                file.display(),
                url.replace("big", "up")
            ),
        );
        assert_eq!(text(&up.stdout).trim(), want, "upload to {url}");
    }
}

#[test]
fn a_port_in_use_stops_start_up_with_nothing_bound() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    w.tcp_echo(&host, 7101);
    let out = Command::new("ip")
        .args(["netns", "exec", &host])
        .arg(forwarder_bin())
        .args(["--netns", &guest, "-t", "7100-7102"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("forward tcp port 7101") && err.contains("in use"),
        "{err}"
    );
    let listening = text(&w.run_in(&host, "ss -Htln").stdout);
    assert!(
        !listening.contains(":7100 ") && !listening.contains(":7102 "),
        "{listening}"
    );
    assert!(
        !w.run_in(&guest, "ip link show tap0").status.success(),
        "nothing was set up in the namespace"
    );
    // Bad specs are refused by the parser, naming the value.
    for (spec, names) in [
        ("70000", "70000"),
        ("5-1", "reversed"),
        ("auto,80:81", "same port"),
        ("all,auto", "exclude each other"),
    ] {
        let err = refused(&w, &guest, "-t", spec);
        assert!(err.contains(names), "{err}");
    }
}

#[test]
fn tcp_ns_splices_namespace_loopback_to_host_loopback() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    w.tcp_echo(&host, 7200);
    let sum = w.dir.join("received.sha256");
    w.serve(
        &host,
        &format!(
            "exec sh -c 'socat -u TCP-LISTEN:7201,bind=127.0.0.1 - | sha256sum > {}'",
            sum.display()
        ),
    );
    w.wait_listening(&host, 7201, false);
    let (_pid, log) = w.start_attached(&["--config-net", "-T", "7300:7200,7301:7201"]);
    // Both loopback families in the namespace reach the host's loopback.
    for addr in ["127.0.0.1", "::1"] {
        let out = w.run_in(
            &guest,
            &format!(
                "python3 {} {addr} 7300 concurrent 20",
                script("conn_client.py")
            ),
        );
        assert!(
            out.status.success(),
            "{addr}: {}\n{}",
            text(&out.stderr),
            read(&log)
        );
    }
    // 1 GB through the splice path, checksum compared.
    let file = w.dir.join("gig.bin");
    forwarder_tests::sh_ok(&format!("head -c 1000M /dev/urandom > {}", file.display()));
    let want = text(
        &Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap()
            .stdout,
    );
    let out = w.run_in(
        &guest,
        &format!("socat -u FILE:{} TCP:127.0.0.1:7301", file.display()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !read(&sum).contains(' ') {
        assert!(std::time::Instant::now() < deadline, "no checksum written");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        read(&sum).split_whitespace().next(),
        want.split_whitespace().next(),
        "1 GB through splice corrupted"
    );
    // Spliced, not translated: the gigabyte never crossed the tap.
    let tap_bytes: u64 = text(
        &w.run_in(&guest, "cat /sys/class/net/tap0/statistics/tx_bytes")
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    assert!(
        tap_bytes < 10_000_000,
        "{tap_bytes} bytes went over the tap"
    );
}

#[test]
fn remote_forward_carries_any_guest_side_address_to_a_host_service() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    w.tcp_echo(&host, 7401);
    w.udp_echo(&host, "127.0.0.1", 5401);
    // The firewall does not apply to remote forwards: the guest-side addresses are denied.
    let (_pid, log) = w.start_attached(&[
        "--config-net",
        "--deny",
        "203.0.113.0/24,[2001:db8:77::/48]",
        "--remote-forward",
        "203.0.113.77:7400:127.0.0.1:7401",
        "--remote-forward",
        "[2001:db8:77::7]:7400:[::1]:7401",
        "--remote-forward",
        "udp://203.0.113.77:5400:127.0.0.1:5401",
    ]);
    for (address, what) in [
        ("TCP:203.0.113.77:7400", "v4 tcp"),
        ("TCP6:[2001:db8:77::7]:7400", "v6 tcp"),
        ("UDP:203.0.113.77:5400", "v4 udp"),
    ] {
        w.assert_echoes(&guest, &format!("ping-{what}"), address, &log);
    }
    // Other ports of the denied prefix stay denied.
    let out = w.run_in(
        &guest,
        "socat -T2 - TCP:203.0.113.77:7401,connect-timeout=2 </dev/null",
    );
    assert!(!out.status.success(), "a denied destination was reached");
    // Bad specs name the bad part.
    for (spec, names) in [("sctp://80", "sctp"), ("x:80", "\"x\""), ("0", "\"0\"")] {
        let err = refused(&w, &guest, "--remote-forward", spec);
        assert!(err.contains(names), "{err}");
    }
}

#[test]
fn all_forwards_every_free_port_below_the_ephemeral_range() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    w.tcp_echo(&host, 7101);
    // Restricted to a range: the port in use is skipped, not fatal.
    let (_pid, log) = w.start_attached(&["--config-net", "-t", "7000-7200,all,~7199"]);
    w.serve(
        &guest,
        &format!("exec python3 {} tcp 7150", script("peer_server.py")),
    );
    w.wait_listening(&guest, 7150, false);
    let listening = text(&w.run_in(&host, "ss -Htln").stdout);
    let forwarded = (7000..=7200)
        .filter(|p| {
            listening.contains(&format!("]:{p} ")) || listening.contains(&format!("*:{p} "))
        })
        .count();
    assert_eq!(
        forwarded, 200,
        "7000-7200 minus 7199, 7101 bound by the echo server\n{listening}"
    );
    assert!(read(&log).contains("bound=199 skipped=1"), "{}", read(&log));
    let out = w.socat(&w.remote, "hi", "TCP:198.51.100.2:7150,bind=203.0.113.1");
    assert!(
        text(&out.stdout).starts_with("203.0.113.1 "),
        "{}",
        read(&log)
    );
    // The whole range: one socket per port, so it needs a hard open-file limit above the
    // ephemeral start; below that, it forwards what the limit allows and says so (this
    // machine's hard limit is 20000, and root here may not raise it).
    let out = w.run_in(
        &host,
        &format!(
            "ulimit -Sn 1024; {} --netns {guest} --ns-ifname tap9 -q -t all & pid=$!; sleep 3; echo LISTEN $(ss -Htln | wc -l); echo HARD $(ulimit -Hn); kill $pid; wait $pid; echo EXIT $?",
            forwarder_bin().display()
        ),
    );
    let said = text(&out.stdout);
    let value = |key: &str| -> u64 {
        said.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    if value("HARD ") > low + 1024 {
        assert!(value("LISTEN ") + 16 >= low, "{said}{}", text(&out.stderr));
    } else {
        assert_eq!(value("EXIT "), 0, "{said}{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("open-file limit is reached"),
            "{}",
            text(&out.stderr)
        );
        // Every descriptor the limit leaves, less the 1024 kept for flows and forwarder's
        // own few, is a forwarded port.
        assert!(
            value("LISTEN ") + 1024 + 64 >= value("HARD ") && value("LISTEN ") > 1000,
            "fewer ports than the limit allows: {said}"
        );
    }
}
