//! Admission: slots are reserved in the index in creation order, and each reserved admission
//! is one status write.

use std::{sync::Arc, time::Duration};

use framelane_api::{VideoJob, modellane::FallbackCause, videojob::LaneAssignment};
use framelane_contract::api_errors::is_not_found;
use framelane_core::{
    depth::room,
    index::{Index, Reservation, creation_key},
    lifecycle::{Decision, decide},
    parameters::violations,
    routing::lane_for,
    transitions::{self, Admission},
};
use jiff::Timestamp;
use kube::{ResourceExt, runtime::controller::Action};
use rand::Rng;

use super::{apply, facts, record};
use crate::{
    context::{Context, admitted, promised},
    error::Error,
};

/// Admits `job`. Slots are reserved in the index, in creation order, for every job created up
/// to and including it that still waits: a lane's FIFO order is the order users created the
/// jobs in, however the reconciles of a burst interleave, and the depth check and the slot it
/// takes are one step (the final arbiter of the depth limit). The API writes then run outside
/// the lock, so the admissions of a burst proceed in parallel.
pub async fn in_creation_order(job: &VideoJob, ctx: &Context) -> Result<Action, Error> {
    let (reservation, reserved_in) = {
        let mut index = ctx.index();
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
        let facts = facts(job, ctx, Timestamp::now(), &ctx.index());
        return match decide(job, &facts) {
            Decision::Fail { reason, message } => apply::fail(job, ctx, reason, &message).await,
            _ => Ok(Action::requeue(Duration::from_millis(200))),
        };
    };
    let result = write(job, ctx, &reservation).await;
    ctx.update_index(|index| {
        let mut changed = index.settle(job, result.as_ref().ok(), Timestamp::now());
        if matches!(&result, Err(Error::Kube(e)) if is_not_found(e)) {
            changed.extend(index.forget(job));
        }
        changed
    });
    result?;
    let max_wait = ctx
        .cached_lane(&reservation.lane)
        .map_or(Duration::from_secs(30), |l| ctx.lane_limits(&l).max_wait);
    Ok(Action::requeue(max_wait))
}

/// Reserves slots, oldest first, for the jobs created up to `job` that wait for admission
/// and fit their lane; returns `job`'s reservation if it got one, and the lanes that took
/// slots.
fn reserve_backlog(
    job: &VideoJob,
    ctx: &Context,
    index: &mut Index,
) -> (Option<Reservation>, Vec<String>) {
    // The jobs awaiting admission up to this one, oldest first, and this one itself (after a
    // failed write it is no longer in the index's list).
    let mut backlog: Vec<Arc<VideoJob>> = index
        .awaiting_upto(creation_key(job))
        .iter()
        .filter_map(|key| ctx.cached_job(key))
        .filter(|j| j.uid() != job.uid())
        .collect();
    backlog.push(Arc::new(job.clone()));
    backlog.retain(|j| index.knows(j) && !index.is_stale(j) && index.reservation(j).is_none());
    backlog.sort_by_key(|j| creation_key(j));
    let now = Timestamp::now();
    let (lanes, models) = (ctx.lanes.state(), ctx.models.state());
    let mut mine = None;
    let mut lanes_reserved = Vec::new();
    for pending in backlog {
        let Ok(route) = lane_for(&pending.spec.model, &models, &lanes) else {
            continue;
        };
        // A job its model refuses (created while the webhook did not check it) takes no
        // slot: its own reconcile fails it with InvalidParameters.
        if !violations(&pending.spec, &models, &ctx.config.image_url_hosts).is_empty() {
            continue;
        }
        let name = route.name();
        let namespace = pending.metadata.namespace.as_deref().unwrap_or_default();
        let held = admitted(index, &name, namespace);
        if room(&name, namespace, held, ctx.lane_limits(route.lane)).is_err() {
            continue;
        }
        let fallback = route.cause.zip(route.from);
        let reservation = index.reserve(&pending, &name, fallback, now);
        if !lanes_reserved.contains(&name) {
            lanes_reserved.push(name);
        }
        if pending.uid() == job.uid() {
            mine = Some(reservation);
        }
    }
    (mine, lanes_reserved)
}

/// Writes a reserved admission: one Queued status write, conditional on the job being
/// unchanged since the reservation.
async fn write(job: &VideoJob, ctx: &Context, r: &Reservation) -> Result<VideoJob, Error> {
    let seed = match job.spec.seed {
        Some(seed) if seed >= 0 => seed,
        _ => i64::from(rand::rng().random::<u32>()),
    };
    let assignment = match r.fallback {
        Some(_) => LaneAssignment::Fallback,
        None => LaneAssignment::Dedicated,
    };
    let admission = Admission {
        lane: r.lane.clone(),
        assignment,
        fallback: r.fallback.clone(),
        queued_at: r.queued_at,
        position: r.position,
        seed,
    };
    let status = transitions::admitted(job, &admission, Timestamp::now());
    let written = apply::replace_status(ctx, job, status).await?;
    record::admitted(ctx, job, &admission);
    Ok(written)
}

/// Moves a queued job to its lane's fallback lane `to`: a slot there is taken under the
/// index's lock (the fallback lane's `maxDepth` holds), then the move is one status write.
pub async fn move_to(
    job: &VideoJob,
    ctx: &Context,
    to: &str,
    cause: FallbackCause,
) -> Result<Action, Error> {
    let queued_at = job
        .status
        .as_ref()
        .and_then(|s| s.queued_at.as_ref())
        .map_or_else(Timestamp::now, |t| t.0);
    let Some(target) = ctx.cached_lane(to) else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let namespace = job.metadata.namespace.as_deref().unwrap_or_default();
    let reservation = {
        let mut index = ctx.index();
        if index.is_stale(job)
            || room(
                to,
                namespace,
                promised(&index, &ctx.lanes.state(), to, namespace),
                ctx.lane_limits(&target),
            )
            .is_err()
        {
            None
        } else {
            Some(index.reserve_move(job, to, cause, queued_at))
        }
    };
    let Some(reservation) = reservation else {
        // Filled (or the job changed) since the decision: decide again.
        return Ok(Action::requeue(Duration::from_millis(200)));
    };
    let from = job
        .status
        .as_ref()
        .and_then(|s| s.lane.clone())
        .unwrap_or_default();
    ctx.notify_lanes(vec![from.clone(), to.to_string()]);
    let status = transitions::moved(job, to, reservation.position, cause, Timestamp::now());
    let result = apply::replace_status(ctx, job, status).await;
    ctx.update_index(|index| {
        let mut changed = index.settle(job, result.as_ref().ok(), Timestamp::now());
        if matches!(&result, Err(e) if is_not_found(e)) {
            changed.extend(index.forget(job));
        }
        changed
    });
    result?;
    record::moved(ctx, job, &from, to, cause, reservation.position);
    Ok(Action::requeue(ctx.lane_limits(&target).max_wait))
}
