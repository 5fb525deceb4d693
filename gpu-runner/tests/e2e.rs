//! End to end on the local control plane: a VideoJob is admitted by the operator, a
//! framelane-runner process (playing the lane's pod) claims it, writes progress at each
//! step, and records the MP4 whose size and sha256 match the file. Consecutive jobs reuse the
//! loaded model: one load in the runner's log.

mod common;

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use framelane_api::{ModelLane, VideoJob, VideoModel, videojob::JobPhase};
use framelane_testenv::TestEnv;
use kube::{Api, api::PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};

const INSTANCE_LABEL: &str = "framelane.dev/test-instance";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_videojob_becomes_an_mp4_and_the_model_stays_loaded() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("runner-e2e").await?;
    let packages = common::packages();
    let labels = json!({INSTANCE_LABEL: ns.name});
    let model = format!("{}-anisora", ns.name);
    let lane = model.clone();
    let video_model: VideoModel = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel", "metadata": {"name": model, "labels": labels},
        "spec": {"fixedParameters": {"steps": 8}, "defaults": {"width": 256, "height": 256, "frames": 17, "fps": 8},
            "limits": {"maxWidth": 512, "maxHeight": 512, "maxFrames": 33}, "package": {"path": "anisora"}, "modes": ["t2v"]}
    }))?;
    Api::<VideoModel>::all(ns.client.clone())
        .create(&PostParams::default(), &video_model)
        .await?;
    let model_lane: ModelLane = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane", "metadata": {"name": lane, "labels": labels},
        "spec": {"mode": "Dedicated", "models": [model], "runner": {"resources": {"requests": {"cpu": "100m"}},
            "modelVolume": {"emptyDir": {}}, "outputVolume": {"emptyDir": {}}}}
    }))?;
    Api::<ModelLane>::all(ns.client.clone())
        .create(&PostParams::default(), &model_lane)
        .await?;

    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let selector = format!("{INSTANCE_LABEL}={}", ns.name);
    let config = framelane_operator::config::Config::parse_from([
        "framelane-operator",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        &ns.name,
        "--watch-namespace",
        &ns.name,
        "--lane-selector",
        &selector,
        "--metrics-addr",
        "127.0.0.1:0",
        "--identity",
        "e2e",
    ]);
    let operator = tokio::spawn(framelane_operator::run::run(config));

    let out = tempfile::tempdir()?;
    let log = out.path().join("runner.log");
    let mut runner = tokio::process::Command::new(env!("CARGO_BIN_EXE_framelane-runner"))
        .args([
            "--name",
            "runner-0",
            "--namespace",
            &ns.name,
            "--lane",
            &lane,
            "--models",
            &model,
        ])
        .arg("--models-dir")
        .arg(packages)
        .arg("--output-dir")
        .arg(out.path())
        .args([
            "--watch-namespace",
            &ns.name,
            "--metrics-addr",
            "127.0.0.1:0",
            "--kubeconfig",
            &kubeconfig,
        ])
        .stdout(std::fs::File::create(&log)?)
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;

    let jobs: Api<VideoJob> = ns.api();
    for name in ["first", "second"] {
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
            "spec": {"model": model, "prompt": format!("a fox, take {name}"), "seed": 7}
        }))?;
        jobs.create(&PostParams::default(), &job).await?;
    }

    let mut saw_progress = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let done = loop {
        let list = jobs.list(&Default::default()).await?.items;
        for job in &list {
            let progress = job.status.as_ref().and_then(|s| s.progress.clone());
            if let Some(p) = progress
                && p.stage.as_deref() == Some("Denoising")
                && p.step > 0
                && p.step < p.total_steps
            {
                saw_progress = true;
            }
        }
        if list
            .iter()
            .all(|j| j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Succeeded))
        {
            break list;
        }
        if let Some(failed) = list
            .iter()
            .find(|j| j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Failed))
        {
            bail!("a job failed: {:?}", failed.status);
        }
        if let Some(code) = runner.try_wait()? {
            bail!(
                "the runner exited with {code}:\n{}",
                std::fs::read_to_string(&log)?
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "jobs not done after 180 s: {:?}\n{}",
                list.iter().map(|j| &j.status).collect::<Vec<_>>(),
                std::fs::read_to_string(&log)?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        saw_progress,
        "never saw a Denoising step in status.progress"
    );

    for job in &done {
        let status = job.status.clone().context("status")?;
        assert_eq!(status.runner.as_deref(), Some("runner-0"));
        let output = status.output.context("status.output")?;
        let file = out.path().join(&output.path);
        let bytes =
            std::fs::read(&file).with_context(|| format!("{} is not there", file.display()))?;
        assert_eq!(bytes.len() as i64, output.size_bytes);
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            output.sha256,
            "status.output.sha256 does not match the file"
        );
        assert_eq!(
            (output.width, output.height, output.frames, output.fps),
            (256, 256, 17, 8)
        );
        assert!(
            out.path()
                .join(output.preview_path.context("preview")?)
                .is_file()
        );
        let memory = status.memory.context("status.memory")?;
        assert_eq!(memory.device, "cpu");
        assert!(memory.peak_allocated_bytes >= memory.after_cleanup_allocated_bytes);
        assert_eq!(status.progress.map(|p| p.percent), Some(100));
    }
    let text = std::fs::read_to_string(&log)?;
    assert_eq!(
        text.matches("\"model loaded\"").count(),
        1,
        "consecutive jobs reloaded the model:\n{text}"
    );
    assert_eq!(text.matches("\"job finished\"").count(), 2, "{text}");

    runner.kill().await?;
    operator.abort();
    let _ = env
        .kubectl()
        .args([
            "delete",
            "modellanes,videomodels",
            "-l",
            &selector,
            "--wait=false",
        ])
        .output();
    Ok(())
}
