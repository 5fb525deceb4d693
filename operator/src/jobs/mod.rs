//! The VideoJob controller: gathers a job's facts from the caches, asks
//! `framelane_core::lifecycle::decide` what happens next, and applies it (admit, fail,
//! requeue, release, delete). Only the leader runs it.

mod admit;
mod apply;
mod record;

use framelane_contract::{backoff::jittered, heartbeat::LEASE_DURATION};
use std::{sync::Arc, time::Duration};

use framelane_api::VideoJob;
use framelane_core::{
    index::Index,
    lifecycle::{Decision, Facts, LaneFacts, NoLane, decide},
    parameters::{summary, violations},
    routing::{lane_for, model_exists},
    timeouts::holder_fresh_until,
};
use jiff::Timestamp;
use kube::{ResourceExt, runtime::controller::Action};

use crate::{context::Context, error::Error};

pub async fn reconcile(job: Arc<VideoJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .timed("videojob", reconcile_inner(&job, &ctx))
        .await
}

async fn reconcile_inner(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    // A replica whose leadership is not confirmed decides nothing: it is about to exit.
    if !ctx.leading() {
        return Ok(Action::await_change());
    }
    if !ctx.synced() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if !ctx.owns(job) {
        return Ok(Action::await_change());
    }
    record::transitions(job, ctx);
    if apply::needs_finalizer(job) {
        return apply::add_finalizer(job, ctx).await;
    }
    // A job another reconcile reserved a slot for (admitting a backlog in creation order)
    // is admitted with it: deciding again would count its own slot against it.
    if ctx.index().reservation(job).is_some() {
        return admit::in_creation_order(job, ctx).await;
    }
    let facts = facts(job, ctx, Timestamp::now(), &ctx.index());
    match decide(job, &facts) {
        Decision::Admit { .. } => admit::in_creation_order(job, ctx).await,
        Decision::Move { to, cause } => admit::move_to(job, ctx, &to, cause).await,
        Decision::Fail { reason, message } => apply::fail(job, ctx, reason, &message).await,
        Decision::Requeue => apply::requeue(job, ctx).await,
        Decision::Delete => apply::delete(job, ctx).await,
        Decision::Release => apply::release(job, ctx).await,
        Decision::Wait(d) if d.is_zero() => Ok(Action::await_change()),
        Decision::Wait(d) => Ok(Action::requeue(d)),
    }
}

/// What `decide` needs to know about a job, from the caches and the locked queue index.
fn facts(job: &VideoJob, ctx: &Context, now: Timestamp, index: &Index) -> Facts {
    let status = job.status.clone().unwrap_or_default();
    let seen_since = ctx.leases_seen.since();
    let from_lease = status.runner.as_deref().and_then(|runner| {
        ctx.leases
            .state()
            .iter()
            .find(|l| l.name_any() == runner)
            .and_then(|l| holder_fresh_until(l, status.runner_incarnation.as_deref(), seen_since))
    });
    // The claim is the runner's own sign of life: a runner may claim before the leader has
    // seen its first heartbeat.
    let from_claim = status
        .runner
        .as_ref()
        .and(status.started_at.as_ref())
        .and_then(|started| started.0.checked_add(LEASE_DURATION).ok());
    let runner_fresh_until = from_lease.max(from_claim);
    // Only a new job is checked: the webhook checked it, or it was created while the webhook
    // did not (turned off, a namespace it leaves out); a model changed later does not fail
    // jobs already admitted.
    // A model that does not exist is routing's to tell (LaneNotFound).
    let models = ctx.models.state();
    let invalid =
        (status.phase.is_none() && model_exists(&job.spec.model, &models).is_ok()).then(|| {
            let causes = violations(&job.spec, &models, &ctx.config.image_url_hosts);
            (!causes.is_empty()).then(|| summary(&job.name_any(), &job.spec.model, &causes))
        });
    Facts {
        now,
        lane: lane_of(job, ctx, now, index),
        runner_fresh_until,
        invalid: invalid.flatten(),
        max_attempts: ctx.config.max_attempts,
    }
}

/// The lane a job sits in or, for a new job, the lane it is routed to.
fn lane_of(
    job: &VideoJob,
    ctx: &Context,
    now: Timestamp,
    index: &Index,
) -> Result<LaneFacts, NoLane> {
    let lanes = ctx.lanes.state();
    let lane = match job.status.as_ref().and_then(|s| s.lane.as_deref()) {
        Some(name) => lanes
            .iter()
            .find(|l| l.name_any() == name)
            .ok_or_else(|| NoLane::Deleted(name.into()))?,
        None => lane_for(&job.spec.model, &ctx.models.state(), &lanes)?.lane,
    };
    Ok(ctx.lane_facts(lane, job, now, index))
}

/// Tells a queued job's deletion (its Event and `jobs_finished{reason=Cancelled}`): without a
/// finalizer it is gone before any reconcile sees it. The job watch decides it once.
pub fn deleted_while_queued(ctx: &Context, job: &VideoJob) {
    if ctx.leading() {
        record::tell_cancelled(ctx, job, false);
    }
}

pub fn error_policy(job: Arc<VideoJob>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("videojob", error);
    if error.api_unreachable() {
        ctx.leases_seen.interrupted(Timestamp::now());
    }
    if !matches!(error, Error::Conflict) {
        tracing::warn!(job = %job.name_any(), %error, "reconcile failed");
    }
    Action::requeue(jittered(Duration::from_millis(
        if matches!(error, Error::Conflict) {
            100
        } else {
            2000
        },
    )))
}
