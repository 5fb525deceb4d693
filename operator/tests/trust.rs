//! Who holds a job, on the real local control plane: a runner's identity includes its start
//! (its incarnation), so a container restarted under the same pod name is a new holder and
//! the job its earlier start was running is requeued, not left Running.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use framelane_api::videojob::JobPhase;
use k8s_openapi::api::coordination::v1::Lease;
use serde_json::json;
use support::{Behaviour, Fixture, events_about, eventually, phase};

#[tokio::test]
async fn a_runner_restarted_under_the_same_pod_name_loses_its_old_job() -> Result<()> {
    let fx = Fixture::new("restart").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let slow = Behaviour {
        steps: 60,
        step_time: Duration::from_millis(500),
        permits: None,
    };
    let first = fx.runner("runner-a", &lane, slow);
    fx.create_job("interrupted", &model).await?;
    let held = eventually(30, "runner-a running the job", || async {
        let job = fx.jobs.get("interrupted").await?;
        let status = job.status.unwrap_or_default();
        Ok((status.phase == Some(JobPhase::Running))
            .then_some(status.runner_incarnation)
            .flatten())
    })
    .await?;

    // The container restarts within a heartbeat (3 s): the same pod name renews the same
    // Lease, so the Lease stays fresh throughout.
    first.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _again = fx.runner("runner-a", &lane, Behaviour::default());

    let done = eventually(30, "the job requeued and run by the new start", || async {
        let job = fx.jobs.get("interrupted").await?;
        Ok((phase(&job) == Some(JobPhase::Succeeded)).then_some(job))
    })
    .await
    .context("the job stayed with the start that no longer runs it")?;
    let status = done.status.context("a status")?;
    let new = status.runner_incarnation.clone().context("a holder")?;
    ensure!(
        status.runner.as_deref() == Some("runner-a") && new != held,
        "the new start ({new}) ran it, not the old one ({held}): {status:?}"
    );
    assert_eq!(status.attempts, Some(2), "the interrupted run counts");
    let lease = fx.ns.api::<Lease>().get("runner-a").await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(new.as_str()),
        "the Lease names the start that holds the job"
    );
    let events = events_about(&fx.client, "VideoJob", Some(&fx.ns.name), "interrupted").await?;
    ensure!(
        events.iter().any(|(reason, _)| reason == "RunnerLost"),
        "{events:?}"
    );
    Ok(())
}
