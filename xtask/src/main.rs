//! Project tasks. `cargo xtask run -- ARGS` runs forwarder (the main job);
//! `cargo xtask run-integration` is the whole test suite (what `.ci/run`
//! calls); `cargo xtask setup` installs what the tests need from Debian's packages and the
//! eBPF toolchain (`ebpf-setup` alone does the latter);
//! `cargo xtask bench [--quick]` measures forwarder against pasta, slirp4netns and the
//! kernel side by side (see `bench`).
//!
//! Every task does its own set-up and is idempotent, so each works on a fresh machine.

mod bench;
mod ebpf;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// Debian packages the end-to-end tests use: the real clients and tools.
const PACKAGES: &[(&str, &str)] = &[
    ("busybox", "busybox"),
    ("dhclient", "isc-dhcp-client"),
    ("dhcpcd", "dhcpcd5"),
    ("ping", "iputils-ping"),
    ("ip", "iproute2"),
    ("setpriv", "util-linux"),
    ("python3", "python3"),
    // The unprivileged test runs Debian's interpreter: uid 65534 cannot use a root-owned pyenv.
    ("/usr/bin/python3", "python3"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("socat", "socat"),
    ("dnsmasq", "dnsmasq-base"),
    ("ss", "iproute2"),
    ("tcpdump", "tcpdump"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("ebpf-setup") => ebpf::ensure_toolchain(),
        Some("run") => run_forwarder(args.get(1..).unwrap_or_default()),
        Some("run-integration") => run_integration(),
        Some("bench") => bench::run(args.get(1..).unwrap_or_default()),
        _ => {
            eprintln!(
                "usage: cargo xtask <run [-- ARGS]|setup|ebpf-setup|run-integration|bench [--quick]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The main job: the eBPF toolchain if it can be had (not fatal), then forwarder itself,
/// release build, with `args` (a leading `--` is dropped).
fn run_forwarder(args: &[String]) -> Result<()> {
    ebpf::ensure_toolchain_or_say();
    let args = match args.first().map(String::as_str) {
        Some("--") => args.get(1..).unwrap_or_default(),
        _ => args,
    };
    run(Command::new("cargo")
        .args(["run", "--release", "--package", "forwarder", "--"])
        .args(args))
}

/// Installs missing test tools with apt (root only; otherwise lists what is missing).
fn setup() -> Result<()> {
    ensure_packages(PACKAGES)?;
    ebpf::ensure_toolchain_or_say();
    Ok(())
}

/// Installs the packages of `list` whose command is missing.
fn ensure_packages(list: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        println!("xtask: test tools present");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing test tools; install as root: apt-get install {}",
            missing.join(" ")
        );
    }
    println!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Formatting, lints, unit and property tests, then the end-to-end tests in namespaces.
fn run_integration() -> Result<()> {
    setup()?;
    sweep_stale_namespaces();
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo").args(["build", "--package", "forwarder"]))?;
    let mut unit = Command::new("cargo");
    unit.args(["test", "--workspace", "--exclude", "forwarder-tests"]);
    if is_root() {
        // The eBPF program tests (BPF_PROG_TEST_RUN) need root: here they must run.
        unit.env("FORWARDER_REQUIRE_PRIVILEGED", "1");
    }
    run(&mut unit)?;
    let mut e2e = Command::new("cargo");
    e2e.args([
        "test",
        "--package",
        "forwarder-tests",
        "--",
        "--test-threads=2",
    ]);
    if is_root() {
        // CI runs as root: privileged tests must run there, never skip.
        e2e.env("FORWARDER_REQUIRE_PRIVILEGED", "1");
    } else {
        println!("xtask: not root: end-to-end tests will skip (they need to create namespaces)");
    }
    let mut result = run(&mut e2e);
    if result.is_ok() && is_root() {
        // Everything the foundation and translation tests check must hold with the eBPF
        // programs loaded and the fast path carrying the flows to the remote.
        println!("xtask: the foundation and translation tests again, with --ebpf");
        result = run(Command::new("cargo")
            .args([
                "test",
                "--package",
                "forwarder-tests",
                "--test",
                "foundation",
                "--test",
                "translation",
                "--",
                "--test-threads=2",
            ])
            .env("FORWARDER_REQUIRE_PRIVILEGED", "1")
            // A short grace period: the tests wait for closed flows to leave the table.
            .env("FORWARDER_TEST_ARGS", "--ebpf --ebpf-grace 1"));
    }
    sweep_stale_namespaces();
    result
}

/// Deletes test namespaces a killed run may have left (names start with `fwt-`).
fn sweep_stale_namespaces() {
    if !is_root() {
        return;
    }
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if name.starts_with("fwt-") || name.starts_with("fwb-") {
            let _ = Command::new("sh")
                .args(["-c", &format!("ip netns pids {name} | xargs -r kill -9")])
                .status();
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            println!("xtask: removed stale namespace {name}");
        }
    }
}

/// The workspace root (the parent of `xtask/`).
fn workspace_root() -> Result<std::path::PathBuf> {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
