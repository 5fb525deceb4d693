//! The controller's writes of a job. Every status write is a whole-status PUT carrying the
//! resourceVersion the decision was made on: if the job changed meanwhile (a runner finished
//! it, say), the write fails with a conflict and the job is decided again, so nothing
//! overwrites a state the decision did not see.

use std::time::Duration;

use framelane_api::{
    VideoJob, VideoJobStatus, reasons::JobReason, videojob::JobPhase, wellknown::JOB_FINALIZER,
};
use framelane_contract::api_errors::{ignore_not_found, is_conflict, is_not_found};
use framelane_core::{
    index::key_of,
    timeouts::{holder_fresh_until, runner_alive},
    transitions,
};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::controller::Action,
};
use serde_json::json;

use super::record;
use crate::{context::Context, error::Error, metrics::Metrics};

fn api(ctx: &Context, job: &VideoJob) -> Api<VideoJob> {
    Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default())
}

/// Writes `status` over the job's, on the condition that the job is as `job` shows it.
pub async fn replace_status(
    ctx: &Context,
    job: &VideoJob,
    status: VideoJobStatus,
) -> Result<VideoJob, kube::Error> {
    let next = VideoJob {
        status: Some(status),
        ..job.clone()
    };
    api(ctx, job)
        .replace_status(&job.name_any(), &PostParams::default(), &next)
        .await
}

/// Fails the job with `reason` and `message` (what to do next). Final.
pub async fn fail(
    job: &VideoJob,
    ctx: &Context,
    reason: JobReason,
    message: &str,
) -> Result<Action, Error> {
    let status = transitions::failed(job, reason, message, None, Timestamp::now());
    let lane = status.lane.clone();
    let written = replace_status(ctx, job, status).await?;
    ctx.update_index(|index| index.observe_written(&written, Timestamp::now()));
    if reason == JobReason::QueueWaitTimeout
        && let Some(lane) = lane
    {
        ctx.metrics
            .timeout_drops
            .get_or_create(&Metrics::lane(&lane))
            .inc();
    }
    let key = key_of(job);
    tracing::info!(job = %key.name, namespace = %key.namespace, %reason, message, "job failed");
    record::failed_by_controller(ctx, job, reason, message);
    Ok(Action::await_change())
}

/// How soon a job whose runner only looked lost (the heartbeat cache was behind, or the API
/// server could not say) is looked at again.
const CACHE_BEHIND_RECHECK: Duration = Duration::from_secs(3);
/// How long the leader waits for the runner's Lease before it requeues: an API server that
/// holds the read (etcd down) cannot confirm anything.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// Puts a job whose runner was lost back at its place in the queue, once the API server
/// confirms that the runner's heartbeat really stopped.
pub async fn requeue(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let runner = job.status.as_ref().and_then(|s| s.runner.clone());
    let Some(name) = &runner else {
        return requeue_confirmed(job, ctx).await;
    };
    let behind = match tokio::time::timeout(CONFIRM_WITHIN, heartbeat_cache_behind(job, name, ctx))
        .await
    {
        Ok(behind) => behind?,
        // Runners cannot renew either while the API server holds requests: a lease
        // duration from now for all of them, as after any outage.
        Err(_) => {
            ctx.leases_seen.interrupted(Timestamp::now());
            tracing::info!(job = %job.name_any(), runner = %name, "the API server did not answer the heartbeat check in time; the job stays");
            return Ok(Action::requeue(CACHE_BEHIND_RECHECK));
        }
    };
    if behind {
        // The heartbeat watch went quiet without failing (the API server rebuilt its own
        // cache after an etcd outage): the whole view is suspect, so every runner is judged
        // fresh for a lease duration from now, and this job is looked at again.
        ctx.leases_seen.interrupted(Timestamp::now());
        tracing::info!(job = %job.name_any(), runner = %name, "the heartbeat cache is behind the API server; the runner is alive, the job stays");
        return Ok(Action::requeue(CACHE_BEHIND_RECHECK));
    }
    requeue_confirmed(job, ctx).await
}

async fn requeue_confirmed(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let runner = job.status.as_ref().and_then(|s| s.runner.clone());
    let (status, message) = transitions::requeued(job, ctx.config.max_attempts, Timestamp::now());
    let lane = status.lane.clone().unwrap_or_default();
    let written = replace_status(ctx, job, status).await?;
    ctx.update_index(|index| index.observe_written(&written, Timestamp::now()));
    ctx.metrics
        .runner_lost_requeues
        .get_or_create(&Metrics::lane(&lane))
        .inc();
    tracing::warn!(job = %job.name_any(), runner, lane, "runner lost; job requeued");
    record::requeued(ctx, job, &message);
    Ok(Action::await_change())
}

/// Whether the runner's heartbeat Lease, read from the API server now, shows the job's runner
/// renewing since the copy the watch cache holds, and fresh by this replica's clock: the cache
/// is behind, the runner not lost. (A runner that died after such a renewal is found lost
/// a lease duration later, whether the cache caught up or not.)
async fn heartbeat_cache_behind(
    job: &VideoJob,
    runner: &str,
    ctx: &Context,
) -> Result<bool, Error> {
    let cached = ctx
        .leases
        .state()
        .into_iter()
        .find(|l| l.name_any() == runner)
        .and_then(|l| l.resource_version());
    // A list, not a get: right after etcd comes back the API server answered a get of a
    // Lease from its own stale cache, where a (consistent) list read etcd.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let by_name = ListParams::default().fields(&format!("metadata.name={runner}"));
    let Some(current) = leases.list(&by_name).await?.items.pop() else {
        return Ok(false);
    };
    let incarnation = job
        .status
        .as_ref()
        .and_then(|s| s.runner_incarnation.as_deref());
    // The job's holder, fresh by its renewal alone (no outage grace): as `facts` judges it.
    let fresh_until = holder_fresh_until(&current, incarnation, Timestamp::UNIX_EPOCH);
    Ok(current.resource_version() != cached && runner_alive(fresh_until, Timestamp::now()))
}

/// Deletes a finished job whose TTL passed: this job, by its UID, never a job re-created
/// under its name since (the precondition fails with a conflict: nothing to delete).
pub async fn delete(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: job.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api(ctx, job).delete(&job.name_any(), &params).await {
        Err(e) if is_conflict(&e) || is_not_found(&e) => {}
        result => {
            result?;
        }
    }
    Ok(Action::await_change())
}

/// A deleted job that nothing runs any more: drops the finalizer so it goes, and its slot.
pub async fn release(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    if !job.finalizers().iter().any(|f| f == JOB_FINALIZER) {
        return Ok(Action::await_change());
    }
    let phase = job.status.as_ref().and_then(|s| s.phase);
    if !transitions::is_final(phase) {
        record::cancelled(ctx, job, phase == Some(JobPhase::Running));
    }
    let finalizers: Vec<String> = job
        .finalizers()
        .iter()
        .filter(|f| *f != JOB_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(job, ctx, finalizers).await?;
    ctx.update_index(|index| index.forget(job));
    Ok(Action::await_change())
}

/// A running job carries the finalizer, so deleting it waits until its runner has stopped
/// and the slot is freed only then. A queued job needs none: deleting it just removes it
/// from the queue, and admission stays a single write (docs/adr/0001).
pub fn needs_finalizer(job: &VideoJob) -> bool {
    job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Running)
        && job.metadata.deletion_timestamp.is_none()
        && !job.finalizers().iter().any(|f| f == JOB_FINALIZER)
}

pub async fn add_finalizer(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let mut finalizers = job.finalizers().to_vec();
    finalizers.push(JOB_FINALIZER.into());
    set_finalizers(job, ctx, finalizers).await?;
    Ok(Action::await_change())
}

/// Sets the finalizers, on the condition that the job is as `job` shows it.
async fn set_finalizers(
    job: &VideoJob,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch =
        json!({"metadata": {"resourceVersion": job.resource_version(), "finalizers": finalizers}});
    ignore_not_found(
        api(ctx, job)
            .patch(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await,
    )?;
    Ok(())
}
