//! What does a job's status become at each step? One function per transition, shared by the
//! operator (admitted, failed, requeued) and the runner contract (claimed, progressed,
//! completed, failed), so both write the same fields, reasons and conditions.

use framelane_api::{
    VideoJob, VideoJobStatus,
    modellane::FallbackCause,
    reasons::{JobCondition, JobReason},
    videojob::{JobPhase, LaneAssignment, MemoryReport, Output, Progress},
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::conditions::{Observed, set_job};

/// A slot a job was given in a lane's queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    pub lane: String,
    pub assignment: LaneAssignment,
    /// For a fallback: why, and the model's own lane the job left.
    pub fallback: Option<(FallbackCause, String)>,
    /// The queue's order: strictly increasing over admissions (see `queue::AdmissionClock`).
    pub queued_at: Timestamp,
    /// 1-based place in the lane's queue.
    pub position: i32,
    /// The seed the job runs with (the spec's, or a random one resolved now).
    pub seed: i64,
}

/// Whether a phase is final: nothing overwrites Succeeded or Failed.
pub fn is_final(phase: Option<JobPhase>) -> bool {
    matches!(phase, Some(JobPhase::Succeeded | JobPhase::Failed))
}

/// The message of a job waiting in `lane` at `position`.
pub fn waiting_message(lane: &str, position: i32) -> String {
    format!("waiting in lane {lane} at position {position}")
}

/// A new job admitted to a lane's queue.
pub fn admitted(job: &VideoJob, admission: &Admission, now: Timestamp) -> VideoJobStatus {
    let Admission {
        lane,
        assignment,
        fallback,
        queued_at,
        position,
        seed,
    } = admission;
    let generation = job.metadata.generation;
    let mut status = VideoJobStatus {
        phase: Some(JobPhase::Queued),
        lane: Some(lane.clone()),
        lane_mode: Some(*assignment),
        fallback_cause: fallback.as_ref().map(|(cause, _)| *cause),
        fallback_from: fallback.as_ref().map(|(_, from)| from.clone()),
        queue_position: Some(*position),
        queued_at: Some(MicroTime(*queued_at)),
        attempts: Some(0),
        seed: Some(*seed),
        reason: Some(JobReason::Admitted),
        message: Some(waiting_message(lane, *position)),
        observed_generation: generation,
        ..Default::default()
    };
    set_job(
        &mut status.conditions,
        JobCondition::Admitted,
        JobReason::Admitted,
        Observed {
            status: true,
            message: &format!("admitted to lane {lane}"),
            generation,
            now,
        },
    );
    status
}

/// A queued job that waited `maxWaitSeconds` in its lane, moved to the fallback lane `lane` at
/// `position`. It keeps its admission time, and so its place in time.
pub fn moved(
    job: &VideoJob,
    lane: &str,
    position: i32,
    cause: FallbackCause,
    now: Timestamp,
) -> VideoJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    let from = status.lane.clone().unwrap_or_default();
    status.lane = Some(lane.into());
    status.lane_mode = Some(LaneAssignment::Fallback);
    status.fallback_cause = Some(cause);
    status.fallback_from = Some(from.clone());
    status.queue_position = Some(position);
    status.reason = Some(JobReason::MovedToFallback);
    status.message = Some(format!(
        "waited maxWaitSeconds in lane {from} ({}); {}",
        cause.as_str(),
        waiting_message(lane, position)
    ));
    set_job(
        &mut status.conditions,
        JobCondition::Admitted,
        JobReason::MovedToFallback,
        Observed {
            status: true,
            message: &format!("moved from lane {from} to its fallback lane {lane}"),
            generation: job.metadata.generation,
            now,
        },
    );
    status
}

/// A queued job taken by `runner` (its pod's name) in its start `incarnation`: Running, one
/// more attempt.
pub fn claimed(job: &VideoJob, runner: &str, incarnation: &str, now: Timestamp) -> VideoJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    status.phase = Some(JobPhase::Running);
    status.runner = Some(runner.into());
    status.runner_incarnation = Some(incarnation.into());
    status.started_at = Some(MicroTime(now));
    status.attempts = Some(status.attempts.unwrap_or(0).saturating_add(1));
    status.queue_position = None;
    status.reason = Some(JobReason::Started);
    status.message = Some(format!("runner {runner} started the job"));
    set_job(
        &mut status.conditions,
        JobCondition::Running,
        JobReason::Started,
        Observed {
            status: true,
            message: &format!("runner {runner}"),
            generation: job.metadata.generation,
            now,
        },
    );
    status
}

/// A running job's progress.
pub fn progressed(job: &VideoJob, progress: Progress) -> VideoJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    status.progress = Some(Progress {
        percent: progress.percent.clamp(0, 100),
        ..progress
    });
    status
}

/// A job whose runner generated the video: Succeeded, final.
pub fn completed(
    job: &VideoJob,
    output: Output,
    memory: Option<MemoryReport>,
    now: Timestamp,
) -> VideoJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    let runner = status.runner.clone().unwrap_or_default();
    let total = status
        .progress
        .as_ref()
        .map(|p| p.total_steps)
        .unwrap_or_default();
    status.progress = Some(Progress {
        stage: Some("Done".into()),
        step: total,
        total_steps: total,
        percent: 100,
    });
    status.phase = Some(JobPhase::Succeeded);
    status.finished_at = Some(MicroTime(now));
    status.output = Some(output);
    status.memory = memory;
    status.reason = Some(JobReason::Completed);
    status.message = Some(format!("runner {runner} generated the video"));
    let generation = job.metadata.generation;
    let observed = |status, message| Observed {
        status,
        message,
        generation,
        now,
    };
    set_job(
        &mut status.conditions,
        JobCondition::Running,
        JobReason::Completed,
        observed(false, "finished"),
    );
    set_job(
        &mut status.conditions,
        JobCondition::Complete,
        JobReason::Completed,
        observed(true, "the video is at status.output.path"),
    );
    status
}

/// A job that failed, by the controller's decision or its runner's: Failed, final. `message`
/// says what to do next.
pub fn failed(
    job: &VideoJob,
    reason: JobReason,
    message: &str,
    memory: Option<MemoryReport>,
    now: Timestamp,
) -> VideoJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    let was_running = status.phase == Some(JobPhase::Running);
    status.phase = Some(JobPhase::Failed);
    status.finished_at = Some(MicroTime(now));
    status.queue_position = None;
    if memory.is_some() {
        status.memory = memory;
    }
    status.reason = Some(reason);
    status.message = Some(message.into());
    status.observed_generation = job.metadata.generation;
    let generation = job.metadata.generation;
    let observed = |status| Observed {
        status,
        message,
        generation,
        now,
    };
    if was_running {
        set_job(
            &mut status.conditions,
            JobCondition::Running,
            reason,
            observed(false),
        );
    }
    set_job(
        &mut status.conditions,
        JobCondition::Failed,
        reason,
        observed(true),
    );
    status
}

/// A running job whose runner was lost: back to its old place in the queue (it keeps
/// `queuedAt`). Returns the status and the message that tells what happened.
pub fn requeued(job: &VideoJob, max_attempts: i32, now: Timestamp) -> (VideoJobStatus, String) {
    let status = job.status.as_ref();
    let runner = status.and_then(|s| s.runner.as_deref()).unwrap_or_default();
    let attempts = status.and_then(|s| s.attempts).unwrap_or(1);
    let lane = status.and_then(|s| s.lane.as_deref()).unwrap_or_default();
    let message = format!(
        "runner {runner} stopped sending heartbeats; the job is back at its place in lane {lane} \
         (attempt {attempts} of {max_attempts} lost)"
    );
    (
        back_in_queue(job, JobReason::RunnerLost, &message, now),
        message,
    )
}

/// A running job its runner gave back unfinished because it is stopping (its pod is being
/// deleted: a lane change, a drain): back to its old place in the queue at once, without
/// waiting for the runner's heartbeat to lapse. The run counts as an attempt.
pub fn handed_back(job: &VideoJob, now: Timestamp) -> VideoJobStatus {
    let status = job.status.as_ref();
    let runner = status.and_then(|s| s.runner.as_deref()).unwrap_or_default();
    let lane = status.and_then(|s| s.lane.as_deref()).unwrap_or_default();
    let message = format!(
        "runner {runner} is stopping (its pod is going away) and gave the job back unfinished; \
         it is back at its place in lane {lane}"
    );
    back_in_queue(job, JobReason::Requeued, &message, now)
}

/// `job` back at its place in its lane's queue (it keeps `queuedAt`), its Running condition
/// false with `why` and `message`.
fn back_in_queue(job: &VideoJob, why: JobReason, message: &str, now: Timestamp) -> VideoJobStatus {
    let mut status = job.status.clone().unwrap_or_default();
    status.runner = None;
    status.runner_incarnation = None;
    status.phase = Some(JobPhase::Queued);
    status.started_at = None;
    status.progress = None;
    status.reason = Some(JobReason::Requeued);
    status.message = Some(message.into());
    set_job(
        &mut status.conditions,
        JobCondition::Running,
        why,
        Observed {
            status: false,
            message,
            generation: job.metadata.generation,
            now,
        },
    );
    status
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn job(status: Option<VideoJobStatus>) -> VideoJob {
        let mut job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "j", "namespace": "ns", "generation": 1},
            "spec": {"model": "anisora", "prompt": "a cat"}
        }))
        .unwrap();
        job.status = status;
        job
    }

    fn condition(status: &VideoJobStatus, type_: JobCondition) -> (String, String) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_.as_str())
            .unwrap_or_else(|| panic!("no {type_} condition in {status:?}"));
        (c.status.clone(), c.reason.clone())
    }

    fn admission() -> Admission {
        Admission {
            lane: "anisora".into(),
            assignment: LaneAssignment::Dedicated,
            fallback: None,
            queued_at: at(1),
            position: 3,
            seed: 42,
        }
    }

    /// The API server takes any 32-bit `attempts`; one more claim must not wrap it negative
    /// (or panic, in a debug build), which would let the job retry forever.
    #[test]
    fn a_claim_at_the_largest_attempts_keeps_it() {
        let running = VideoJobStatus {
            attempts: Some(i32::MAX),
            ..Default::default()
        };
        let claimed = claimed(&job(Some(running)), "anisora-0", "uid-0/n-0", at(2));
        assert_eq!(claimed.attempts, Some(i32::MAX));
    }

    #[test]
    fn a_job_goes_from_admitted_to_claimed_to_completed() {
        let admitted = admitted(&job(None), &admission(), at(1));
        assert_eq!(admitted.phase, Some(JobPhase::Queued));
        assert_eq!(
            (admitted.queue_position, admitted.seed, admitted.attempts),
            (Some(3), Some(42), Some(0))
        );
        assert_eq!(
            admitted.message.as_deref(),
            Some("waiting in lane anisora at position 3")
        );
        assert_eq!(
            condition(&admitted, JobCondition::Admitted),
            ("True".into(), "Admitted".into())
        );

        let claimed = claimed(&job(Some(admitted)), "anisora-0", "uid-0/n-0", at(2));
        assert_eq!(
            (
                claimed.phase,
                claimed.runner.as_deref(),
                claimed.attempts,
                claimed.queue_position
            ),
            (Some(JobPhase::Running), Some("anisora-0"), Some(1), None)
        );
        assert_eq!(claimed.runner_incarnation.as_deref(), Some("uid-0/n-0"));
        assert_eq!(
            condition(&claimed, JobCondition::Running),
            ("True".into(), "Started".into())
        );

        let step = Progress {
            stage: Some("Denoising".into()),
            step: 3,
            total_steps: 8,
            percent: 140,
        };
        let progressed = progressed(&job(Some(claimed)), step);
        assert_eq!(
            progressed.progress.as_ref().unwrap().percent,
            100,
            "clamped"
        );

        let done = completed(&job(Some(progressed)), Output::default(), None, at(3));
        assert_eq!(done.phase, Some(JobPhase::Succeeded));
        assert!(is_final(done.phase));
        assert_eq!(
            done.progress.as_ref().map(|p| (p.step, p.percent)),
            Some((8, 100))
        );
        assert_eq!(
            condition(&done, JobCondition::Running),
            ("False".into(), "Completed".into())
        );
        assert_eq!(
            condition(&done, JobCondition::Complete),
            ("True".into(), "Completed".into())
        );
        assert_eq!(
            done.queued_at.clone().map(|t| t.0),
            Some(at(1)),
            "queuedAt stays"
        );
    }

    #[test]
    fn a_lost_runner_requeues_at_the_old_place_and_a_failure_is_final() {
        let running = claimed(
            &job(Some(admitted(&job(None), &admission(), at(1)))),
            "r-0",
            "uid-0/n-0",
            at(2),
        );
        let (requeued, message) = requeued(&job(Some(running.clone())), 3, at(5));
        assert_eq!(
            (
                requeued.phase,
                requeued.runner.as_deref(),
                requeued.queued_at.clone().map(|t| t.0)
            ),
            (Some(JobPhase::Queued), None, Some(at(1)))
        );
        assert_eq!(
            requeued.runner_incarnation, None,
            "no start holds it any more"
        );
        assert_eq!(
            message,
            "runner r-0 stopped sending heartbeats; the job is back at its place in lane anisora (attempt 1 of 3 lost)"
        );
        assert_eq!(
            condition(&requeued, JobCondition::Running),
            ("False".into(), "RunnerLost".into())
        );

        // A runner that stops gives its job back at once, at the same place.
        let back = handed_back(&job(Some(running.clone())), at(4));
        assert_eq!(
            (
                back.phase,
                back.runner.as_deref(),
                back.runner_incarnation.as_deref(),
                back.queued_at.clone().map(|t| t.0),
                back.started_at.clone(),
                back.attempts,
                back.reason,
            ),
            (
                Some(JobPhase::Queued),
                None,
                None,
                Some(at(1)),
                None,
                Some(1),
                Some(JobReason::Requeued)
            )
        );
        assert_eq!(
            back.message.as_deref(),
            Some(
                "runner r-0 is stopping (its pod is going away) and gave the job back unfinished; it is back at its place in lane anisora"
            )
        );
        assert_eq!(
            condition(&back, JobCondition::Running),
            ("False".into(), "Requeued".into())
        );

        let failed = failed(
            &job(Some(running)),
            JobReason::GpuOutOfMemory,
            "lower it",
            None,
            at(6),
        );
        assert_eq!(
            (failed.phase, failed.reason),
            (Some(JobPhase::Failed), Some(JobReason::GpuOutOfMemory))
        );
        assert!(is_final(failed.phase));
        assert_eq!(
            condition(&failed, JobCondition::Running),
            ("False".into(), "GpuOutOfMemory".into())
        );
        assert_eq!(
            condition(&failed, JobCondition::Failed),
            ("True".into(), "GpuOutOfMemory".into())
        );
        let never_ran = failed_queued();
        assert!(
            !never_ran.conditions.iter().any(|c| c.type_ == "Running"),
            "a job that never ran gets no Running condition"
        );
    }

    fn failed_queued() -> VideoJobStatus {
        let queued = admitted(&job(None), &admission(), at(1));
        failed(
            &job(Some(queued)),
            JobReason::QueueWaitTimeout,
            "no runner",
            None,
            at(40),
        )
    }

    #[test]
    fn a_moved_job_names_its_fallback_lane_cause_and_origin_and_keeps_its_time() {
        let queued = admitted(&job(None), &admission(), at(1));
        let moved = moved(
            &job(Some(queued)),
            "shared",
            2,
            FallbackCause::Capacity,
            at(40),
        );
        assert_eq!(
            (
                moved.lane.as_deref(),
                moved.lane_mode,
                moved.fallback_cause,
                moved.fallback_from.as_deref(),
                moved.queue_position,
                moved.reason
            ),
            (
                Some("shared"),
                Some(LaneAssignment::Fallback),
                Some(FallbackCause::Capacity),
                Some("anisora"),
                Some(2),
                Some(JobReason::MovedToFallback)
            )
        );
        assert_eq!(moved.queued_at.clone().map(|t| t.0), Some(at(1)));
        assert_eq!(
            moved.message.as_deref(),
            Some(
                "waited maxWaitSeconds in lane anisora (capacity); waiting in lane shared at position 2"
            )
        );
        assert_eq!(
            condition(&moved, JobCondition::Admitted),
            ("True".into(), "MovedToFallback".into())
        );
        let to_fallback = Admission {
            lane: "shared".into(),
            assignment: LaneAssignment::Fallback,
            fallback: Some((FallbackCause::Manual, "anisora".into())),
            ..admission()
        };
        let admitted = admitted(&job(None), &to_fallback, at(1));
        assert_eq!(
            (admitted.fallback_cause, admitted.fallback_from.as_deref()),
            (Some(FallbackCause::Manual), Some("anisora"))
        );
    }
}
