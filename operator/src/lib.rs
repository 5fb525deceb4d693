//! framelane-operator: the controller that turns ModelLanes into warm runner pods and
//! VideoJobs into a durable, bounded, FIFO queue per lane.
//!
//! - `queue` and `jobs::decide`: pure decisions (queue arithmetic, job transitions).
//! - `index`: watch events to in-memory queues.
//! - `jobs`, `lanes`: the two reconcilers; `lanes::pods` builds runner pods from plain data.
//! - `leader`: leader election; `metrics`, `events`: observability.
//! - `webhook`: the admission webhook (parameters, exact queue depth, certificates).
//! - `run`: wires it all together.

pub mod config;
pub mod context;
pub mod error;
pub mod events;
pub mod index;
pub mod jobs;
pub mod lanes;
pub mod leader;
pub mod metrics;
pub mod queue;
pub mod run;
pub mod webhook;
