//! Which queued job does a runner take next? The oldest Queued job of its lane (admission
//! time, then namespace and name). The claim itself is a status write with a resourceVersion
//! precondition, so no job runs twice: see `transitions::claimed`.

use std::borrow::Borrow;

use framelane_api::{VideoJob, videojob::JobPhase};
use jiff::Timestamp;

/// Whether a runner of `lane` may take `job`: Queued in that lane and not being deleted.
pub fn claimable(job: &VideoJob, lane: &str) -> bool {
    let status = job.status.as_ref();
    job.metadata.deletion_timestamp.is_none()
        && status.and_then(|s| s.lane.as_deref()) == Some(lane)
        && status.and_then(|s| s.phase) == Some(JobPhase::Queued)
}

/// The FIFO key of a queued job: admission time, then namespace and name.
pub fn queue_key(job: &VideoJob) -> (Option<Timestamp>, String, String) {
    let queued = job
        .status
        .as_ref()
        .and_then(|s| s.queued_at.as_ref())
        .map(|t| t.0);
    (
        queued,
        job.metadata.namespace.clone().unwrap_or_default(),
        job.metadata.name.clone().unwrap_or_default(),
    )
}

/// The jobs a runner of `lane` may take, in the order to try them.
pub fn claim_order<J: Borrow<VideoJob>>(jobs: impl IntoIterator<Item = J>, lane: &str) -> Vec<J> {
    let mut claimable: Vec<J> = jobs
        .into_iter()
        .filter(|j| claimable(j.borrow(), lane))
        .collect();
    claimable.sort_by_key(|j| queue_key(j.borrow()));
    claimable
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(name: &str, lane: &str, phase: &str, queued_at: &str) -> VideoJob {
        serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"model": "anisora", "prompt": "a cat"},
            "status": {"phase": phase, "lane": lane, "queuedAt": queued_at}
        }))
        .unwrap()
    }

    #[test]
    fn a_runner_takes_its_own_lanes_queued_jobs_oldest_first() {
        let mut deleted = job(
            "deleted",
            "anisora",
            "Queued",
            "2026-12-01T00:00:00.000001Z",
        );
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::from_second(1_800_000_000).unwrap(),
            ));
        let jobs = vec![
            job("later", "anisora", "Queued", "2026-12-01T00:00:00.000003Z"),
            job(
                "other-lane",
                "phr00t",
                "Queued",
                "2026-12-01T00:00:00.000000Z",
            ),
            job(
                "running",
                "anisora",
                "Running",
                "2026-12-01T00:00:00.000000Z",
            ),
            job("first", "anisora", "Queued", "2026-12-01T00:00:00.000002Z"),
            deleted,
        ];
        let order: Vec<String> = claim_order(&jobs, "anisora")
            .into_iter()
            .map(|j| j.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(order, ["first", "later"]);
    }
}
