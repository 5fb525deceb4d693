//! framelane-operator: gathers facts from the API server's caches, asks `framelane-core`
//! what to do, and applies it. See docs/architecture.md.
//!
//! - `jobs`, `lanes`: the two reconcilers (the leader's); `lanes::pods` builds runner pods.
//! - `webhook`: the admission webhook on every replica (parameters, the leader's depth
//!   hold, forwarding to the leader, certificates, TLS).
//! - `leader`: leader election; `metrics`, `events`: observability.
//! - `context`: what the reconcilers share, and the facts they gather; `run` wires it all.

pub mod config;
pub mod context;
pub mod error;
pub mod events;
pub mod jobs;
pub mod lanes;
pub mod leader;
pub mod metrics;
pub mod run;
pub mod webhook;
