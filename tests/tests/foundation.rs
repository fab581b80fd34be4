//! Foundation end to end: built-in services against real clients, echo to the gateway and
//! through ping sockets to the remote, `--config-net`, unprivileged operation, bad input.
//! Each test builds its own world (see the harness) and needs root; without root they skip
//! loudly, and under `cargo xtask run-integration` they fail instead.

use std::time::Duration;

use forwarder_tests::{World, counter, forwarder_bin, privileged, read, sh_ok, text};

const PING4_REMOTE: &str = "ping -c1 -W2 203.0.113.1";
const PING6_REMOTE: &str = "ping -6 -c1 -W2 2001:db8:2::1";

fn ok(out: &std::process::Output) -> bool {
    out.status.success()
}

#[test]
fn config_net_gives_addresses_routes_and_echo_both_ways() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let (pid, log) = w.start_attached(&["--config-net"]);
    let addrs = text(
        &w.run_in(&guest, "ip -br addr show tap0; ip route; ip -6 route")
            .stdout,
    );
    assert!(addrs.contains("198.51.100.2/24"), "{addrs}");
    assert!(addrs.contains("2001:db8:1::2/64"), "{addrs}");
    assert!(
        addrs.contains("default via 198.51.100.1 dev tap0"),
        "{addrs}"
    );
    assert!(
        addrs.contains("default via 2001:db8:1::1 dev tap0"),
        "{addrs}"
    );
    let mtu = forwarder_tests::expected_mtu();
    assert!(text(&w.run_in(&guest, "ip link show tap0").stdout).contains(&format!("mtu {mtu} ")));

    // The gateway answers locally, v4 and v6.
    assert!(ok(&w.run_in(&guest, "ping -c1 -W2 198.51.100.1")));
    assert!(ok(&w.run_in(&guest, "ping -6 -c1 -W2 2001:db8:1::1")));
    // The remote answers through ping sockets...
    assert!(
        ok(&w.run_in(&guest, PING4_REMOTE)),
        "v4 remote ping failed; log:\n{}",
        read(&log)
    );
    assert!(
        ok(&w.run_in(&guest, PING6_REMOTE)),
        "v6 remote ping failed; log:\n{}",
        read(&log)
    );
    let stats = World::stats(pid, &log);
    assert!(
        counter(&stats, "echo_forwarded") >= 2 && counter(&stats, "echo_replies") >= 2,
        "{stats}"
    );
    // ...and really from the remote: take its addresses away and the pings must fail.
    sh_ok(&format!(
        "ip -n {r} addr del 203.0.113.1/32 dev lo; ip -n {r} addr del 2001:db8:2::1/128 dev lo",
        r = w.remote
    ));
    assert!(
        !ok(&w.run_in(&guest, PING4_REMOTE)),
        "v4 ping succeeded with the remote gone"
    );
    assert!(
        !ok(&w.run_in(&guest, PING6_REMOTE)),
        "v6 ping succeeded with the remote gone"
    );
}

#[test]
fn udhcpc_dhclient_and_dhcpcd_get_the_planned_ipv4_config() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let (pid, log) = w.start_attached(&["--dns", "198.51.100.53"]);
    sh_ok(&format!("ip -n {guest} link set tap0 up"));
    let dir = w.dir.display().to_string();

    // busybox udhcpc, with a script that records what it was given.
    std::fs::write(w.dir.join("udhcpc.sh"), format!("#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu\" > {dir}/udhcpc.out\nexit 0\n")).unwrap();
    let out = w.run_in(&guest, &format!("chmod +x {dir}/udhcpc.sh; timeout 15 busybox udhcpc -i tap0 -n -q -t5 -T1 -O mtu -s {dir}/udhcpc.sh"));
    let got = read(&w.dir.join("udhcpc.out"));
    assert_eq!(
        got.trim(),
        format!(
            "ip=198.51.100.2 mask=24 router=198.51.100.1 dns=198.51.100.53 mtu={}",
            forwarder_tests::expected_mtu()
        ),
        "udhcpc: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    w.kill_guest_processes();

    // ISC dhclient, its hook replaced so nothing outside the world is touched.
    std::fs::write(w.dir.join("dhclient.sh"), format!("#!/bin/sh\nenv | grep -E '^new_(ip_address|subnet_mask|routers|domain_name_servers|interface_mtu|ip6_address|ip6_prefixlen|dhcp6_name_servers)=' | sort > {dir}/dhclient.$reason\nexit 0\n")).unwrap();
    let out = w.run_in(&guest, &format!("chmod +x {dir}/dhclient.sh; timeout 20 dhclient -4 -1 -sf {dir}/dhclient.sh -lf {dir}/dh4.lease -pf {dir}/dh4.pid tap0"));
    let got = read(&w.dir.join("dhclient.BOUND"));
    for want in [
        "new_ip_address=198.51.100.2",
        "new_routers=198.51.100.1",
        "new_subnet_mask=255.255.255.0",
        "new_domain_name_servers=198.51.100.53",
    ] {
        assert!(
            got.contains(want),
            "dhclient missing {want}: {got}\n{}",
            text(&out.stderr)
        );
    }
    w.kill_guest_processes();

    // dhcpcd in test mode: prints what it would configure. Its privilege-separation helpers
    // outlive -T and would hold a pipe open, so it writes to a file and is killed after.
    let _ = w.run_in(
        &guest,
        &format!("(timeout 30 dhcpcd -T -4 -1 -t 20 --noipv4ll tap0 > {dir}/dhcpcd.out 2>&1 &)"),
    );
    let mut got = String::new();
    for _ in 0..250 {
        got = read(&w.dir.join("dhcpcd.out")).replace('\'', "");
        if got.contains("new_domain_name_servers=") && got.contains("new_ip_address=") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    w.kill_guest_processes();
    for want in [
        "new_ip_address=198.51.100.2",
        "new_routers=198.51.100.1",
        "new_domain_name_servers=198.51.100.53",
        "new_subnet_mask=255.255.255.0",
    ] {
        assert!(got.contains(want), "dhcpcd missing {want}:\n{got}");
    }
    let stats = World::stats(pid, &log);
    // udhcpc and dhclient: OFFER + ACK each; dhcpcd -T stops after the OFFER.
    assert!(counter(&stats, "dhcp_replies") >= 5, "{stats}");
}

#[test]
fn dhcpv6_and_slaac_configure_ipv6() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let (pid, log) = w.start_attached(&["--dns", "2001:db8:1::53"]);
    sh_ok(&format!("ip -n {guest} link set tap0 up"));
    // SLAAC from the router advertisement: an autoconfigured address in the host's /64 and
    // a default route learned from the RA.
    let mut seen = String::new();
    for _ in 0..100 {
        seen = text(
            &w.run_in(
                &guest,
                "ip -6 addr show dev tap0 scope global; ip -6 route show default",
            )
            .stdout,
        );
        if seen.contains("2001:db8:1:0:") && seen.contains("proto ra") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.contains("2001:db8:1:0:") && seen.contains("dynamic"),
        "no SLAAC address:\n{seen}"
    );
    assert!(
        seen.contains("default via fe80::9855:9aff:fe55:9a55"),
        "no RA default route:\n{seen}"
    );

    // dhclient -6 binds the link-local address: wait until DAD is done with it (it exits 1
    // at once on a tentative address; seen when the RA came quickly).
    for _ in 0..50 {
        let addrs = text(&w.run_in(&guest, "ip -6 addr show dev tap0").stdout);
        if addrs.contains("scope link") && !addrs.contains("tentative") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dir = w.dir.display().to_string();
    std::fs::write(w.dir.join("dhclient.sh"), format!("#!/bin/sh\nenv | grep -E '^new_(ip6_address|ip6_prefixlen|dhcp6_name_servers)=' | sort > {dir}/dhclient.$reason\nexit 0\n")).unwrap();
    let out = w.run_in(&guest, &format!("chmod +x {dir}/dhclient.sh; timeout 20 dhclient -6 -1 -sf {dir}/dhclient.sh -lf {dir}/dh6.lease -pf {dir}/dh6.pid tap0"));
    let got = read(&w.dir.join("dhclient.BOUND6"));
    assert!(
        got.contains("new_ip6_address=2001:db8:1::2"),
        "dhclient -6: {got}\n{:?} {}{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        read(&log)
    );
    assert!(
        got.contains("new_dhcp6_name_servers=2001:db8:1::53"),
        "dhclient -6: {got}"
    );
    w.kill_guest_processes();
    let stats = World::stats(pid, &log);
    assert!(
        counter(&stats, "router_adverts") >= 1 && counter(&stats, "dhcpv6_replies") >= 2,
        "{stats}"
    );
}

#[test]
fn spawned_command_runs_in_new_namespace_and_its_status_is_returned() {
    if !privileged() {
        return;
    }
    let w = World::new();
    let out = w.spawn(&["--config-net", "-q"], &format!("{PING4_REMOTE} >/dev/null && {PING6_REMOTE} >/dev/null && ip -br addr show tap0 && exit 7"));
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("198.51.100.2/24"));
}

#[test]
fn unprivileged_uid_65534_gets_the_same_service() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let remote = w.remote.clone();
    let scripts = forwarder_tests::scripts();
    w.serve(
        &remote,
        &format!(
            "exec python3 {} 7000",
            scripts.join("tcp_echo.py").display()
        ),
    );
    w.serve(
        &remote,
        &format!(
            "exec python3 {} 2001:db8:2::1 7777",
            scripts.join("udp_echo.py").display()
        ),
    );
    w.wait_listening(&remote, 7000, false);
    w.wait_listening(&remote, 7777, true);
    let conn = scripts.join("conn_client.py").display().to_string();
    let udp = scripts.join("udp_client.py").display().to_string();
    // The machine's /dev/net/tun is 0600: give the unprivileged run a private mount
    // namespace with a 0666 node bind-mounted over it, instead of changing the machine.
    let tun = w.dir.join("tun");
    let bin = w.dir.join("forwarder");
    std::fs::copy(forwarder_bin(), &bin).unwrap();
    let run = w.dir.join("run");
    sh_ok(&format!(
        "mknod -m 0666 {} c 10 200 && chmod 755 {} && mkdir -m 777 {}",
        tun.display(),
        w.dir.display(),
        run.display()
    ));
    let api = run.join("api.sock").display().to_string();
    let ctl = format!("{} ctl -s {api}", bin.display());
    // Without --config-net: the namespace configures itself with real clients, as root of
    // its own user namespace (uid 65534 outside). Scratch files go to a private tmpfs on
    // /mnt (not /tmp: the checkout and the scripts may live under /tmp).
    let script = format!(
        "mount -t tmpfs none /mnt 2>/dev/null; ip link set tap0 up
busybox udhcpc -i tap0 -n -q -t5 -T1 -s /bin/true >/dev/null 2>&1 && echo DHCP-OK
printf '#!/bin/sh\\nenv > /mnt/dh.$reason\\n' > /mnt/h.sh; chmod +x /mnt/h.sh
dhclient -4 -1 -sf /mnt/h.sh -lf /mnt/l4 -pf /mnt/p4 tap0 >/dev/null 2>&1; grep -q new_ip_address=198.51.100.2 /mnt/dh.BOUND && echo DHCLIENT4-OK
for i in $(seq 50); do ip -6 addr show dev tap0 scope link | grep -v tentative | grep -q inet6 && break; sleep 0.1; done
for i in $(seq 50); do ip -6 addr show dev tap0 | grep -q dynamic && break; sleep 0.1; done
dhclient -6 -1 -sf /mnt/h.sh -lf /mnt/l6 -pf /mnt/p6 tap0 >/dev/null 2>&1; grep -q new_ip6_address=2001:db8:1::2 /mnt/dh.BOUND6 && echo DHCLIENT6-OK
ip -6 addr show dev tap0 | grep -q dynamic && echo SLAAC-OK
ip addr add 198.51.100.2/24 dev tap0 2>/dev/null; ip route add default via 198.51.100.1 2>/dev/null
ping -c1 -W2 198.51.100.1 >/dev/null && echo GW4-OK; {PING4_REMOTE} >/dev/null && echo REMOTE4-OK
{PING6_REMOTE} >/dev/null 2>&1 || sleep 2; {PING6_REMOTE} >/dev/null && echo REMOTE6-OK
/usr/bin/python3 {conn} 203.0.113.1 7000 concurrent 20 >/dev/null && echo TCP4-OK
/usr/bin/python3 {conn} 2001:db8:2::1 7000 sequential 20 >/dev/null && echo TCP6-OK
/usr/bin/python3 {udp} 2001:db8:2::1 7777 1 65507 >/dev/null && echo UDP6-OK
/usr/bin/python3 -m http.server -b 0.0.0.0 8097 >/dev/null 2>&1 & server=$!; sleep 2.5
{ctl} list | grep -q 'tcp.auto.8097:8097' && echo AUTO-OK
{ctl} add udp-ns 5801 && echo AGENT-OK
kill $server
kill $(cat /mnt/p4 /mnt/p6) 2>/dev/null; id -u
"
    );
    let script_path = w.dir.join("guest.sh");
    std::fs::write(&script_path, script).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &w.host, "unshare", "-m", "sh", "-c"])
        .arg(format!(
            "mount --bind {tun} /dev/net/tun && exec setpriv --reuid 65534 --regid 65534 --clear-groups {bin} -q -t auto --api-socket {api} {mode} -- unshare -m sh {script}",
            tun = tun.display(),
            bin = bin.display(),
            mode = forwarder_tests::mode_args().join(" "),
            script = script_path.display()
        ))
        .output()
        .unwrap();
    let got = text(&out.stdout);
    for want in [
        "DHCP-OK",
        "DHCLIENT4-OK",
        "DHCLIENT6-OK",
        "SLAAC-OK",
        "GW4-OK",
        "REMOTE4-OK",
        "REMOTE6-OK",
        "TCP4-OK",
        "TCP6-OK",
        "UDP6-OK",
        "AUTO-OK",
        "AGENT-OK",
    ] {
        assert!(
            got.contains(want),
            "unprivileged run missing {want}:\n{got}{}",
            text(&out.stderr)
        );
    }
    // Inside its own user namespace the command is root, mapped to 65534 outside.
    assert!(got.trim_end().ends_with('0'), "{got}");
}

#[test]
fn ping_sockets_forbidden_falls_back_to_local_echo() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    sh_ok(&format!(
        "ip netns exec {} sysctl -qw net.ipv4.ping_group_range='1 0'",
        w.host
    ));
    let guest = w.add_guest();
    let (pid, log) = w.start_attached(&["--config-net"]);
    assert!(
        read(&log).contains("answering ICMP echo locally"),
        "{}",
        read(&log)
    );
    // Documented fallback: the remote's address is answered by forwarder itself.
    sh_ok(&format!(
        "ip -n {} addr del 203.0.113.1/32 dev lo",
        w.remote
    ));
    assert!(ok(&w.run_in(&guest, PING4_REMOTE)));
    let stats = World::stats(pid, &log);
    assert!(counter(&stats, "echo_local_fallback") >= 1, "{stats}");
}

#[test]
fn malformed_frames_are_dropped_counted_and_service_continues() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let (pid, log) = w.start_attached(&["--config-net"]);
    // Raw frames from the guest's own AF_PACKET socket: truncated, bad checksums, bad
    // lengths, unknown ethertypes and random garbage.
    let py = r#"
import socket, os, random
random.seed(1)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
dst = bytes.fromhex("9a559a559a55"); src = bytes.fromhex("020000000001")
ip = bytes.fromhex("4500001c0001000040010000c6336402c6336401") + bytes.fromhex("0800f7ff00000000")
frames = [dst + src + b"\x08\x00" + ip[:10],                       # truncated IPv4
          dst + src + b"\x08\x00" + ip,                            # bad IPv4 header checksum
          dst + src + b"\x88\xcc" + b"\x00" * 40,                  # LLDP: unknown ethertype
          dst + src + b"\x08\x00" + ip[:2] + b"\xff\xff" + ip[4:], # total length > frame
          dst + src + b"\x86\xdd" + b"\x60" + b"\x00" * 20]        # truncated IPv6
for f in frames * 20:
    s.send(f)
for _ in range(500):
    s.send(dst + src + bytes(random.getrandbits(8) for _ in range(random.randint(2, 200))))
"#;
    let out = w.run_in(&guest, &format!("python3 -c '{py}'"));
    assert!(ok(&out), "{}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(300));
    // Still serving: the gateway answers, the remote answers.
    assert!(ok(&w.run_in(&guest, "ping -c1 -W2 198.51.100.1")));
    assert!(ok(&w.run_in(&guest, PING4_REMOTE)));
    let stats = World::stats(pid, &log);
    assert!(counter(&stats, "drop_truncated") >= 40, "{stats}");
    assert!(counter(&stats, "drop_bad_checksum") >= 20, "{stats}");
    assert!(counter(&stats, "drop_unknown_ethertype") >= 20, "{stats}");
    assert!(
        !read(&log).contains("WARN"),
        "bad input must not log warnings:\n{}",
        read(&log)
    );
}

#[test]
fn bad_command_lines_are_refused_with_the_option_named() {
    let out = std::process::Command::new(forwarder_bin())
        .args(["--mtu", "99999", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--mtu"), "{}", text(&out.stderr));
    let out = std::process::Command::new(forwarder_bin())
        .args(["-a", "198.51.100.2", "-g", "198.51.100.2", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--gateway 198.51.100.2: is the guest's own address"),
        "{}",
        text(&out.stderr)
    );
    for (option, value) in [("--ebpf-grace", "9999"), ("--ebpf-max-flows", "0")] {
        let out = std::process::Command::new(forwarder_bin())
            .args(["--ebpf", option, value, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let said = text(&out.stderr);
        assert!(said.contains(option) && said.contains(value), "{said}");
    }
    let out = std::process::Command::new(forwarder_bin())
        .args(["--netns", "/nonexistent/netns"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/netns"),
        "{}",
        text(&out.stderr)
    );
}
