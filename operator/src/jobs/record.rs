//! A job's story for people: Events and the job metrics. The leader tells what it decided
//! (admitted, failed, requeued, cancelled) as it decides, and what runners did (started,
//! completed, failed) as the watch shows it, each once (see `Context::first_time`).

use framelane_api::{
    VideoJob,
    modellane::FallbackCause,
    reasons::{JobCondition, JobReason},
    videojob::JobPhase,
};
use framelane_core::{conditions::job_condition, transitions::Admission};
use kube::{Resource, ResourceExt, runtime::events::EventType};

use crate::{
    context::{Context, Told},
    metrics::{FinishedLabels, Metrics, MovedLabels},
};

/// The Event of an admission.
pub fn admitted(ctx: &Context, job: &VideoJob, admission: &Admission) {
    let note = match &admission.fallback {
        Some((cause, from)) => format!(
            "admitted to lane {} at position {}: the fallback lane of lane {from}, in fallback ({})",
            admission.lane,
            admission.position,
            cause.as_str()
        ),
        None => format!(
            "admitted to lane {} at position {}",
            admission.lane, admission.position
        ),
    };
    publish(ctx, job, EventType::Normal, JobReason::Admitted, &note);
}

/// The Event, log line and metric of a job moved to its lane's fallback lane.
pub fn moved(
    ctx: &Context,
    job: &VideoJob,
    from: &str,
    to: &str,
    cause: FallbackCause,
    position: i32,
) {
    let note = format!(
        "waited maxWaitSeconds in lane {from}; moved to its fallback lane {to} ({}) at position {position}",
        cause.as_str()
    );
    publish(
        ctx,
        job,
        EventType::Normal,
        JobReason::MovedToFallback,
        &note,
    );
    let labels = MovedLabels {
        lane: from.into(),
        fallback_lane: to.into(),
        cause: cause.as_str().into(),
    };
    ctx.metrics.fallback_jobs_moved.get_or_create(&labels).inc();
    tracing::info!(job = %job.name_any(), lane = from, fallback_lane = to, cause = cause.as_str(), "job moved to the fallback lane");
}

/// The Event of a failure the controller decided. The watch then shows the failure, and
/// [`transitions`] must not tell it a second time.
pub fn failed_by_controller(ctx: &Context, job: &VideoJob, reason: JobReason, message: &str) {
    ctx.first_time(job, Told::FailedEvent);
    publish(ctx, job, EventType::Warning, reason, message);
}

/// The Event of a job put back in its queue after its runner was lost.
pub fn requeued(ctx: &Context, job: &VideoJob, message: &str) {
    publish(ctx, job, EventType::Warning, JobReason::RunnerLost, message);
}

/// The Event and metric of a job deleted before it finished, that the controller releases
/// (it held the finalizer). A release retried after a failed finalizer write tells it no
/// second time.
pub fn cancelled(ctx: &Context, job: &VideoJob, was_running: bool) {
    if ctx.first_time(job, Told::Finished) {
        tell_cancelled(ctx, job, was_running);
    }
}

/// The Event and metric of a job deleted before it finished, told once by the caller.
pub fn tell_cancelled(ctx: &Context, job: &VideoJob, was_running: bool) {
    let message = if was_running {
        "deleted while running; its runner stopped (or its deadline passed), so the slot is freed"
    } else {
        "deleted while queued; it left the queue"
    };
    publish(ctx, job, EventType::Normal, JobReason::Cancelled, message);
    finished(ctx, JobPhase::Failed, JobReason::Cancelled);
}

/// Counts a job once in the queue-wait histogram (when it starts) and the finished counter
/// (when it ends), for what happened while this replica leads, and tells the job's Events
/// what its runner did: `Started`, `Requeued` (a stopping runner gave it back), `Completed`,
/// or the runner's failure (the controller's own failures have their Event from
/// [`failed_by_controller`]).
pub fn transitions(job: &VideoJob, ctx: &Context) {
    let Some(status) = job.status.as_ref() else {
        return;
    };
    let lane = status.lane.clone().unwrap_or_default();
    let runner = status.runner.as_deref().unwrap_or("?");
    if let (Some(started), Some(queued)) = (&status.started_at, &status.queued_at)
        && started.0 >= ctx.leader_since
        && ctx.first_time(
            job,
            Told::Started {
                attempt: status.attempts.unwrap_or(0),
            },
        )
    {
        let wait = started.0.duration_since(queued.0).as_secs_f64().max(0.0);
        ctx.metrics
            .queue_wait
            .get_or_create(&Metrics::lane(&lane))
            .observe(wait);
        let note = format!(
            "runner {runner} started it (attempt {}) after {wait:.1} s in lane {lane}",
            status.attempts.unwrap_or(1)
        );
        publish(ctx, job, EventType::Normal, JobReason::Started, &note);
    }
    // A stopping runner gave it back (the runner writes no Events): its Running condition
    // says which runner and why.
    let handed_back = job_condition(&status.conditions, JobCondition::Running)
        .filter(|c| c.status == "False" && c.reason == JobReason::Requeued.as_str());
    if status.phase == Some(JobPhase::Queued)
        && let Some(condition) = handed_back
        // A condition's time has whole seconds: one in the second the leader started counts.
        && condition.last_transition_time.0.as_second() >= ctx.leader_since.as_second()
        && ctx.first_time(
            job,
            Told::HandedBack {
                attempt: status.attempts.unwrap_or(0),
            },
        )
    {
        publish(
            ctx,
            job,
            EventType::Normal,
            JobReason::Requeued,
            &condition.message,
        );
    }
    if let (Some(phase @ (JobPhase::Succeeded | JobPhase::Failed)), Some(finished_at)) =
        (status.phase, &status.finished_at)
        && finished_at.0 >= ctx.leader_since
        && ctx.first_time(job, Told::Finished)
    {
        let reason = status.reason.unwrap_or(JobReason::GenerationFailed);
        finished(ctx, phase, reason);
        let took = status
            .started_at
            .as_ref()
            .map(|s| finished_at.0.duration_since(s.0).as_secs_f64().max(0.0))
            .unwrap_or_default();
        if phase == JobPhase::Succeeded {
            let note = match &status.output {
                Some(o) => format!(
                    "runner {runner} wrote {} ({} bytes, {} frames) in {took:.1} s",
                    o.path, o.size_bytes, o.frames
                ),
                None => format!("runner {runner} finished it in {took:.1} s"),
            };
            publish(ctx, job, EventType::Normal, JobReason::Completed, &note);
        } else if ctx.first_time(job, Told::FailedEvent) {
            let note = status.message.as_deref().unwrap_or("the runner failed it");
            publish(ctx, job, EventType::Warning, reason, note);
        }
    }
}

fn finished(ctx: &Context, phase: JobPhase, reason: JobReason) {
    let labels = FinishedLabels {
        phase: phase.as_str().into(),
        reason: reason.as_str().into(),
    };
    ctx.metrics.jobs_finished.get_or_create(&labels).inc();
}

/// Publishes an Event without holding up the reconcile that caused it.
fn publish(ctx: &Context, job: &VideoJob, type_: EventType, reason: JobReason, note: &str) {
    ctx.events
        .publish(job.object_ref(&()), type_, reason.as_str(), note);
}
