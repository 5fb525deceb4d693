//! The ModelLane controller: keeps each lane's runner pods and queue positions, asks
//! `framelane_core::lane_status` what the lane's status should say, writes it (server-side
//! apply) and posts the Events a change implies.

pub mod pods;
mod sync;

use std::{sync::Arc, time::Duration};

use framelane_api::{ModelLane, reasons::LaneReason};
use framelane_core::lane_status::{self, LaneFacts, next_look};
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

pub async fn reconcile(lane: Arc<ModelLane>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .timed("modellane", reconcile_inner(&lane, &ctx))
        .await
}

async fn reconcile_inner(lane: &ModelLane, ctx: &Context) -> Result<Action, Error> {
    if lane.meta().deletion_timestamp.is_some() {
        // Its pods are owned by it: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let name = lane.name_any();
    let pods = sync::pods(lane, ctx).await?;
    sync::positions(lane, ctx).await?;
    let now = Timestamp::now();
    let facts = LaneFacts {
        availability: ctx.lane_availability(lane, now),
        depth: ctx.index().queues.depth(&name),
        pods,
        allocator_override: pods::allocator_override(lane),
        now,
    };
    let (status, events) = lane_status::desired(lane, &facts);
    for event in &events {
        let type_ = if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, lane, type_, event.reason, &event.note);
    }
    if status.phase != lane.status.as_ref().and_then(|s| s.phase) {
        tracing::info!(lane = %name, phase = ?status.phase, ready = status.ready_runners, "lane phase changed");
    }
    if lane.status.as_ref() != Some(&status) {
        let apply =
            json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane", "status": status});
        Api::<ModelLane>::all(ctx.client.clone())
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await?;
    }
    record_metrics(ctx, lane, &facts);
    Ok(Action::requeue(next_look(
        &facts.availability,
        now,
        ctx.config.lane_resync_seconds,
    )))
}

fn record_metrics(ctx: &Context, lane: &ModelLane, facts: &LaneFacts) {
    let labels = Metrics::lane(&lane.name_any());
    let m = &ctx.metrics;
    m.queue_depth.get_or_create(&labels).set(facts.depth as i64);
    m.queue_max_depth
        .get_or_create(&labels)
        .set(ctx.lane_limits(lane).max_depth as i64);
    m.ready_runners
        .get_or_create(&labels)
        .set(i64::from(facts.availability.fresh));
}

fn publish(ctx: &Context, lane: &ModelLane, type_: EventType, reason: LaneReason, note: &str) {
    ctx.events
        .publish(lane.object_ref(&()), type_, reason.as_str(), note);
}

pub fn error_policy(lane: Arc<ModelLane>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("modellane", error);
    tracing::warn!(lane = %lane.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(1))
}
