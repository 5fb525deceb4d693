//! etcd stopped in the middle of a run, on the real local control plane. Its own test binary:
//! stopping etcd would disrupt any test running beside it.

mod support;

use std::time::Duration;

use anyhow::Result;
use framelane_api::videojob::JobPhase;
use serde_json::json;
use support::{Behaviour, Fixture, Outage, burst, eventually, phase};

/// While etcd is down the API server answers every write and most reads with an error, and
/// its watches go quiet. A running job goes on (its progress and final writes are retried),
/// queued jobs keep their places, and once etcd is back every job runs exactly once and the
/// lane's depth is exact.
#[tokio::test]
async fn an_etcd_outage_loses_no_job_runs_none_twice_and_keeps_depth_exact() -> Result<()> {
    let fx = Fixture::new("etcd").await?;
    let model = fx.model("anisora", 10, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxDepth": 5, "maxWaitSeconds": 3600}}),
        )
        .await?;
    // The leader keeps leading through the outage (it gives up after 2/3 of its Lease).
    let (op, port) = fx.webhook_operator("op", 0, &["--leader-lease-seconds", "300"])?;
    op.until_leading().await?;
    fx.register_webhook(port).await?;
    fx.webhook_effective(&model).await?;
    let _runner = fx.runner(
        "runner",
        &lane,
        Behaviour {
            steps: 10,
            step_time: Duration::from_millis(400),
            permits: None,
        },
    );
    let jobs = fx.jobs_without_retries().await?;
    let (admitted, _) = burst(&jobs, &model, "before", 5).await;
    assert_eq!(admitted, 5);
    let running = eventually(60, "a job Running past step 2", || async {
        Ok(fx.list_jobs().await?.into_iter().find(|job| {
            phase(job) == Some(JobPhase::Running)
                && job
                    .status
                    .as_ref()
                    .and_then(|s| s.progress.as_ref())
                    .is_some_and(|p| p.step >= 2)
        }))
    })
    .await?;

    let mut outage = Outage::begin("etcd").await?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    outage.end().await?;

    let done = eventually(120, "every job to finish", || async {
        let all = fx.list_jobs().await?;
        Ok(all
            .iter()
            .all(|job| matches!(phase(job), Some(JobPhase::Succeeded | JobPhase::Failed)))
            .then_some(all))
    })
    .await?;
    assert_eq!(done.len(), 5);
    for job in &done {
        let status = job.status.clone().unwrap_or_default();
        assert_eq!(status.phase, Some(JobPhase::Succeeded), "{status:?}");
        assert_eq!(status.attempts, Some(1), "ran more than once: {status:?}");
    }
    let log = op.log_text();
    assert!(!log.contains("job requeued"), "operator log:\n{log}");
    let events = fx
        .ns
        .kubectl()
        .args(["get", "events", "-o", "custom-columns=REASON:.reason"])
        .output()?;
    let reasons = String::from_utf8(events.stdout)?;
    for refused in ["RunnerLost", "QueueWaitTimeout", "QueueOverloaded"] {
        assert!(
            !reasons.contains(refused),
            "{refused} in Events:\n{reasons}"
        );
    }
    let name = running.metadata.name.unwrap_or_default();
    assert!(
        done.iter()
            .any(|j| j.metadata.name.as_deref() == Some(&name))
    );

    // The lane counts exactly: with its 5 jobs finished, a burst gets exactly 5 slots.
    let (admitted, refused) = burst(&jobs, &model, "after", 20).await;
    assert_eq!(
        admitted,
        5,
        "refusals: {:?}",
        refused.first().map(|r| &r.message)
    );
    Ok(())
}
