//! Names that several parts must agree on: labels, annotations, the finalizer, condition
//! types and reasons. Defined once here.

/// Label on runner pods and heartbeat Leases: the lane they belong to.
pub const LABEL_LANE: &str = "framelane.dev/lane";
/// Label on runner pods: the model a Dedicated lane's pod serves, or `shared`.
pub const LABEL_MODEL: &str = "framelane.dev/model";
/// Label on heartbeat Leases, marking them as runner heartbeats.
pub const LABEL_RUNNER: &str = "framelane.dev/runner";
/// Annotation on a heartbeat Lease: the model the runner has loaded now.
pub const ANNOTATION_LOADED_MODEL: &str = "framelane.dev/loaded-model";
/// Finalizer on a running VideoJob, so deleting it stops its runner before the slot is freed.
pub const JOB_FINALIZER: &str = "framelane.dev/cancel";
/// The allocator setting every runner pod carries unless its lane overrides it.
pub const ALLOC_CONF_ENV: &str = "PYTORCH_CUDA_ALLOC_CONF";
/// Expandable segments keep a model switch from fragmenting GPU memory into OOMs.
pub const ALLOC_CONF_DEFAULT: &str = "expandable_segments:True";
/// Value of [`LABEL_MODEL`] on a Shared lane's pods.
pub const SHARED_MODEL_LABEL: &str = "shared";

/// Condition types of a VideoJob.
pub mod job_condition {
    /// The job is in a lane's queue (or was).
    pub const ADMITTED: &str = "Admitted";
    /// A runner is generating the job.
    pub const RUNNING: &str = "Running";
    /// The job succeeded.
    pub const COMPLETE: &str = "Complete";
    /// The job failed.
    pub const FAILED: &str = "Failed";
}

/// Condition types of a ModelLane.
pub mod lane_condition {
    /// At least one runner of the lane has a fresh heartbeat.
    pub const AVAILABLE: &str = "Available";
    /// The lane's runner pods are all created.
    pub const PODS_READY: &str = "PodsCreated";
    /// The lane overrides PYTORCH_CUDA_ALLOC_CONF.
    pub const ALLOCATOR_OVERRIDDEN: &str = "AllocatorOverridden";
}

/// Machine-readable reasons, written to `status.reason`, conditions and Events, and used as
/// metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Admitted to a lane's queue.
    Admitted,
    /// A runner claimed the job.
    Started,
    /// The video was generated.
    Completed,
    /// The job's lane had no available runner for `maxWaitSeconds`.
    QueueWaitTimeout,
    /// The runner died mid-job too many times.
    RunnerLost,
    /// A runner died mid-job; the job went back to its place in the queue.
    Requeued,
    /// The GPU ran out of memory.
    GpuOutOfMemory,
    /// The job was deleted before it finished.
    Cancelled,
    /// The lane's queue was full.
    QueueOverloaded,
    /// The job names a model or lane that does not exist.
    LaneNotFound,
    /// Generation failed for another reason; the message says which.
    GenerationFailed,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 11] = [
        Reason::Admitted,
        Reason::Started,
        Reason::Completed,
        Reason::QueueWaitTimeout,
        Reason::RunnerLost,
        Reason::Requeued,
        Reason::GpuOutOfMemory,
        Reason::Cancelled,
        Reason::QueueOverloaded,
        Reason::LaneNotFound,
        Reason::GenerationFailed,
    ];

    /// The reason `as_str` writes as `s`, if any.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The reason as written to the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Admitted => "Admitted",
            Reason::Started => "Started",
            Reason::Completed => "Completed",
            Reason::QueueWaitTimeout => "QueueWaitTimeout",
            Reason::RunnerLost => "RunnerLost",
            Reason::Requeued => "Requeued",
            Reason::GpuOutOfMemory => "GpuOutOfMemory",
            Reason::Cancelled => "Cancelled",
            Reason::QueueOverloaded => "QueueOverloaded",
            Reason::LaneNotFound => "LaneNotFound",
            Reason::GenerationFailed => "GenerationFailed",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn every_reason_parses_back_and_nothing_else_does() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::parse("admitted"), None);
        assert_eq!(Reason::parse(""), None);
    }
}
