//! What the lane reconciler keeps in step: the lane's runner pods and its queued jobs'
//! positions.

use framelane_api::{
    ModelLane, VideoJob, reasons::LaneReason, videojob::JobPhase, wellknown::LABEL_LANE,
};
use framelane_contract::api_errors::{ignore_not_found, is_conflict, is_not_found, refusal};
use framelane_core::{
    fallback::{quota_without_room, unschedulable},
    queue::JobKey,
    transitions::waiting_message,
};
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::events::EventType,
};
use serde_json::json;

use super::{pods::desired_pods, publish};
use crate::{context::Context, error::Error};

/// What keeping a lane's runner pods found.
pub struct Pods {
    /// `Err`: why a pod could not be created.
    pub created: Result<(), String>,
    /// A ResourceQuota with no room for a refused pod (`fallback::quota_without_room`).
    pub quota: Option<String>,
    /// Since when a runner pod cannot be scheduled, and why (`fallback::unschedulable`).
    pub unschedulable: Option<(jiff::Timestamp, String)>,
}

/// Creates the missing runner pods and deletes the ones the lane no longer wants.
pub async fn pods(lane: &ModelLane, ctx: &Context) -> Result<Pods, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let desired = desired_pods(lane, &ctx.config, &ctx.models.state());
    let existing = api
        .list(&ListParams::default().labels(&format!("{LABEL_LANE}={}", lane.name_any())))
        .await?
        .items;
    // A pod that ended (evicted, refused by its node, its node shut down) never runs again
    // under `restartPolicy: Always`, and nothing else deletes it: deleted here, it is made
    // anew once gone (its name is taken until then).
    for pod in existing.iter().filter(|p| ended(p)) {
        ignore_not_found(api.delete(&pod.name_any(), &DeleteParams::default()).await)?;
        let status = pod.status.as_ref();
        let why = [
            status.and_then(|s| s.reason.as_deref()),
            status.and_then(|s| s.message.as_deref()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
        let note = format!(
            "deleted runner pod {} ({}); a new one replaces it",
            pod.name_any(),
            if why.is_empty() { "it failed" } else { &why }
        );
        publish(ctx, lane, EventType::Warning, LaneReason::PodDeleted, &note);
    }
    let mut created = Ok(());
    let mut quota = None;
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
                created = Err(message);
                if quota.is_none() {
                    quota = quota_refusing(&api, pod).await?;
                }
                continue;
            }
        };
        publish(ctx, lane, EventType::Normal, LaneReason::PodCreated, &note);
    }
    let unschedulable = unschedulable(
        existing
            .iter()
            .filter(|p| desired.iter().any(|d| d.name_any() == p.name_any())),
    );
    for pod in existing {
        let wanted = desired.iter().any(|d| d.name_any() == pod.name_any());
        if !wanted && pod.metadata.deletion_timestamp.is_none() && !ended(&pod) {
            ignore_not_found(api.delete(&pod.name_any(), &DeleteParams::default()).await)?;
            let note = format!("deleted runner pod {} (lane changed)", pod.name_any());
            publish(ctx, lane, EventType::Normal, LaneReason::PodDeleted, &note);
        }
    }
    Ok(Pods {
        created,
        quota,
        unschedulable,
    })
}

/// Whether `pod` ended for good (phase Failed or Succeeded) and is not yet being deleted.
fn ended(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Failed" | "Succeeded")
        )
}

/// Which ResourceQuota of the pods' namespace has no room for `pod`, if one has none.
async fn quota_refusing(pods: &Api<Pod>, pod: &Pod) -> Result<Option<String>, Error> {
    let quotas: Api<ResourceQuota> = Api::namespaced(
        pods.clone().into_client(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let quotas = quotas.list(&ListParams::default()).await?.items;
    let resources = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .find_map(|c| c.resources.clone())
        .unwrap_or_default();
    Ok(quota_without_room(&resources, &quotas))
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
            Ok(written) => {
                ctx.update_index(|index| index.observe_written(&written, jiff::Timestamp::now()))
            }
            // Changed meanwhile (claimed, deleted): the change triggers another pass.
            Err(e) if is_conflict(&e) || is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
