//! The eBPF toolchain: what building `forwarder-ebpf` needs, installed idempotently.
//!
//! * nightly's `rust-src` (the programs are built with `-Z build-std=core` for
//!   `bpfel-unknown-none`);
//! * `bpf-linker`, linked against the nightly toolchain's own LLVM 22: there is no system
//!   libLLVM here, so a prefix directory holding `lib/libLLVM.so` → the nightly sysroot's
//!   `libLLVM.so.22.1-rust-*-nightly` stands in for one, and an rpath lets the installed
//!   linker find it at run time (recipe verified on these machines, about 90 s).
//!
//! When anything here fails, the agent still builds (its `build.rs` then embeds no object)
//! and `forwarder --ebpf` says "built without eBPF support".

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{run, workspace_root};

/// Makes sure nightly rust-src and bpf-linker are present.
pub fn ensure_toolchain() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("run rustup (is the nightly toolchain installed?)")?;
    if !String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if linker_works() {
        println!("xtask: eBPF toolchain present");
        return Ok(());
    }
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .context("rustc +nightly --print sysroot")?
            .stdout,
    )
    .context("sysroot is not UTF-8")?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("read {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.22"))
        })
        .with_context(|| format!("no libLLVM.so.22* in {}", lib.display()))?;
    let prefix = workspace_root()?.join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib).context("create the LLVM prefix")?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link).context("link libLLVM.so")?;
    println!("xtask: installing bpf-linker against {}", llvm.display());
    run(Command::new("cargo")
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        ))?;
    if !linker_works() {
        bail!("bpf-linker was installed but does not run");
    }
    Ok(())
}

/// [`ensure_toolchain`], not fatal: without the toolchain the agent builds without eBPF
/// support, so a failure is said and the task goes on.
pub fn ensure_toolchain_or_say() {
    if let Err(err) = ensure_toolchain() {
        println!("xtask: eBPF toolchain unavailable, building without eBPF support: {err:#}");
    }
}

fn linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
