//! The ModelLane controller: keeps each lane's runner pods and queue positions, asks
//! `framelane_core::lane_status` what the lane's status should say (its fallback episode
//! included), writes it (server-side apply) and posts the Events a change implies.

pub mod pods;
mod sync;

use framelane_contract::backoff::jittered;
use std::{sync::Arc, time::Duration};

use framelane_api::{ModelLane, ModelLaneStatus, modellane::FallbackCause, reasons::LaneReason};
use framelane_core::{
    fallback::{self, Change, Signals},
    lane_status::{self, Desired, LaneFacts, next_look},
    timeouts::until,
};
use jiff::Timestamp;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use crate::{context::Context, error::Error, metrics::Metrics};

/// The field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "framelane-operator";

/// Whether the lane's `spec.fallback.lane` can take its jobs: it exists and serves one of
/// the lane's models (routing sends a model's jobs only to a fallback lane that serves it).
fn fallback_lane(lane: &ModelLane, ctx: &Context) -> Result<(), String> {
    let Some(spec) = &lane.spec.fallback else {
        return Ok(());
    };
    let Some(fallback) = ctx.cached_lane(&spec.lane) else {
        let among = if ctx.config.lane_selector.is_some() {
            " among the lanes this operator manages (--lane-selector)"
        } else {
            ""
        };
        return Err(format!(
            "spec.fallback.lane: lane {} does not exist{among}; create it or name an existing lane",
            spec.lane
        ));
    };
    if lane
        .spec
        .models
        .iter()
        .any(|m| fallback.spec.models.contains(m))
    {
        return Ok(());
    }
    Err(format!(
        "spec.fallback.lane: lane {} serves none of this lane's models ({}); add them to its \
         spec.models or name another lane",
        spec.lane,
        lane.spec.models.join(", ")
    ))
}

pub async fn reconcile(lane: Arc<ModelLane>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .timed("modellane", reconcile_inner(&lane, &ctx))
        .await
}

async fn reconcile_inner(lane: &ModelLane, ctx: &Context) -> Result<Action, Error> {
    // A replica whose leadership is not confirmed writes nothing: it is about to exit.
    if !ctx.leading() {
        return Ok(Action::await_change());
    }
    if lane.meta().deletion_timestamp.is_some() {
        // Its pods are owned by it: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    // The runner pods' names cover their models: before the VideoModels are read, every
    // pod would look changed.
    if !ctx.synced() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let name = lane.name_any();
    let pods = sync::pods(lane, ctx).await?;
    sync::positions(lane, ctx).await?;
    let now = Timestamp::now();
    let availability = ctx.lane_availability(lane, now);
    let signals = Signals {
        forced: lane.spec.fallback.as_ref().is_some_and(|f| f.force),
        quota: pods.quota,
        unschedulable: pods.unschedulable,
        availability: &availability,
        grace: ctx.config.fallback_grace_seconds,
        now,
    };
    let facts = LaneFacts {
        fallback: fallback::trigger(&signals),
        fallback_lane: fallback_lane(lane, ctx),
        availability: availability.clone(),
        depth: ctx.index().queues.depth(&name),
        pods: pods.created,
        allocator_override: pods::allocator_override(lane),
        now,
    };
    let Desired {
        status,
        events,
        episode,
    } = lane_status::desired(lane, &facts);
    if lane.status.as_ref() != Some(&status) {
        // Conditional on the lane being as read: a reconcile that ran before the cache showed
        // this replica's last write would decide from the status before it (and tell an
        // episode's start twice); it gets a conflict and looks again.
        let apply = json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"resourceVersion": lane.resource_version()}, "status": status});
        Api::<ModelLane>::all(ctx.client.clone())
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await?;
        if status.phase != lane.status.as_ref().and_then(|s| s.phase) {
            tracing::info!(lane = %name, phase = ?status.phase, ready = status.ready_runners, "lane phase changed");
        }
        // Written: this replica tells what changed, once (a later leader reads the episode
        // from the status and sees no change).
        for event in &events {
            let type_ = if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(ctx, lane, type_, event.reason, &event.note);
        }
        record_episode(ctx, lane, &episode);
        if !episode.is_empty() {
            ctx.notify_queued(&name);
        }
    }
    record_metrics(ctx, lane, &facts, &status);
    let look = next_look(&availability, now, ctx.config.lane_resync_seconds);
    // A lane without runners becomes a capacity episode when the grace period ends.
    let grace = fallback::grace_ends(&signals).map_or(look, |at| look.min(until(now, at)));
    Ok(Action::requeue(grace))
}

/// One log line and the metrics for each start and end of an episode (its Events come with
/// the status).
fn record_episode(ctx: &Context, lane: &ModelLane, changes: &[Change]) {
    let name = lane.name_any();
    let to = lane.spec.fallback.as_ref().map_or("", |f| f.lane.as_str());
    for change in changes {
        match change {
            Change::Started(t) => {
                ctx.metrics
                    .fallback_activations
                    .get_or_create(&Metrics::fallback(&name, t.cause))
                    .inc();
                tracing::warn!(lane = name, fallback_lane = to, cause = t.cause.as_str(), since = %t.since, detail = t.detail, "fallback started");
            }
            Change::Ended(e) => {
                ctx.metrics
                    .fallback_duration
                    .get_or_create(&Metrics::fallback(&name, e.cause))
                    .observe(e.duration_seconds);
                tracing::info!(
                    lane = name,
                    fallback_lane = to,
                    cause = e.cause.as_str(),
                    duration_seconds = e.duration_seconds,
                    "fallback ended"
                );
            }
        }
    }
}

fn record_metrics(ctx: &Context, lane: &ModelLane, facts: &LaneFacts, status: &ModelLaneStatus) {
    let name = lane.name_any();
    let labels = Metrics::lane(&name);
    let m = &ctx.metrics;
    m.queue_depth.get_or_create(&labels).set(facts.depth as i64);
    m.queue_max_depth
        .get_or_create(&labels)
        .set(ctx.lane_limits(lane).max_depth as i64);
    m.ready_runners
        .get_or_create(&labels)
        .set(i64::from(facts.availability.fresh));
    let active = status
        .fallback
        .as_ref()
        .filter(|f| f.active)
        .and_then(|f| f.cause);
    // Also once the lane's fallback was removed: an episode it ended must not stay at 1.
    let shown = FallbackCause::ALL.iter().any(|&c| {
        m.fallback_active
            .get(&Metrics::fallback(&name, c))
            .is_some()
    });
    if lane.spec.fallback.is_some() || active.is_some() || shown {
        for cause in FallbackCause::ALL {
            m.fallback_active
                .get_or_create(&Metrics::fallback(&name, cause))
                .set(i64::from(active == Some(cause)));
        }
    }
}

fn publish(ctx: &Context, lane: &ModelLane, type_: EventType, reason: LaneReason, note: &str) {
    ctx.events
        .publish(lane.object_ref(&()), type_, reason.as_str(), note);
}

pub fn error_policy(lane: Arc<ModelLane>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("modellane", error);
    if error.api_unreachable() {
        ctx.leases_seen.interrupted(jiff::Timestamp::now());
    }
    if matches!(error, Error::Conflict) {
        return Action::requeue(jittered(Duration::from_millis(100)));
    }
    tracing::warn!(lane = %lane.name_any(), %error, "reconcile failed");
    Action::requeue(jittered(Duration::from_secs(1)))
}
