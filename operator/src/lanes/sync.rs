//! What the lane reconciler keeps in step: the lane's runner pods and its queued jobs'
//! positions.

use framelane_api::{
    ModelLane, VideoJob, reasons::LaneReason, videojob::JobPhase, wellknown::LABEL_LANE,
};
use framelane_contract::api_errors::{ignore_not_found, is_conflict, is_not_found, refusal};
use framelane_core::{queue::JobKey, transitions::waiting_message};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::events::EventType,
};
use serde_json::json;

use super::{pods::desired_pods, publish};
use crate::{context::Context, error::Error};

/// Creates the missing runner pods and deletes the ones the lane no longer wants. `Err`
/// carries why a pod could not be created (for example a ResourceQuota refusal).
pub async fn pods(lane: &ModelLane, ctx: &Context) -> Result<Result<(), String>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let desired = desired_pods(lane, &ctx.config);
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
        let note = match api.create(&PostParams::default(), pod).await {
            Ok(_) => format!("created runner pod {}", pod.name_any()),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => {
                let Some(why) = refusal(&e) else {
                    return Err(e.into());
                };
                let message = format!("cannot create runner pod {}: {why}", pod.name_any());
                publish(
                    ctx,
                    lane,
                    EventType::Warning,
                    LaneReason::PodCreateRefused,
                    &message,
                );
                outcome = Err(message);
                continue;
            }
        };
        publish(ctx, lane, EventType::Normal, LaneReason::PodCreated, &note);
    }
    for pod in existing {
        let wanted = desired.iter().any(|d| d.name_any() == pod.name_any());
        if !wanted && pod.metadata.deletion_timestamp.is_none() {
            ignore_not_found(api.delete(&pod.name_any(), &DeleteParams::default()).await)?;
            let note = format!("deleted runner pod {} (lane changed)", pod.name_any());
            publish(ctx, lane, EventType::Normal, LaneReason::PodDeleted, &note);
        }
    }
    Ok(outcome)
}

/// Writes `queuePosition` of every queued job of the lane whose position changed. Each write
/// carries the resourceVersion the index saw, so it never lands on a job a runner just took.
pub async fn positions(lane: &ModelLane, ctx: &Context) -> Result<(), Error> {
    let name = lane.name_any();
    let wanted: Vec<(JobKey, i32)> = ctx
        .index()
        .queues
        .lane(&name)
        .map(|q| q.positions().map(|(k, p)| (k.clone(), p)).collect())
        .unwrap_or_default();
    for (key, position) in wanted {
        let Some(job) = ctx.cached_job(&key) else {
            continue;
        };
        let status = job.status.as_ref();
        // Admissions still being written get their position with their Queued status.
        if status.and_then(|s| s.phase) != Some(JobPhase::Queued)
            || status.and_then(|s| s.queue_position) == Some(position)
        {
            continue;
        }
        let patch = json!({"metadata": {"resourceVersion": job.resource_version()},
            "status": {"queuePosition": position, "message": waiting_message(&name, position)}});
        let api: Api<VideoJob> = Api::namespaced(ctx.client.clone(), &key.namespace);
        match api
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => ctx.update_index(|index| index.observe_written(&written)),
            // Changed meanwhile (claimed, deleted): the change triggers another pass.
            Err(e) if is_conflict(&e) || is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
