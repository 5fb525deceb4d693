//! The API's vocabulary: condition types and reasons, each an enum whose variant name is the
//! string the API shows (in `status.reason`, conditions and Events) and the metric label.
//! Every such string is spelled here and nowhere else.

vocabulary! {
    /// Machine-readable reason of the job's last transition, for example `QueueWaitTimeout`,
    /// `RunnerLost`, `GpuOutOfMemory` or `Cancelled`.
    // Also the reason of the job's conditions and Events, and the `reason` label of
    // `framelane_jobs_finished_total`.
    pub enum JobReason {
        /// Admitted to a lane's queue.
        Admitted,
        /// A runner claimed the job.
        Started,
        /// The video was generated.
        Completed,
        /// The job waited `maxWaitSeconds` while its lane had no runner, and its fallback lane
        /// (if any) could not take it.
        QueueWaitTimeout,
        /// The job ran longer than its deadline (`spec.deadlineSeconds`, else its lane's
        /// `spec.queue.jobDeadlineSeconds`).
        DeadlineExceeded,
        /// The job's runner stopped heartbeating mid-job: the reason of the Warning Event of
        /// each such loss, and of the job's failure once it lost `--max-attempts` runners.
        RunnerLost,
        /// The job went back to its place in the queue: its runner was lost, or gave it back
        /// while stopping (`status.reason`; the Event of a stopping runner's give-back).
        Requeued,
        /// The job waited `maxWaitSeconds` and moved to its lane's fallback lane.
        MovedToFallback,
        /// The GPU ran out of memory.
        GpuOutOfMemory,
        /// The job's estimated GPU memory does not fit its runner's GPU in the lane's memory
        /// mode; the runner refused it before touching the GPU. The message names the limit
        /// and the largest size that fits.
        DoesNotFit,
        /// The job was deleted before it finished.
        Cancelled,
        /// The lane's queue was full.
        QueueOverloaded,
        /// The job names a model that does not exist or that no lane serves, or its lane was
        /// deleted while the job waited in it.
        LaneNotFound,
        /// The job's parameters do not fit its model (it was created while the admission
        /// webhook did not check it); the message names each field and its fix.
        InvalidParameters,
        /// Generation failed for another reason; the message says which.
        GenerationFailed,
    }
}

vocabulary! {
    /// Condition types of a VideoJob.
    pub enum JobCondition {
        /// The job is in a lane's queue (or was).
        Admitted,
        /// A runner is generating the job.
        Running,
        /// The job succeeded.
        Complete,
        /// The job failed.
        Failed,
    }
}

vocabulary! {
    /// Condition types of a ModelLane.
    pub enum LaneCondition {
        /// At least one runner of the lane has a fresh heartbeat.
        Available,
        /// Every runner pod of the lane exists.
        PodsCreated,
        /// The lane overrides PYTORCH_CUDA_ALLOC_CONF.
        AllocatorOverridden,
        /// New jobs of the lane go to its fallback lane; the reason says why.
        Fallback,
    }
}

vocabulary! {
    /// Why a ModelLane is as it is: the reason of its conditions and of its Events.
    pub enum LaneReason {
        /// Every runner has a fresh heartbeat (condition Available, Event on becoming Ready).
        Ready,
        /// Some but not all runners have a fresh heartbeat.
        Degraded,
        /// No runner has a fresh heartbeat.
        Unavailable,
        /// Every runner pod exists (condition PodsCreated).
        PodsCreated,
        /// The operator created a runner pod (Event).
        PodCreated,
        /// The API server refused a runner pod, for example a ResourceQuota (condition
        /// PodsCreated, Event).
        PodCreateRefused,
        /// The operator deleted a runner pod the lane no longer wants (Event).
        PodDeleted,
        /// `spec.runner.env` replaces the allocator setting (condition, Event).
        AllocatorOverridden,
        /// A runner pod cannot be scheduled (condition Fallback, cause `capacity`).
        Unschedulable,
        /// No runner has been fresh for the grace period (condition Fallback, cause
        /// `capacity`).
        NoFreshRunner,
        /// A ResourceQuota refuses the runner pods (condition Fallback, cause `quota`).
        QuotaExceeded,
        /// An admin set `spec.fallback.force` (condition Fallback, cause `manual`).
        Forced,
        /// The lane runs its own jobs again (condition Fallback False).
        Recovered,
        /// The lane has been in no episode (condition Fallback False).
        NotNeeded,
        /// `spec.fallback.lane` names a lane that does not exist or serves none of this
        /// lane's models: no episode starts (condition Fallback False, Event).
        FallbackLaneInvalid,
        /// The lane entered fallback (Event).
        FallbackStarted,
        /// The lane left fallback (Event, with the episode's duration).
        FallbackEnded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_is_written_as_its_name_in_json_and_text() {
        for reason in JobReason::ALL {
            let json = serde_json::to_value(reason).unwrap();
            assert_eq!(json, reason.as_str());
            assert_eq!(reason.to_string(), reason.as_str());
            assert_eq!(serde_json::from_value::<JobReason>(json).unwrap(), *reason);
        }
        assert_eq!(LaneCondition::PodsCreated.as_str(), "PodsCreated");
        assert!(serde_json::from_value::<JobReason>("admitted".into()).is_err());
    }
}
