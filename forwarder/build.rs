//! Builds forwarder's TC programs (`forwarder-ebpf`, for `bpfel-unknown-none` with nightly)
//! and embeds the object. When that cannot be done — no nightly `rust-src`, no
//! `bpf-linker` (`cargo xtask ebpf-setup` installs both), `FORWARDER_NO_EBPF=1` — the agent
//! still builds, without the object, and `--ebpf` says so.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(forwarder_ebpf)");
    println!("cargo:rerun-if-env-changed=FORWARDER_NO_EBPF");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let object = out.join("forwarder-ebpf");
    let _ = std::fs::remove_file(&object);
    if std::env::var_os("FORWARDER_NO_EBPF").is_some_and(|v| v == "1") {
        println!("cargo:warning=FORWARDER_NO_EBPF=1: building without eBPF support");
        return;
    }
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
        .parent()
        .map(|p| p.join("forwarder-ebpf"))
        .unwrap_or_default();
    let package = aya_build::Package {
        name: "forwarder-ebpf",
        root_dir: root.to_str().unwrap_or_default(),
        ..Default::default()
    };
    let built = aya_build::build_ebpf([package], aya_build::Toolchain::default());
    match built {
        Ok(()) if object.is_file() => println!("cargo::rustc-cfg=forwarder_ebpf"),
        Ok(()) => println!(
            "cargo:warning=the eBPF build produced no object; building without eBPF support"
        ),
        Err(err) => println!(
            "cargo:warning=building without eBPF support ({err:#}); `cargo xtask ebpf-setup` installs the toolchain"
        ),
    }
}
