//! The ModelLane controller: keeps each lane's runner pods, and writes its status (phase,
//! ready runners from heartbeats, queue depth, since when it has had no fresh runner) and
//! its queued jobs' positions.

pub mod pods;

use std::{sync::Arc, time::Duration};

use framelane_api::{
    ModelLane, VideoJob,
    modellane::{LanePhase, ModelLaneStatus},
    runner::set_condition,
    wellknown::{ALLOC_CONF_ENV, LABEL_LANE, Reason, lane_condition},
};
use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;

use crate::{context::Context, error::Error, metrics::Metrics};

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
    let pods_created = sync_pods(lane, ctx).await?;
    let now = Timestamp::now();
    let availability = ctx.lane_availability(lane, now);
    sync_positions(lane, ctx).await?;

    let replicas = lane.spec.replicas.unwrap_or(1).max(1);
    let phase = match availability.fresh {
        0 => LanePhase::Unavailable,
        n if n < replicas => LanePhase::Degraded,
        _ => LanePhase::Ready,
    };
    let depth = ctx.index.lock().expect("index lock").queues.depth(&name) as i32;
    let old = lane.status.clone().unwrap_or_default();
    let mut status = ModelLaneStatus {
        phase: Some(phase),
        ready_runners: availability.fresh,
        queue_depth: depth,
        fallback: old.fallback.clone(),
        observed_generation: lane.metadata.generation,
        conditions: old.conditions.clone(),
    };
    let generation = lane.metadata.generation;
    let available_msg = format!(
        "{} of {replicas} runners have a fresh heartbeat",
        availability.fresh
    );
    let reason = if availability.fresh > 0 {
        Reason::Started
    } else {
        Reason::RunnerLost
    };
    set_condition(
        &mut status.conditions,
        lane_condition::AVAILABLE,
        availability.fresh > 0,
        reason,
        &available_msg,
        generation,
    );
    // The durable record of the outage, which queued jobs' maxWaitSeconds counts from: when
    // the last runner stopped being fresh (not when this reconcile noticed it), and later
    // if a runner was fresh since. It outlives the runners' Leases and this replica.
    if let Some(since) = availability.unavailable_since
        && let Some(available) = status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == lane_condition::AVAILABLE)
    {
        available.last_transition_time = Time(since);
    }
    match &pods_created {
        Ok(()) => set_condition(
            &mut status.conditions,
            lane_condition::PODS_READY,
            true,
            Reason::Started,
            "every runner pod exists",
            generation,
        ),
        Err(why) => set_condition(
            &mut status.conditions,
            lane_condition::PODS_READY,
            false,
            Reason::GenerationFailed,
            why,
            generation,
        ),
    }
    let overridden = pods::allocator_override(lane);
    if let Some(value) = &overridden {
        let message = format!(
            "spec.runner.env sets {ALLOC_CONF_ENV}={value}, replacing expandable_segments:True; \
             model switches may fragment GPU memory and run out of it"
        );
        let was = old
            .conditions
            .iter()
            .any(|c| c.type_ == lane_condition::ALLOCATOR_OVERRIDDEN && c.status == "True");
        set_condition(
            &mut status.conditions,
            lane_condition::ALLOCATOR_OVERRIDDEN,
            true,
            Reason::Started,
            &message,
            generation,
        );
        if !was {
            publish(
                ctx,
                lane,
                EventType::Warning,
                "AllocatorOverridden",
                &message,
            );
        }
    } else {
        status
            .conditions
            .retain(|c| c.type_ != lane_condition::ALLOCATOR_OVERRIDDEN);
    }

    if old.phase != status.phase {
        let note = format!("lane is {phase:?}: {available_msg}");
        let type_ = if phase == LanePhase::Ready {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, lane, type_, &format!("{phase:?}"), &note);
        tracing::info!(lane = %name, ?phase, ready = availability.fresh, "lane phase changed");
    }
    if old != status {
        let api: Api<ModelLane> = Api::all(ctx.client.clone());
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    ctx.metrics
        .queue_depth
        .get_or_create(&Metrics::lane(&name))
        .set(i64::from(depth));
    ctx.metrics
        .queue_max_depth
        .get_or_create(&Metrics::lane(&name))
        .set(ctx.lane_limits(lane).0 as i64);
    ctx.metrics
        .ready_runners
        .get_or_create(&Metrics::lane(&name))
        .set(i64::from(availability.fresh));

    // Heartbeats expire without an event: look again when the first fresh one would.
    let resync = ctx.config.lane_resync_seconds;
    let next = availability
        .next_expiry
        .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
        .map_or(resync, |d| d + Duration::from_millis(100));
    Ok(Action::requeue(next.min(resync)))
}

/// Creates the missing runner pods and deletes the ones the lane no longer wants. `Err`
/// carries why a pod could not be created (for example a ResourceQuota refusal).
async fn sync_pods(lane: &ModelLane, ctx: &Context) -> Result<Result<(), String>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let desired = pods::desired_pods(lane, &ctx.config);
    let existing = api
        .list(&ListParams::default().labels(&format!("{LABEL_LANE}={}", lane.name_any())))
        .await?
        .items;
    let mut outcome = Ok(());
    for pod in &desired {
        let exists = existing
            .iter()
            .any(|p| p.name_any() == pod.name_any() && p.metadata.deletion_timestamp.is_none());
        if exists {
            continue;
        }
        match api.create(&PostParams::default(), pod).await {
            Ok(_) => {
                publish(
                    ctx,
                    lane,
                    EventType::Normal,
                    "PodCreated",
                    &format!("created runner pod {}", pod.name_any()),
                );
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => {
                let message = format!("cannot create runner pod {}: {}", pod.name_any(), s.message);
                publish(ctx, lane, EventType::Warning, "PodCreateFailed", &message);
                outcome = Err(message);
            }
            Err(e) => return Err(e.into()),
        }
    }
    for pod in existing {
        let wanted = desired.iter().any(|d| d.name_any() == pod.name_any());
        if !wanted && pod.metadata.deletion_timestamp.is_none() {
            match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            publish(
                ctx,
                lane,
                EventType::Normal,
                "PodDeleted",
                &format!("deleted runner pod {} (lane changed)", pod.name_any()),
            );
        }
    }
    Ok(outcome)
}

/// Writes `queuePosition` of every queued job of the lane whose position changed. Each write
/// carries the resourceVersion the index saw, so it never lands on a job a runner just took.
async fn sync_positions(lane: &ModelLane, ctx: &Context) -> Result<(), Error> {
    let wanted: Vec<(crate::queue::JobKey, i32)> = {
        let index = ctx.index.lock().expect("index lock");
        index
            .queues
            .lane(&lane.name_any())
            .map(|q| q.positions().map(|(k, p)| (k.clone(), p)).collect())
            .unwrap_or_default()
    };
    for (key, position) in wanted {
        let api: Api<VideoJob> = Api::namespaced(ctx.client.clone(), &key.namespace);
        let Some(job) = ctx.jobs_cache(&key) else {
            continue;
        };
        let status = job.status.as_ref();
        // Admissions still being written get their position with their Queued status.
        if status.and_then(|s| s.phase) != Some(framelane_api::videojob::JobPhase::Queued) {
            continue;
        }
        if status.and_then(|s| s.queue_position) == Some(position) {
            continue;
        }
        let message = format!("waiting in lane {} at position {position}", lane.name_any());
        let patch = json!({"metadata": {"resourceVersion": job.resource_version()},
            "status": {"queuePosition": position, "message": message}});
        match api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => {
                ctx.index.lock().expect("index lock").observe(&written);
            }
            // Changed meanwhile (claimed, deleted): the change triggers another pass.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn publish(ctx: &Context, lane: &ModelLane, type_: EventType, reason: &str, note: &str) {
    ctx.events
        .publish(lane.object_ref(&()), type_, reason, note);
}

pub fn error_policy(lane: Arc<ModelLane>, error: &Error, ctx: Arc<Context>) -> Action {
    let labels = crate::metrics::ErrorLabels {
        controller: "modellane".into(),
        error: error.kind().into(),
    };
    ctx.metrics.reconcile_errors.get_or_create(&labels).inc();
    tracing::warn!(lane = %lane.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(1))
}
