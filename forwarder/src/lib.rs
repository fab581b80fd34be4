//! forwarder: a user-mode network forwarder for rootless containers, namespaces and VMs.
//!
//! The module map, dependency arrows and glossary are in `docs/architecture.md`.

pub mod config;
pub mod engine;
pub mod flow;
pub mod plan;
pub mod services;
pub mod wire;
