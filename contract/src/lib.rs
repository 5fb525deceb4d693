//! The runner contract, shared by the runner binary, the operator (which reads the
//! heartbeats) and the tests (which play runners), and the pod plumbing both binaries share.
//!
//! - [`heartbeat`]: a runner renews a heartbeat `Lease` (holder = its pod name, the loaded
//!   model in an annotation) every few seconds. A lane is available while one of its runners
//!   is fresh (`framelane_core::availability`). When the runner knows its pod's uid, the pod
//!   owns the Lease, so the garbage collector removes the Lease with the pod.
//! - [`claim`]: jobs are a durable queue in the API server. A runner claims the oldest Queued
//!   job of its lane with a resourceVersion precondition, so no job runs twice, then reports
//!   progress and the outcome. Every later write checks that the job is still this runner's
//!   and still Running, so a runner that was declared lost can never overwrite what happened
//!   since, and nothing overwrites Succeeded or Failed. A refused final write (an API
//!   server outage, an admission policy) is retried with backoff for as long as the job is
//!   still this runner's, so a job never stays Running after its runner finished it. The
//!   statuses written are
//!   `framelane_core::transitions`'.
//! - [`outputs`]: a job's files on the output volume. An attempt writes them to its own
//!   staging folder; they are moved into place only once the API server confirms the job is
//!   still the runner's, and removed when the job is deleted.
//! - [`serve`]: a client from a kubeconfig or the pod's account, and `/healthz`, `/readyz`,
//!   `/metrics`.
//! - [`api_errors`]: what an API error means (a conflict, a missing object).
//! - [`backoff`]: exponential backoff with jitter for retries.
//! - [`readable`]: watches that leave out (and report) an object that does not parse,
//!   instead of stalling on it.

pub mod api_errors;
pub mod backoff;
pub mod claim;
pub mod heartbeat;
pub mod outputs;
pub mod readable;
pub mod serve;

pub use claim::{ClaimedJob, ContractError, Runner};
