//! forwarder: a user-mode network forwarder for rootless containers, namespaces and VMs.
//!
//! The module map, dependency arrows and glossary are in `docs/architecture.md`.

pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod ebpf;
pub mod engine;
pub mod flow;
pub mod forward;
pub mod frames;
pub mod io;
pub mod netconf;
pub mod ns;
pub mod plan;
pub mod policy;
pub mod services;
pub mod sys;
pub mod wire;
