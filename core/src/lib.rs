//! Every decision Framelane makes, with no Kubernetes client, no async runtime and no I/O:
//! the operator and the runners gather facts, call these functions, and apply what they
//! return. Each file answers one question:
//!
//! - [`depth`]: does a lane have room for one more job? (the one check and the one
//!   `queue_overloaded` message, used by the webhook, the controller and its backlog)
//! - [`queue`]: in what order do a lane's jobs run, and at which positions?
//! - [`index`]: which jobs hold which lane's slots, from the jobs' watch events?
//! - [`routing`]: which lane takes a new job?
//! - [`availability`]: can a lane run jobs now (fresh runners), and since when not?
//! - [`fallback`]: is a lane in fallback, why, and since when?
//! - [`timeouts`]: how long may a queued job wait; when is a runner lost; when does a finished
//!   job expire?
//! - [`lifecycle`]: what happens next to a job (admit, wait, time out, requeue, release,
//!   delete)?
//! - [`claims`]: which queued job does a runner take next?
//! - [`transitions`]: what does a job's status become at each step (admitted, claimed,
//!   progressed, completed, failed, requeued)?
//! - [`lane_status`]: what should a lane's status say, and which Events does a change imply?
//! - [`parameters`]: does a job fit its model (the fields and fixes of a 422)?
//! - [`memory`]: does a job fit a runner's GPU (each stage's peak, the largest size that fits)?
//! - [`defaults`]: what does a new job leave out that its model fills in?
//! - [`conditions`]: how a condition changes (its `lastTransitionTime`, in one place).

pub mod availability;
pub mod claims;
pub mod conditions;
pub mod defaults;
pub mod depth;
pub mod fallback;
pub mod index;
pub mod lane_status;
pub mod lifecycle;
pub mod memory;
pub mod parameters;
pub mod queue;
pub mod routing;
pub mod timeouts;
pub mod transitions;
