//! A job's files on the output volume, with tests playing runners through the runner
//! contract on the real local control plane: a runner declared lost that finishes late cannot
//! replace the files of the attempt that took its job over, and a deleted job's files go.

mod support;

use std::path::Path;

use anyhow::{Context, Result};
use framelane_api::{
    VideoJob,
    reasons::JobReason,
    videojob::{JobPhase, Output},
};
use framelane_contract::{ClaimedJob, ContractError, Runner, outputs};
use kube::{
    ResourceExt,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use support::{Fixture, eventually, phase};
use tokio::sync::watch;

/// Writes `bytes` as the attempt's video (and a preview) into its staging folder, as the
/// runner's generation does; returns the files to publish and the output to report.
fn stage(claimed: &ClaimedJob, root: &Path, bytes: &[u8]) -> Result<(Vec<String>, Output)> {
    let job = claimed.job();
    let dir = outputs::job_dir(&job.namespace().unwrap_or_default(), &job.name_any())
        .context("the job's folder")?;
    let staging = claimed.staging_dir(root);
    std::fs::create_dir_all(staging.join(&dir))?;
    let (video, preview) = (
        dir.join(outputs::VIDEO_FILE),
        dir.join(outputs::PREVIEW_FILE),
    );
    std::fs::write(staging.join(&video), bytes)?;
    std::fs::write(staging.join(&preview), b"png")?;
    let sha256 = outputs::sha256_of(&staging.join(&video))?.context("the staged video")?;
    let (video, preview) = (video.display().to_string(), preview.display().to_string());
    let output = Output {
        path: video.clone(),
        preview_path: Some(preview.clone()),
        size_bytes: bytes.len() as i64,
        sha256,
        frames: 17,
        fps: 16,
        width: 256,
        height: 256,
    };
    Ok((vec![video, preview], output))
}

async fn claim(runner: &Runner) -> Result<ClaimedJob> {
    eventually(
        60,
        &format!("{} to claim the job", runner.name()),
        || async { Ok(runner.claim_next().await?) },
    )
    .await
}

#[tokio::test]
async fn a_runner_declared_lost_cannot_replace_the_retrys_files_and_deleted_files_go() -> Result<()>
{
    let fx = Fixture::new("zombie").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let root = tempfile::tempdir()?;
    let (_loaded, loaded_rx) = watch::channel(None::<String>);
    let runner = |name: &str| {
        Runner::start(fx.client.clone(), &fx.ns.name, name, &lane, fx.jobs.clone())
            .removing_outputs_of_deleted_jobs(root.path())
    };

    // The first runner claims the job, then stops heartbeating (a partitioned or paused
    // node) but keeps working on it.
    let first = runner("runner-first");
    let heartbeat = first.keep_alive(loaded_rx.clone());
    fx.create_job("fox", &model).await?;
    let mut late = claim(&first).await?;
    drop(heartbeat);

    // Its heartbeat goes stale, the job is requeued, and a second runner runs it to the end.
    let second = runner("runner-second");
    let _second_heartbeat = second.keep_alive(loaded_rx);
    let mut retry = claim(&second).await?;
    let attempts = retry.job().status.as_ref().and_then(|s| s.attempts);
    assert_eq!(attempts, Some(2), "the job was not requeued");
    let (files, output) = stage(&retry, root.path(), b"the retry's video")?;
    retry.publish(root.path(), &files).await?;
    retry.complete(output.clone(), None).await?;

    // The first runner finishes late: its files are thrown away, not published.
    let (files, _) = stage(&late, root.path(), b"the lost runner's late video")?;
    let refused = late.publish(root.path(), &files).await;
    assert!(
        matches!(refused, Err(ContractError::Lost(_))),
        "a lost runner published its files: {refused:?}"
    );
    assert!(!late.staging_dir(root.path()).exists());
    let video = root.path().join(&output.path);
    assert_eq!(std::fs::read(&video)?, b"the retry's video");
    let job = fx.jobs.get("fox").await?;
    assert_eq!(phase(&job), Some(JobPhase::Succeeded));
    let status_sha = job.status.and_then(|s| s.output).map(|o| o.sha256);
    assert_eq!(status_sha, outputs::sha256_of(&video)?);

    // Deleting the job removes its files and its folder.
    fx.jobs.delete("fox", &DeleteParams::default()).await?;
    let folder = video.parent().context("the job's folder")?.to_path_buf();
    eventually(60, "the deleted job's files to go", || async {
        Ok((!folder.exists()).then_some(()))
    })
    .await?;
    Ok(())
}

/// A video that no job's status names would stay on the volume for good: nothing removes it
/// when its job goes. Neither a job deleted while its video was finished nor one that
/// stopped being its runner's just after the video was published keeps one.
#[tokio::test]
async fn no_video_stays_on_the_volume_that_no_job_names() -> Result<()> {
    let fx = Fixture::new("unnamed").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let root = tempfile::tempdir()?;
    let (_loaded, loaded_rx) = watch::channel(None::<String>);
    let runner = Runner::start(
        fx.client.clone(),
        &fx.ns.name,
        "runner-0",
        &lane,
        fx.jobs.clone(),
    )
    .removing_outputs_of_deleted_jobs(root.path());
    let _heartbeat = runner.keep_alive(loaded_rx);

    // Deleted while its video was being finished (decoded, encoded): the files stay staged
    // only, are thrown away, and the job goes once its runner says it was cancelled.
    fx.create_job("deleted", &model).await?;
    let mut claimed = claim(&runner).await?;
    let (files, output) = stage(&claimed, root.path(), b"a video nobody wants")?;
    // The operator's finalizer keeps a running job until its runner has stopped.
    eventually(60, "the running job's finalizer", || async {
        let job = fx.jobs.get("deleted").await?;
        Ok((!job.finalizers().is_empty()).then_some(()))
    })
    .await?;
    fx.jobs.delete("deleted", &DeleteParams::default()).await?;
    let refused = claimed.publish(root.path(), &files).await;
    assert!(
        matches!(refused, Err(ContractError::Deleted(_))),
        "a deleted job's video was published: {refused:?}"
    );
    assert!(!root.path().join(&output.path).exists());
    assert!(!claimed.staging_dir(root.path()).exists());
    claimed
        .fail(JobReason::Cancelled, "cancelled while finishing", None)
        .await?;
    eventually(60, "the deleted job to go", || async {
        Ok(fx.jobs.get_opt("deleted").await?.is_none().then_some(()))
    })
    .await?;

    // Its deadline passes between the publish and the final write: the operator fails it
    // DeadlineExceeded, and the published files go again.
    let job: VideoJob = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "late"},
        "spec": {"model": model, "prompt": "a late fox", "frames": 17, "width": 256, "height": 256,
            "deadlineSeconds": 2}
    }))?;
    fx.jobs.create(&PostParams::default(), &job).await?;
    let mut claimed = claim(&runner).await?;
    let (files, output) = stage(&claimed, root.path(), b"a video too late")?;
    claimed.publish(root.path(), &files).await?;
    let video = root.path().join(&output.path);
    assert!(video.exists());
    eventually(
        60,
        "the operator to fail the job past its deadline",
        || async {
            let job = fx.jobs.get("late").await?;
            let reason = job.status.as_ref().and_then(|s| s.reason);
            Ok((reason == Some(JobReason::DeadlineExceeded)).then_some(()))
        },
    )
    .await?;
    let refused = claimed.complete(output, None).await;
    assert!(
        matches!(refused, Err(ContractError::Lost(_))),
        "a job failed past its deadline was completed: {refused:?}"
    );
    assert!(!video.exists(), "a video no job names stayed on the volume");
    assert!(!video.parent().context("the job's folder")?.exists());
    Ok(())
}
