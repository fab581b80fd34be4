//! forwarder's TC programs: built for `bpfel-unknown-none` (see `programs`); an empty
//! placeholder on every other target, so the workspace builds on stable.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
