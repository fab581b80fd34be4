//! forwarder: a user-mode network forwarder for rootless containers, namespaces and VMs.
//!
//! The module map, dependency arrows and glossary are in `docs/architecture.md`.

pub mod wire;
