//! `--ebpf` end to end: ARP and NDP answered in the kernel (the BPF counters rise, the
//! userspace services stay at zero), the honest fallback in every case that cannot load, and
//! nothing left attached after `kill -9`. Root only (CI); without root they skip loudly
//! (fail under xtask).

// The helpers below run only inside tests: a failed call is a failed test.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use forwarder_tests::{World, api_counter, api_stats, forwarder_bin, privileged, read, text};

#[test]
fn arp_and_ndp_are_answered_in_the_kernel() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    let api = w.dir.join("api.sock");
    let (_pid, log) = w.start_attached(&[
        "--config-net",
        "--ebpf",
        "--api-socket",
        &api.display().to_string(),
    ]);
    wait_serving(&log);
    assert!(
        read(&log).contains("eBPF: programs attached") && read(&log).contains("TCX"),
        "{}",
        read(&log)
    );
    assert!(attached(&w, &guest).contains("egress tap_egress"));
    // The guest resolves the gateway (v4 and v6) and another on-link address.
    let out = w.run_in(
        &guest,
        "ping -c1 -W2 198.51.100.1 && ping -c1 -W2 2001:db8:1::1 && ip neigh show dev tap0",
    );
    let neigh = text(&out.stdout);
    assert!(
        out.status.success(),
        "{neigh}{}\n{}",
        text(&out.stderr),
        read(&log)
    );
    assert!(
        neigh.contains("198.51.100.1 lladdr 9a:55:9a:55:9a:55")
            && neigh.contains("2001:db8:1::1 lladdr 9a:55:9a:55:9a:55"),
        "{neigh}"
    );
    let s = api_stats(&api);
    assert!(api_counter(&s, "bpf_arp_answered") >= 1, "{s}");
    assert!(api_counter(&s, "bpf_ndp_answered") >= 1, "{s}");
    assert!(
        api_counter(&s, "bpf_tap_egress_frames") > api_counter(&s, "bpf_passed"),
        "{s}"
    );
    assert_eq!(
        api_counter(&s, "arp_replies"),
        0,
        "userspace answered ARP: {s}"
    );
    assert_eq!(
        api_counter(&s, "ndp_adverts"),
        0,
        "userspace answered NDP: {s}"
    );
    // What the program leaves alone still works in userspace: echo, TCP, DHCP are the
    // foundation tests' (run again with --ebpf by xtask).
}

#[test]
fn kill_9_leaves_nothing_attached() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let guest = w.add_guest();
    // A persistent tap forwarder reuses: it survives forwarder, so what stays attached to it
    // can be looked at afterwards.
    forwarder_tests::sh_ok(&format!(
        "ip netns exec {guest} ip tuntap add mode tap tap0"
    ));
    let (pid, log) = w.start_attached(&["--config-net", "--ebpf"]);
    wait_serving(&log);
    let before = attached(&w, &guest);
    assert!(
        before.contains("egress tap_egress"),
        "{before}\n{}",
        read(&log)
    );
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = attached(&w, &guest);
        if after.trim() == "none" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still attached after kill -9:\n{after}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And with a tap forwarder created itself, the device goes with it.
    let mut w2 = World::new();
    let guest2 = w2.add_guest();
    let (pid2, _log2) = w2.start_attached(&["--config-net", "--ebpf"]);
    Command::new("kill")
        .args(["-9", &pid2.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while w2.run_in(&guest2, "ip link show tap0").status.success() {
        assert!(Instant::now() < deadline, "tap0 left behind after kill -9");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until forwarder logs that it serves (the tap appears before the programs attach).
fn wait_serving(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read(log).contains("forwarding tap=") {
        assert!(Instant::now() < deadline, "not serving:\n{}", read(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What is attached to the guest's tap0 with TCX (`forwarder ebpf-status`).
fn attached(w: &World, guest: &str) -> String {
    let out = w.run_in(
        guest,
        &format!("{} ebpf-status tap0", forwarder_bin().display()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The one `--ebpf` line in `stderr`, asserting there is exactly one.
fn one_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("--ebpf")).collect();
    assert_eq!(lines.len(), 1, "expected one --ebpf line:\n{stderr}");
    lines[0].to_string()
}

#[test]
fn inside_a_user_namespace_it_falls_back_with_one_line() {
    if !privileged() {
        return;
    }
    let w = World::new();
    let out = w.run_in(
        &w.host,
        &format!(
            "unshare -Ur {} -q --ebpf -- sh -c 'ip link show tap0 >/dev/null && exit 3'",
            forwarder_bin().display()
        ),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "the command's status: {}",
        text(&out.stderr)
    );
    let line = one_line(&text(&out.stderr));
    assert!(line.contains("user namespace"), "{line}");
}

#[test]
fn unprivileged_user_falls_back_with_one_line() {
    if !privileged() {
        return;
    }
    let w = World::new();
    // The machine's /dev/net/tun is 0600: a private mount namespace with a 0666 node.
    let tun = w.dir.join("tun");
    let bin = w.dir.join("forwarder");
    std::fs::copy(forwarder_bin(), &bin).unwrap();
    forwarder_tests::sh_ok(&format!(
        "mknod -m 0666 {} c 10 200 && chmod 755 {}",
        tun.display(),
        w.dir.display()
    ));
    let out = w.run_in(
        &w.host,
        &format!(
            "unshare -m sh -c 'mount --bind {} /dev/net/tun && exec setpriv --reuid 65534 --regid 65534 --clear-groups {} -q --ebpf -- sh -c \"ip link show tap0 >/dev/null && exit 4\"'",
            tun.display(),
            bin.display()
        ),
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let line = one_line(&text(&out.stderr));
    assert!(line.contains("CAP_BPF"), "{line}");
}

#[test]
fn built_without_the_object_falls_back_with_one_line() {
    if !privileged() {
        return;
    }
    // A build of the same source without the object (what a machine without the eBPF
    // toolchain gets), in its own target directory.
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/no-ebpf");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "-q", "-p", "forwarder", "--target-dir"])
        .arg(&target)
        .env("FORWARDER_NO_EBPF", "1")
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    let w = World::new();
    let out = w.run_in(
        &w.host,
        &format!(
            "{} -q --ebpf -- sh -c 'ip link show tap0 >/dev/null && exit 5'",
            target.join("debug/forwarder").display()
        ),
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let line = one_line(&text(&out.stderr));
    assert!(line.contains("built without eBPF support"), "{line}");
}
