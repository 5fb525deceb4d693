//! The VideoJob controller: admits new jobs to their lane, times out jobs whose lane has no
//! runner, requeues jobs whose runner died, cancels deleted jobs, and deletes finished jobs
//! after their TTL. Only the leader runs it.

pub mod decide;

use std::{sync::Arc, time::Duration};

use framelane_api::{
    VideoJob,
    runner::{fresh_until, set_condition},
    videojob::{JobPhase, LaneAssignment, VideoJobStatus},
    videomodel::unknown_model_message,
    wellknown::{JOB_FINALIZER, Reason, job_condition},
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{controller::Action, events::EventType},
};
use rand::Rng;
use serde_json::json;

use self::decide::{Decision, Facts, decide};
use crate::{
    context::Context,
    context::route,
    error::Error,
    index::{creation_key, key_of},
    metrics::FinishedLabels,
};

pub async fn reconcile(job: Arc<VideoJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .timed("videojob", reconcile_inner(&job, &ctx))
        .await
}

async fn reconcile_inner(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    if !ctx.synced() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if !ctx.owns(job) {
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    record_transitions(job, ctx);
    if needs_finalizer(job) {
        return add_finalizer(job, ctx).await;
    }
    // A job another reconcile reserved a slot for (admitting a backlog in creation order)
    // is admitted with it: deciding again would count its own slot against it.
    if ctx
        .index
        .lock()
        .expect("index lock")
        .reservation(job)
        .is_some()
    {
        return admit_in_creation_order(job, ctx).await;
    }
    let facts = facts(job, ctx, now);
    match decide(job, &facts) {
        Decision::Admit { .. } => admit_in_creation_order(job, ctx).await,
        Decision::Fail { reason, message } => fail(job, ctx, reason, &message).await,
        Decision::Requeue => requeue(job, ctx).await,
        Decision::Delete => {
            api(ctx, job)
                .delete(&job.name_any(), &DeleteParams::background())
                .await?;
            Ok(Action::await_change())
        }
        Decision::Release => release(job, ctx).await,
        Decision::Wait(d) if d.is_zero() => Ok(Action::await_change()),
        Decision::Wait(d) => Ok(Action::requeue(d)),
    }
}

fn facts(job: &VideoJob, ctx: &Context, now: Timestamp) -> Facts {
    let status = job.status.clone().unwrap_or_default();
    let lanes = ctx.lanes.state();
    let lane = match status.lane.as_deref() {
        Some(name) => lanes
            .iter()
            .find(|l| l.name_any() == name)
            .cloned()
            .ok_or_else(|| format!("lane {name} was deleted")),
        None => route_new(job, ctx, &lanes),
    };
    let runner_fresh_until = status.runner.as_deref().and_then(|runner| {
        ctx.leases
            .state()
            .iter()
            .find(|l| l.name_any() == runner)
            .and_then(|l| fresh_until(l))
    });
    Facts {
        now,
        lane: lane.map(|l| ctx.lane_facts(&l, now)),
        runner_fresh_until,
        max_attempts: ctx.config.max_attempts,
    }
}

fn route_new(
    job: &VideoJob,
    ctx: &Context,
    lanes: &[Arc<framelane_api::ModelLane>],
) -> Result<Arc<framelane_api::ModelLane>, String> {
    let model = &job.spec.model;
    let models = ctx.models.state();
    if !models.iter().any(|m| &m.name_any() == model) {
        return Err(unknown_model_message(model, &models));
    }
    route(model, lanes).cloned().ok_or_else(|| {
        format!(
            "no ModelLane serves model {model}; create one (kubectl get modellanes shows the lanes)"
        )
    })
}

fn api(ctx: &Context, job: &VideoJob) -> Api<VideoJob> {
    Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default())
}

/// Admits `job`. Slots are reserved in the index, in creation order, for every job created up
/// to and including it that still waits: a lane's FIFO order is the order users created the
/// jobs in, however the reconciles of a burst interleave, and the depth check and the slot it
/// takes are one step (the final arbiter of the depth limit). The API writes then run outside
/// the lock, so the admissions of a burst proceed in parallel.
async fn admit_in_creation_order(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let (reservation, reserved_in) = {
        let mut index = ctx.index.lock().expect("index lock");
        match index.reservation(job) {
            Some(r) => (Some(r), Vec::new()),
            None => reserve_backlog(job, ctx, &mut index),
        }
    };
    // The lanes' queueDepth counts the slots from now on.
    ctx.notify_lanes(reserved_in);
    let Some(reservation) = reservation else {
        // Full, or its lane vanished: decide again, which fails it with the reason. Anything
        // else means this copy of the job is older than an admission already written.
        return match decide(job, &facts(job, ctx, Timestamp::now())) {
            Decision::Fail { reason, message } => fail(job, ctx, reason, &message).await,
            _ => Ok(Action::requeue(Duration::from_millis(200))),
        };
    };
    let result = admit(job, ctx, &reservation).await;
    let changed = {
        let mut index = ctx.index.lock().expect("index lock");
        let mut changed = index.settle(job, result.as_ref().ok());
        if matches!(&result, Err(Error::Kube(kube::Error::Api(s))) if s.code == 404) {
            changed.extend(index.forget(job));
        }
        changed
    };
    ctx.notify_lanes(changed);
    result?;
    let lane = ctx
        .lanes
        .state()
        .into_iter()
        .find(|l| l.name_any() == reservation.lane);
    Ok(Action::requeue(lane.map_or(Duration::from_secs(30), |l| {
        ctx.lane_facts(&l, Timestamp::now()).max_wait
    })))
}

/// Reserves slots, oldest first, for the jobs created up to `job` that wait for admission
/// and fit their lane; returns `job`'s reservation if it got one, and the lanes that took
/// slots.
fn reserve_backlog(
    job: &VideoJob,
    ctx: &Context,
    index: &mut crate::index::Index,
) -> (Option<crate::index::Reservation>, Vec<String>) {
    // The jobs awaiting admission up to this one, oldest first, and this one itself (after a
    // failed write it is no longer in the index's list).
    let mut backlog: Vec<Arc<VideoJob>> = index
        .awaiting_upto(creation_key(job))
        .iter()
        .filter_map(|key| ctx.jobs_cache(key))
        .filter(|j| j.uid() != job.uid())
        .collect();
    backlog.push(Arc::new(job.clone()));
    backlog.retain(|j| index.knows(j) && !index.is_stale(j) && index.reservation(j).is_none());
    backlog.sort_by_key(|j| creation_key(j));
    let now = Timestamp::now();
    let lanes = ctx.lanes.state();
    let mut mine = None;
    let mut lanes_reserved = Vec::new();
    for pending in backlog {
        let Ok(lane) = route_new(&pending, ctx, &lanes) else {
            continue;
        };
        let facts = ctx.lane_facts_at_depth(&lane, now, index.queues.depth(&lane.name_any()));
        if facts.depth >= facts.max_depth {
            continue;
        }
        let reservation = index.reserve(&pending, &facts.name, now);
        if !lanes_reserved.contains(&facts.name) {
            lanes_reserved.push(facts.name.clone());
        }
        if pending.uid() == job.uid() {
            mine = Some(reservation);
        }
    }
    (mine, lanes_reserved)
}

/// Writes a reserved admission: one Queued status write, conditional on the job being
/// unchanged since the reservation.
async fn admit(
    job: &VideoJob,
    ctx: &Context,
    r: &crate::index::Reservation,
) -> Result<VideoJob, Error> {
    let api = api(ctx, job);
    let lane = &r.lane;
    let mut admitted = job.clone();
    let seed = match job.spec.seed {
        Some(seed) if seed >= 0 => seed,
        _ => i64::from(rand::rng().random::<u32>()),
    };
    let position = r.position;
    let mut status = VideoJobStatus {
        phase: Some(JobPhase::Queued),
        lane: Some(lane.clone()),
        lane_mode: Some(LaneAssignment::Dedicated),
        queue_position: Some(position),
        queued_at: Some(MicroTime(r.queued_at)),
        attempts: Some(0),
        seed: Some(seed),
        reason: Some(Reason::Admitted.as_str().into()),
        message: Some(format!("waiting in lane {lane} at position {position}")),
        observed_generation: job.metadata.generation,
        ..Default::default()
    };
    let generation = job.metadata.generation;
    set_condition(
        &mut status.conditions,
        job_condition::ADMITTED,
        true,
        Reason::Admitted,
        &format!("admitted to lane {lane}"),
        generation,
    );
    admitted.status = Some(status);
    let written = api
        .replace_status(&job.name_any(), &PostParams::default(), &admitted)
        .await?;
    publish(
        ctx,
        job,
        EventType::Normal,
        Reason::Admitted,
        &format!("admitted to lane {lane} at position {position}"),
    );
    Ok(written)
}

async fn fail(
    job: &VideoJob,
    ctx: &Context,
    reason: Reason,
    message: &str,
) -> Result<Action, Error> {
    let mut failed = job.clone();
    let status = failed.status.get_or_insert_with(Default::default);
    let was_running = status.phase == Some(JobPhase::Running);
    status.phase = Some(JobPhase::Failed);
    status.finished_at = Some(MicroTime(Timestamp::now()));
    status.queue_position = None;
    status.reason = Some(reason.as_str().into());
    status.message = Some(message.into());
    status.observed_generation = job.metadata.generation;
    let generation = job.metadata.generation;
    if was_running {
        set_condition(
            &mut status.conditions,
            job_condition::RUNNING,
            false,
            reason,
            message,
            generation,
        );
    }
    set_condition(
        &mut status.conditions,
        job_condition::FAILED,
        true,
        reason,
        message,
        generation,
    );
    let lane = status.lane.clone();
    let written = api(ctx, job)
        .replace_status(&job.name_any(), &PostParams::default(), &failed)
        .await?;
    let changed = ctx.index.lock().expect("index lock").observe(&written);
    ctx.notify_lanes(changed);
    if reason == Reason::QueueWaitTimeout
        && let Some(lane) = lane
    {
        ctx.metrics
            .timeout_drops
            .get_or_create(&crate::metrics::Metrics::lane(&lane))
            .inc();
    }
    tracing::info!(job = %key_of(job).name, namespace = %key_of(job).namespace, %reason, message, "job failed");
    // Its Event is this one: record_transitions must not post a second when the watch shows
    // the failure (the next reconcile of this job, which cannot start before this one ends).
    ctx.first_time(format!("{}/failed-event", job.uid().unwrap_or_default()));
    publish(ctx, job, EventType::Warning, reason, message);
    Ok(Action::await_change())
}

async fn requeue(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let mut requeued = job.clone();
    let status = requeued.status.get_or_insert_with(Default::default);
    let runner = status.runner.take().unwrap_or_default();
    let attempts = status.attempts.unwrap_or(1);
    let lane = status.lane.clone().unwrap_or_default();
    let message = format!(
        "runner {runner} stopped sending heartbeats; the job is back at its place in lane {lane} (attempt {attempts} of {} lost)",
        ctx.config.max_attempts
    );
    status.phase = Some(JobPhase::Queued);
    status.started_at = None;
    status.progress = None;
    status.reason = Some(Reason::Requeued.as_str().into());
    status.message = Some(message.clone());
    let generation = job.metadata.generation;
    set_condition(
        &mut status.conditions,
        job_condition::RUNNING,
        false,
        Reason::RunnerLost,
        &message,
        generation,
    );
    let written = api(ctx, job)
        .replace_status(&job.name_any(), &PostParams::default(), &requeued)
        .await?;
    let changed = ctx.index.lock().expect("index lock").observe(&written);
    ctx.notify_lanes(changed);
    ctx.metrics
        .runner_lost_requeues
        .get_or_create(&crate::metrics::Metrics::lane(&lane))
        .inc();
    tracing::warn!(job = %job.name_any(), runner, lane, attempts, "runner lost; job requeued");
    publish(ctx, job, EventType::Warning, Reason::RunnerLost, &message);
    Ok(Action::await_change())
}

async fn release(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    if !job.finalizers().iter().any(|f| f == JOB_FINALIZER) {
        return Ok(Action::await_change());
    }
    let phase = job.status.as_ref().and_then(|s| s.phase);
    if !matches!(phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        let message = match phase {
            Some(JobPhase::Running) => {
                "deleted while running; its runner is gone, so the slot is freed"
            }
            _ => "deleted while queued; it left the queue",
        };
        publish(ctx, job, EventType::Normal, Reason::Cancelled, message);
        let labels = FinishedLabels {
            phase: "Failed".into(),
            reason: Reason::Cancelled.as_str().into(),
        };
        ctx.metrics.jobs_finished.get_or_create(&labels).inc();
    }
    let finalizers: Vec<String> = job
        .finalizers()
        .iter()
        .filter(|f| *f != JOB_FINALIZER)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"resourceVersion": job.resource_version(), "finalizers": finalizers}});
    match api(ctx, job)
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let changed = ctx.index.lock().expect("index lock").forget(job);
    ctx.notify_lanes(changed);
    Ok(Action::await_change())
}

/// A running job carries the finalizer, so deleting it waits until its runner has stopped
/// and the slot is freed only then. A queued job needs none: deleting it just removes it
/// from the queue, and admission stays a single write.
fn needs_finalizer(job: &VideoJob) -> bool {
    job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Running)
        && job.metadata.deletion_timestamp.is_none()
        && !job.finalizers().iter().any(|f| f == JOB_FINALIZER)
}

async fn add_finalizer(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let mut finalizers = job.finalizers().to_vec();
    finalizers.push(JOB_FINALIZER.into());
    let patch =
        json!({"metadata": {"resourceVersion": job.resource_version(), "finalizers": finalizers}});
    api(ctx, job)
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Action::await_change())
}

/// Counts a job once in the queue-wait histogram (when it starts) and the finished counter
/// (when it ends), for what happened while this replica leads, and tells the job's Events
/// what its runner did: `Started`, `Completed`, or the runner's failure (the controller's own
/// failures have their Event from [`fail`]).
fn record_transitions(job: &VideoJob, ctx: &Context) {
    let Some(status) = job.status.as_ref() else {
        return;
    };
    let uid = job.uid().unwrap_or_default();
    let lane = status.lane.clone().unwrap_or_default();
    let runner = status.runner.as_deref().unwrap_or("?");
    if let (Some(started), Some(queued)) = (&status.started_at, &status.queued_at)
        && started.0 >= ctx.leader_since
        && ctx.first_time(format!("{uid}/start/{}", status.attempts.unwrap_or(0)))
    {
        let wait = started.0.duration_since(queued.0).as_secs_f64().max(0.0);
        ctx.metrics
            .queue_wait
            .get_or_create(&crate::metrics::Metrics::lane(&lane))
            .observe(wait);
        let note = format!(
            "runner {runner} started it (attempt {}) after {wait:.1} s in lane {lane}",
            status.attempts.unwrap_or(1)
        );
        publish(ctx, job, EventType::Normal, Reason::Started, &note);
    }
    if let (Some(phase @ (JobPhase::Succeeded | JobPhase::Failed)), Some(finished)) =
        (status.phase, &status.finished_at)
        && finished.0 >= ctx.leader_since
        && ctx.first_time(format!("{uid}/finished"))
    {
        let labels = FinishedLabels {
            phase: format!("{phase:?}"),
            reason: status.reason.clone().unwrap_or_default(),
        };
        ctx.metrics.jobs_finished.get_or_create(&labels).inc();
        let took = status
            .started_at
            .as_ref()
            .map(|s| finished.0.duration_since(s.0).as_secs_f64().max(0.0))
            .unwrap_or_default();
        if phase == JobPhase::Succeeded {
            let note = match &status.output {
                Some(o) => format!(
                    "runner {runner} wrote {} ({} bytes, {} frames) in {took:.1} s",
                    o.path, o.size_bytes, o.frames
                ),
                None => format!("runner {runner} finished it in {took:.1} s"),
            };
            publish(ctx, job, EventType::Normal, Reason::Completed, &note);
        } else if ctx.first_time(format!("{uid}/failed-event")) {
            let reason = status
                .reason
                .as_deref()
                .and_then(Reason::parse)
                .unwrap_or(Reason::GenerationFailed);
            let note = status.message.as_deref().unwrap_or("the runner failed it");
            publish(ctx, job, EventType::Warning, reason, note);
        }
    }
}

/// Publishes an Event without holding up the reconcile that caused it.
fn publish(ctx: &Context, job: &VideoJob, type_: EventType, reason: Reason, note: &str) {
    ctx.events
        .publish(job.object_ref(&()), type_, reason.as_str(), note);
}

pub fn error_policy(job: Arc<VideoJob>, error: &Error, ctx: Arc<Context>) -> Action {
    let labels = crate::metrics::ErrorLabels {
        controller: "videojob".into(),
        error: error.kind().into(),
    };
    ctx.metrics.reconcile_errors.get_or_create(&labels).inc();
    if !matches!(error, Error::Conflict) {
        tracing::warn!(job = %job.name_any(), %error, "reconcile failed");
    }
    Action::requeue(Duration::from_millis(if matches!(error, Error::Conflict) {
        100
    } else {
        2000
    }))
}
