//! Forwards changed while running: the API (`--api-socket`, `forwarder ctl`), `auto`, and
//! the UDP splice path (`-U`). Each test builds its own world; without root they skip
//! loudly (fail under xtask).

// The helpers below run only inside tests: a failed call is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use forwarder_tests::{World, ctl, privileged, read, scripts, text};

fn script(name: &str) -> String {
    scripts().join(name).display().to_string()
}

/// One raw request on the API socket, as slirp4netns' clients send it.
fn raw(api: &Path, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api).unwrap();
    s.write_all(request).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn wait_for(what: &str, log: &Path, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}\n{}", read(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn api_adds_lists_and_removes_forwards_atomically_under_load() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    let api = w.dir.join("api.sock");
    let api_s = api.display().to_string();
    let (pid, log) = w.start_attached(&["--config-net", "--api-socket", &api_s, "-t", "8080:80"]);
    let www = w.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let file = www.join("big.bin");
    forwarder_tests::sh_ok(&format!("head -c 60M /dev/urandom > {}", file.display()));
    let want = text(
        &Command::new("sha256sum")
            .arg(&file)
            .output()
            .unwrap()
            .stdout,
    );
    let want = want.split_whitespace().next().unwrap().to_string();
    for port in [80, 81] {
        w.serve(
            &guest,
            &format!(
                "exec python3 {} {port} {}",
                script("http_server.py"),
                www.display()
            ),
        );
        w.wait_listening(&guest, port, false);
    }
    // A transfer in flight on the start-up forward, slowed so it spans every change below.
    let remote = w.remote.clone();
    let sum = w.dir.join("inflight.sha256");
    w.serve(
        &remote,
        &format!(
            "exec sh -c 'curl -sSf --limit-rate 12M http://198.51.100.2:8080/big.bin | sha256sum > {}'",
            sum.display()
        ),
    );
    let list = text(&ctl(&api, &["list"]).stdout);
    assert!(list.contains("1\ttcp\tcli\t8080:80"), "{list}");
    // Only the owner may connect: the socket can open ports.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&api).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "API socket mode {mode:o}");

    // Add: a range, reachable at once, from the remote.
    let out = ctl(&api, &["add", "tcp", "8081-8082:81-82"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let got = w.run_in(
        &remote,
        "curl -sSf --max-time 20 http://198.51.100.2:8081/big.bin | sha256sum",
    );
    assert!(text(&got.stdout).starts_with(&want), "{}", read(&log));

    // Invalid requests: an error each, and the table is unchanged.
    let before = text(&ctl(&api, &["list", "--json"]).stdout);
    w.tcp_echo(&host, 8090);
    for (args, names) in [
        (&["add", "tcp", "8089-8091:89-91"][..], "8090"),
        (&["add", "tcp", "8080"][..], "already forwarded (id 1)"),
        (&["add", "tcp", "70000"][..], "70000"),
        (&["add", "tcp", "0"][..], "\"0\""),
        (&["add", "sctp", "80"][..], "bad arguments.kind"),
        (&["remove", "99"][..], "no forward has id 99"),
    ] {
        let out = ctl(&api, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains(names),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    for (request, desc) in [
        (&b"{not json"[..], "bad request: cannot parse JSON"),
        (
            &br#"{"execute":"nope"}"#[..],
            "bad request: unknown execute",
        ),
        (&br#"{"arguments":{}}"#[..], "bad request: no execute found"),
    ] {
        let reply = raw(&api, request);
        assert!(reply.contains(desc), "{reply}");
    }
    assert!(raw(&api, &vec![b' '; 5000]).contains("too large message"));
    assert_eq!(
        text(&ctl(&api, &["list", "--json"]).stdout),
        before,
        "a bad request changed the table"
    );
    // Nothing of the refused range stayed bound (8089 was free, 8091 too).
    let listening = text(&w.run_in(&host, "ss -Htln").stdout);
    assert!(
        !listening.contains(":8089 ") && !listening.contains(":8091 "),
        "{listening}"
    );

    // slirp4netns' requests work on the same socket.
    let reply = raw(
        &api,
        br#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":8083,"guest_port":80}}"#,
    );
    assert!(reply.contains(r#""return":{"id":"#), "{reply}");
    let got = w.run_in(
        &remote,
        "curl -sSf --max-time 20 -o /dev/null -w '%{http_code}' http://198.51.100.2:8083/big.bin",
    );
    assert_eq!(text(&got.stdout), "200");
    assert!(raw(&api, br#"{"execute":"list_hostfwd"}"#).contains(r#""host_port":8083"#));

    // Remove: the port closes, the in-flight transfer on another forward goes on.
    let out = ctl(&api, &["remove", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = w.run_in(
        &remote,
        "curl -sS --max-time 5 http://198.51.100.2:8081/ 2>&1",
    );
    assert!(
        text(&got.stdout).contains("onnect"),
        "8081 still answers: {}",
        text(&got.stdout)
    );
    wait_for("the transfer in flight did not finish", &log, || {
        read(&sum).contains(' ')
    });
    assert!(
        read(&sum).starts_with(&want),
        "transfer in flight corrupted"
    );

    let stats = text(&ctl(&api, &["stats"]).stdout);
    assert!(
        stats.lines().any(|l| l.starts_with("inbound_tcp ")),
        "{stats}"
    );
    // A flood of idle clients is bounded (64 served at once, the rest closed) and timed out
    // after 5 s; then the API answers again.
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();
    let idle: Vec<_> = (0..200)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&api).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let during = fds();
    assert!(
        during <= before + 64,
        "{before} fds before the flood, {during} during it"
    );
    std::thread::sleep(Duration::from_secs(5));
    drop(idle);
    let out = ctl(&api, &["list"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        read(&log)
    );
}

#[test]
fn api_adds_namespace_side_forwards_through_the_agent() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    w.tcp_echo(&host, 7501);
    w.udp_echo(&host, "127.0.0.1", 5601);
    let api = w.dir.join("api.sock");
    let (_pid, log) =
        w.start_attached(&["--config-net", "--api-socket", &api.display().to_string()]);
    for (kind, spec) in [("tcp-ns", "7500:7501"), ("udp-ns", "5600:5601")] {
        let out = ctl(&api, &["add", kind, spec]);
        assert!(
            out.status.success(),
            "{kind}: {}\n{}",
            text(&out.stderr),
            read(&log)
        );
    }
    for (address, what) in [
        ("TCP:127.0.0.1:7500", "tcp"),
        ("TCP6:[::1]:7500", "tcp6"),
        ("UDP:127.0.0.1:5600", "udp"),
    ] {
        w.assert_echoes(&guest, &format!("via-{what}"), address, &log);
    }
    // The namespace port is taken now: adding it again fails and changes nothing.
    let out = ctl(&api, &["add", "tcp-ns", "7500:7501"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already forwarded"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn auto_follows_ports_bound_in_the_namespace() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let api = w.dir.join("api.sock");
    let (_pid, log) = w.start_attached(&[
        "--config-net",
        "--api-socket",
        &api.display().to_string(),
        "-t",
        "auto,~7777",
        "-u",
        "auto",
        "-T",
        "auto",
    ]);
    // Servers started after forwarder: found within a few scans.
    w.serve(
        &guest,
        &format!("exec python3 {} tcp 8095", script("peer_server.py")),
    );
    w.serve(
        &guest,
        &format!("exec python3 {} udp 5395", script("peer_server.py")),
    );
    w.serve(
        &guest,
        &format!("exec python3 {} 7777", script("tcp_echo.py")),
    );
    w.serve(
        &guest,
        &format!("exec python3 {} 127.0.0.1 7778", script("udp_echo.py")),
    );
    let host = w.host.clone();
    wait_for("auto did not forward 8095 and 5395", &log, || {
        let l = text(&w.run_in(&host, "ss -Htuln").stdout);
        l.contains(":8095 ") && l.contains(":5395 ")
    });
    let remote = w.remote.clone();
    for address in [
        "TCP:198.51.100.2:8095,bind=203.0.113.1",
        "UDP:198.51.100.2:5395,bind=203.0.113.1",
        "TCP6:[2001:db8:1::2]:8095,bind=[2001:db8:2::1]",
    ] {
        let out = w.socat(&remote, "hi", address);
        let said = text(&out.stdout);
        assert!(
            said.starts_with("203.0.113.1 ") || said.starts_with("2001:db8:2::1 "),
            "{address}: {said:?}\n{}",
            read(&log)
        );
    }
    let list = text(&ctl(&api, &["list"]).stdout);
    assert!(list.contains("tcp\tauto\t8095:8095"), "{list}");
    // Excluded, and bound to the namespace's loopback only: not forwarded.
    let l = text(&w.run_in(&host, "ss -Htuln").stdout);
    assert!(!l.contains(":7777 ") && !l.contains(":7778 "), "{l}");
    // -T auto: a host service started now is reached from the namespace's loopback.
    w.serve(
        &host,
        &format!("exec python3 {} 7601", script("tcp_echo.py")),
    );
    wait_for("-T auto did not forward 7601", &log, || {
        text(&w.run_in(&guest, "ss -Htln").stdout).contains("127.0.0.1:7601 ")
    });
    w.assert_echoes(&guest, "to-host", "TCP:127.0.0.1:7601", &log);
    // forwarder's own host ports (the -t auto ones) are not forwarded back.
    assert!(!text(&w.run_in(&guest, "ss -Htln").stdout).contains("127.0.0.1:8095 "));
    // An auto entry is not removed by hand.
    let id = list
        .lines()
        .find(|l| l.contains("8095"))
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    let out = ctl(&api, &["remove", &id]);
    assert!(
        text(&out.stderr).contains("follows auto"),
        "{}",
        text(&out.stderr)
    );
    // The server goes away: so does the forward.
    let _ = w.run_in(&guest, "pkill -f 'peer_server.py tcp 8095'");
    wait_for("auto did not remove 8095", &log, || {
        !text(&w.run_in(&host, "ss -Htln").stdout).contains(":8095 ")
    });
    assert!(!text(&ctl(&api, &["list"]).stdout).contains("8095"));
}

#[test]
fn udp_ns_relays_namespace_loopback_to_host_loopback() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let host = w.host.clone();
    w.serve(
        &host,
        &format!("exec python3 {} 127.0.0.1 5701", script("udp_echo.py")),
    );
    w.udp_echo(&host, "::1", 5701);
    let (_pid, log) = w.start_attached(&["--config-net", "-U", "5700:5701"]);
    for (address, what) in [("UDP:127.0.0.1:5700", "v4"), ("UDP6:[::1]:5700", "v6")] {
        w.assert_echoes(&guest, &format!("dgram-{what}"), address, &log);
    }
    // Many datagrams, many sizes, from several clients at once: every one comes back whole.
    w.run_ok(
        &guest,
        &format!("python3 {0} 127.0.0.1 5700 1 100 1472 9000 16385 65507 & python3 {0} ::1 5700 1 100 1472 9000 16385 65507 & wait", script("udp_client.py")),
        &log,
    );
    // Relayed, not translated: nothing crossed the tap.
    let tap: u64 = text(
        &w.run_in(&guest, "cat /sys/class/net/tap0/statistics/tx_bytes")
            .stdout,
    )
    .trim()
    .parse()
    .unwrap();
    assert!(tap < 100_000, "{tap} bytes went over the tap");
}
