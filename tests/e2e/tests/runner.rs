//! End to end on the local control plane, through the `framelane-runner` binary playing the
//! lane's pod, with the operator admitting jobs, on the default install's models
//! (examples/videomodels.yaml: anisora image to video, phr00t text to video) made of the tiny
//! random-weight Wan models of the runner's tests:
//! - an image-to-video VideoJob reads its start image from the model volume and becomes an
//!   MP4 whose size and sha256 match its status; consecutive jobs reuse the loaded model (one
//!   load in the runner's log); one whose image is missing or unreadable fails with the
//!   reason, and the runner carries on;
//! - a Shared runner fed alternating anisora/phr00t jobs logs each unload before the next
//!   load, every unload leaves the live tensor bytes where they were before any model, and
//!   a switch back to a model comes from host memory (both fit its host budget);
//! - a job deleted mid-generation stops at a step boundary, ends Cancelled and goes away; the
//!   runner stays healthy and runs the next job;
//! - a runner cut off from the API server mid-generation loses the job to a second runner;
//!   when its connection returns, its late video is refused and thrown away, and the one in
//!   place and in status stays the second runner's;
//! - a runner told its device is small reports it in its heartbeat Lease and refuses a job
//!   too large for it (`DoesNotFit`) before generating, then runs one that fits.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use framelane_api::{ModelLane, VideoJob, VideoModel, reasons::JobReason, videojob::JobPhase};
use framelane_e2e::until_succeeded;
use framelane_testenv::{
    TestEnv, TestNamespace, eventually, stall::StallProxy, tiny_models, workspace_binary,
};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

const INSTANCE_LABEL: &str = "framelane.dev/test-instance";

/// The tiny models' start image, on the model volume.
const FIRST_FRAME: &str = "inputs/first-frame.png";

/// The spec of the default install's VideoModel `name` (examples/videomodels.yaml).
fn default_model(name: &str) -> Result<Value> {
    let yaml = include_str!("../../../examples/videomodels.yaml");
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let model = Value::deserialize(doc)?;
        if model["metadata"]["name"] == name {
            return Ok(model["spec"].clone());
        }
    }
    bail!("examples/videomodels.yaml has no model {name}")
}

/// One test's operator, lane, models and runner process.
struct Setup {
    env: &'static TestEnv,
    ns: TestNamespace,
    operator: JoinHandle<Result<()>>,
    lane: RunnerLane,
    runner: std::sync::Mutex<tokio::process::Child>,
    log: PathBuf,
    out: tempfile::TempDir,
    /// Test-scoped VideoModel name of each default model (`anisora`, `phr00t`).
    models: Vec<(String, String)>,
    health: String,
}

/// What a runner process of the test's lane is started with.
struct RunnerLane {
    name: String,
    mode: String,
    /// `--models`: the lane's models, comma-separated.
    models: String,
}

impl RunnerLane {
    /// Starts runner `name` writing to `out`; its probe address (a free port, so the test can
    /// call it) and its log (in `out`).
    fn spawn(
        &self,
        name: &str,
        ns: &TestNamespace,
        out: &std::path::Path,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> Result<(tokio::process::Child, String, PathBuf)> {
        let port = framelane_testenv::free_port()?;
        let health = format!("127.0.0.1:{port}");
        let log = out.join(format!("{name}.log"));
        let runner = tokio::process::Command::new(workspace_binary("framelane-runner"))
            .args([
                "--name",
                name,
                "--namespace",
                &ns.name,
                "--lane",
                &self.name,
            ])
            .args(["--mode", &self.mode, "--models", &self.models])
            .arg("--models-dir")
            .arg(tiny_models())
            .arg("--output-dir")
            .arg(out)
            .args(["--watch-namespace", &ns.name, "--metrics-addr", &health])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(extra)
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        Ok((runner, health, log))
    }
}

impl Setup {
    /// A lane of `mode` serving the default models `defaults` under test-scoped names (with
    /// smaller default sizes), the operator watching only this test's objects, and a runner
    /// process for the lane.
    async fn start(prefix: &str, mode: &str, defaults: &[&str]) -> Result<Setup> {
        Setup::start_with(prefix, mode, defaults, &[]).await
    }

    /// The same, with `extra` flags for the runner.
    async fn start_with(
        prefix: &str,
        mode: &str,
        defaults: &[&str],
        extra: &[&str],
    ) -> Result<Setup> {
        let env = TestEnv::get()?;
        Setup::start_through(prefix, mode, defaults, extra, &env.kubeconfig).await
    }

    /// The same, the runner reaching the API server with `kubeconfig` (through a proxy, say).
    async fn start_through(
        prefix: &str,
        mode: &str,
        defaults: &[&str],
        extra: &[&str],
        kubeconfig: &std::path::Path,
    ) -> Result<Setup> {
        let env = TestEnv::get()?;
        let ns = env.namespace(prefix).await?;
        let labels = json!({INSTANCE_LABEL: ns.name});
        let mut models = Vec::new();
        for default in defaults {
            let model = format!("{}-{default}", ns.name);
            let mut spec = default_model(default)?;
            spec["defaults"] = json!({"width": 256, "height": 256, "frames": 17, "fps": 8});
            let video_model: VideoModel = serde_json::from_value(json!({
                "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
                "metadata": {"name": model, "labels": labels}, "spec": spec
            }))?;
            Api::<VideoModel>::all(ns.client.clone())
                .create(&PostParams::default(), &video_model)
                .await?;
            models.push((default.to_string(), model));
        }
        let lane = format!("{}-lane", ns.name);
        let names: Vec<&String> = models.iter().map(|(_, m)| m).collect();
        let model_lane: ModelLane = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane", "metadata": {"name": lane, "labels": labels},
            "spec": {"mode": mode, "models": names, "runner": {"resources": {"requests": {"cpu": "100m"}},
                "modelVolume": {"emptyDir": {}}, "outputVolume": {"emptyDir": {}}}}
        }))?;
        Api::<ModelLane>::all(ns.client.clone())
            .create(&PostParams::default(), &model_lane)
            .await?;

        let admin = env.kubeconfig.to_string_lossy().into_owned();
        let selector = format!("{INSTANCE_LABEL}={}", ns.name);
        let config = framelane_operator::config::Config::parse_from([
            "framelane-operator",
            "--kubeconfig",
            &admin,
            "--namespace",
            &ns.name,
            "--watch-namespace",
            &ns.name,
            "--lane-selector",
            &selector,
            "--metrics-addr",
            "127.0.0.1:0",
            "--identity",
            &format!("{prefix}-e2e"),
        ]);
        let operator = tokio::spawn(framelane_operator::run::run(config));

        let out = tempfile::tempdir()?;
        let lane = RunnerLane {
            name: lane,
            mode: mode.into(),
            models: names
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
        };
        let (runner, health, log) = lane.spawn("runner-0", &ns, out.path(), kubeconfig, extra)?;
        Ok(Setup {
            env,
            ns,
            operator,
            lane,
            runner: std::sync::Mutex::new(runner),
            log,
            out,
            models,
            health,
        })
    }

    /// Another runner process of the lane (writing to the same output volume), reaching the
    /// API server with the admin kubeconfig; its probe address and log.
    fn another_runner(&self, name: &str) -> Result<(tokio::process::Child, String, PathBuf)> {
        self.lane
            .spawn(name, &self.ns, self.out.path(), &self.env.kubeconfig, &[])
    }

    fn model(&self, default: &str) -> &str {
        &self.models.iter().find(|(d, _)| d == default).unwrap().1
    }

    fn jobs(&self) -> Api<VideoJob> {
        self.ns.api()
    }

    async fn create_job(&self, name: &str, spec: Value) -> Result<()> {
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
            "spec": spec,
        }))?;
        self.jobs().create(&PostParams::default(), &job).await?;
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The runner's JSON log lines.
    fn log_lines(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Fails with the runner's log if it exited.
    fn check_runner(&self) -> Result<()> {
        if let Some(code) = self.runner.lock().expect("runner lock").try_wait()? {
            bail!("the runner exited with {code}:\n{}", self.log_text());
        }
        Ok(())
    }

    /// Waits until every job in `names` Succeeded; any failure fails the test.
    async fn wait_succeeded(&self, names: &[&str], secs: u64) -> Result<Vec<VideoJob>> {
        until_succeeded(&self.jobs(), names, secs, || self.check_runner())
            .await
            .with_context(|| self.log_text())
    }

    /// Waits until the job `name` Failed and returns its status's reason and message.
    async fn wait_failed(&self, name: &str, secs: u64) -> Result<(String, String)> {
        eventually(secs, &format!("job {name} to fail"), || async {
            let job = self.jobs().get(name).await?;
            let status = job.status.unwrap_or_default();
            ensure!(
                status.phase != Some(JobPhase::Succeeded),
                "job {name} succeeded"
            );
            self.check_runner()?;
            Ok((status.phase == Some(JobPhase::Failed)).then(|| {
                (
                    status.reason.map(|r| r.to_string()).unwrap_or_default(),
                    status.message.unwrap_or_default(),
                )
            }))
        })
        .await
        .with_context(|| self.log_text())
    }

    /// Waits until the job `name` has finished a denoising step (and has not finished).
    /// Waits until job `name` shows a denoising step done; returns the step it shows.
    async fn until_denoising(&self, name: &str) -> Result<i32> {
        eventually(180, &format!("a denoising step of job {name}"), || async {
            let job = self.jobs().get(name).await?;
            ensure!(
                job.status.as_ref().and_then(|s| s.phase) != Some(JobPhase::Succeeded),
                "job {name} finished before the test could act mid-generation"
            );
            self.check_runner()?;
            let progress = job.status.as_ref().and_then(|s| s.progress.clone());
            Ok(progress
                .filter(|p| p.stage.as_deref() == Some("Denoising") && p.step >= 1)
                .map(|p| p.step))
        })
        .await
        .with_context(|| self.log_text())
    }

    /// Fails if any attempt's files are left in the output volume's staging folder.
    fn no_staged_files(&self) -> Result<()> {
        let staging = self.out.path().join(".staging");
        let left: Vec<_> = match std::fs::read_dir(&staging) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            entries => entries?.collect::<Result<_, _>>()?,
        };
        ensure!(
            left.is_empty(),
            "attempts' files left in {}: {left:?}",
            staging.display()
        );
        Ok(())
    }

    /// HTTP status of GET `path` on the runner's probe port.
    async fn probe(&self, path: &str) -> Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&self.health).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: runner\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("no HTTP status in {response:?}"))
    }

    async fn stop(self) -> Result<()> {
        let mut runner = self.runner.into_inner().expect("runner lock");
        runner.kill().await?;
        self.operator.abort();
        let selector = format!("{INSTANCE_LABEL}={}", self.ns.name);
        let _ = self
            .env
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_to_video_job_becomes_an_mp4_and_the_model_stays_loaded() -> Result<()> {
    let setup = Setup::start("runner-e2e", "Dedicated", &["anisora"]).await?;
    let model = setup.model("anisora").to_owned();
    for name in ["first", "second"] {
        let spec = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME,
            "prompt": format!("a fox, take {name}"), "seed": 7});
        setup.create_job(name, spec).await?;
    }

    let saw_progress = std::cell::Cell::new(false);
    let done = eventually(180, "every job to succeed", || async {
        let list = setup.jobs().list(&Default::default()).await?.items;
        for job in &list {
            let progress = job.status.as_ref().and_then(|s| s.progress.clone());
            // 100 % is for a finished job: decoding and writing the video follow the steps.
            if job.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Running) {
                ensure!(
                    progress.as_ref().is_none_or(|p| p.percent < 100),
                    "{} is Running at {:?}",
                    job.metadata.name.as_deref().unwrap_or_default(),
                    progress
                );
            }
            if let Some(p) = progress
                && p.stage.as_deref() == Some("Denoising")
                && p.step > 0
                && p.step < p.total_steps
            {
                saw_progress.set(true);
            }
        }
        if let Some(failed) = list
            .iter()
            .find(|j| j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Failed))
        {
            bail!("a job failed: {:?}", failed.status);
        }
        setup.check_runner()?;
        let all = list
            .iter()
            .all(|j| j.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Succeeded));
        Ok(all.then_some(list))
    })
    .await
    .with_context(|| setup.log_text())?;
    let saw_progress = saw_progress.get();
    ensure!(
        saw_progress,
        "never saw a Denoising step in status.progress"
    );

    for job in &done {
        let status = job.status.clone().context("status")?;
        assert_eq!(status.runner.as_deref(), Some("runner-0"));
        let output = status.output.context("status.output")?;
        let file = setup.out.path().join(&output.path);
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
            setup
                .out
                .path()
                .join(output.preview_path.context("preview")?)
                .is_file()
        );
        let memory = status.memory.context("status.memory")?;
        assert_eq!(memory.device, "cpu");
        assert!(memory.peak_allocated_bytes >= memory.after_cleanup_allocated_bytes);
        assert_eq!(status.progress.map(|p| p.percent), Some(100));
    }
    let text = setup.log_text();
    assert_eq!(
        text.matches("\"model loaded\"").count(),
        1,
        "consecutive jobs reloaded the model:\n{text}"
    );
    assert_eq!(text.matches("\"job finished\"").count(), 2, "{text}");
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_image_cannot_be_read_fails_with_the_reason() -> Result<()> {
    let setup = Setup::start("runner-image", "Dedicated", &["anisora"]).await?;
    let model = setup.model("anisora").to_owned();
    let cases = [
        (
            "missing",
            "inputs/missing.png",
            "spec.image \"inputs/missing.png\": ",
            "inputs/missing.png does not exist in the model volume",
        ),
        (
            "not-an-image",
            "anisora/model_index.json",
            "spec.image is not a PNG or JPEG image",
            "",
        ),
    ];
    for (name, image, _, _) in &cases {
        let spec = json!({"model": model, "mode": "i2v", "image": image, "prompt": "a fox"});
        setup.create_job(name, spec).await?;
        // One after the other, so the runner takes them in this order.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    for (name, _, starts, contains) in cases {
        let (reason, message) = setup.wait_failed(name, 120).await?;
        assert_eq!(reason, JobReason::GenerationFailed.as_str(), "{name}");
        assert!(
            message.starts_with(starts) && message.contains(contains),
            "{name}: {message}"
        );
    }
    // The runner stays healthy and the next job (with its image) succeeds.
    assert_eq!(setup.probe("/healthz").await?, 200);
    let spec = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a fox"});
    setup.create_job("next", spec).await?;
    setup.wait_succeeded(&["next"], 120).await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_runner_unloads_before_each_switch_and_keeps_no_old_tensor() -> Result<()> {
    let setup = Setup::start("runner-shared", "Shared", &["anisora", "phr00t"]).await?;
    let order = ["anisora", "phr00t", "anisora", "phr00t"];
    let mut names = Vec::new();
    for (i, model) in order.iter().enumerate() {
        let name = format!("job-{i}-{model}");
        let mut spec = json!({"model": setup.model(model), "prompt": format!("a fox, take {i}"),
            "seed": i, "width": 256, "height": 256, "frames": 9});
        if *model == "anisora" {
            spec["mode"] = json!("i2v");
            spec["image"] = json!(FIRST_FRAME);
        }
        setup.create_job(&name, spec).await?;
        // Created one after the other, so the queue (and the runner) takes them in this order.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        names.push(name);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    setup.wait_succeeded(&names, 240).await?;

    let lines = setup.log_lines();
    let message = |l: &Value| l["fields"]["message"].as_str().unwrap_or("").to_owned();
    let baseline = lines
        .iter()
        .find(|l| message(l) == "runner starting")
        .and_then(|l| l["fields"]["allocated_bytes"].as_i64())
        .context("no `runner starting` line with allocated_bytes")?;
    let events: Vec<(String, String, i64)> = lines
        .iter()
        .filter(|l| matches!(message(l).as_str(), "model loaded" | "model unloaded"))
        .map(|l| {
            let model = l["fields"]["model"].as_str().unwrap_or("").to_owned();
            let bytes = l["fields"]["allocated_bytes"].as_i64().unwrap_or(-1);
            (message(l), model, bytes)
        })
        .collect();
    // Both tiny models fit the runner's host budget, so a switch back comes from host memory.
    let froms: Vec<&str> = lines
        .iter()
        .filter(|l| message(l) == "model loaded")
        .map(|l| l["fields"]["from"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(froms, ["files", "files", "host", "host"]);
    let expected: Vec<(String, String)> = [
        ("model loaded", "anisora"),
        ("model unloaded", "anisora"),
        ("model loaded", "phr00t"),
        ("model unloaded", "phr00t"),
        ("model loaded", "anisora"),
        ("model unloaded", "anisora"),
        ("model loaded", "phr00t"),
    ]
    .iter()
    .map(|(e, p)| (e.to_string(), setup.model(p).to_owned()))
    .collect();
    assert_eq!(
        events
            .iter()
            .map(|(e, m, _)| (e.clone(), m.clone()))
            .collect::<Vec<_>>(),
        expected,
        "each switch logs the unload before the load:\n{}",
        setup.log_text()
    );
    let mut loaded_bytes = std::collections::BTreeMap::new();
    for (event, model, bytes) in &events {
        if event == "model unloaded" {
            assert_eq!(
                *bytes,
                baseline,
                "unloading {model} left {} bytes of tensors behind",
                bytes - baseline
            );
        } else {
            assert!(*bytes > baseline, "{model} loaded no weights?");
            // Each load of a model takes the same bytes: nothing of an earlier load survives.
            assert_eq!(*loaded_bytes.entry(model.clone()).or_insert(*bytes), *bytes);
        }
    }
    setup.stop().await
}

/// An image-to-video job of `model` large enough that its eight steps take seconds on the
/// CPU, so a test can act while it generates.
fn long_job(model: &str) -> Value {
    json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a long fox",
        "seed": 3, "width": 512, "height": 512, "frames": 33})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_deleted_mid_generation_stops_and_the_runner_runs_the_next() -> Result<()> {
    let setup = Setup::start("runner-cancel", "Dedicated", &["anisora"]).await?;
    let model = setup.model("anisora").to_owned();
    setup.create_job("long", long_job(&model)).await?;
    let seen = setup.until_denoising("long").await?;
    setup
        .jobs()
        .delete("long", &DeleteParams::default())
        .await?;

    // The runner stops at the next step boundary, records Cancelled, and the operator lets
    // the deleted job go.
    eventually(60, "the deleted job to go", || async {
        setup.check_runner()?;
        Ok(setup.jobs().get_opt("long").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| setup.log_text())?;
    let lines = setup.log_lines();
    let failed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job failed")
        .with_context(|| format!("no `job failed` line:\n{}", setup.log_text()))?;
    assert_eq!(failed["fields"]["reason"], "Cancelled");
    let error = failed["fields"]["error"].as_str().unwrap_or("");
    let completed: u32 = error
        .split("after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no step count in {error:?}"))?;
    // The step running when the job was deleted is the last (a step takes seconds here).
    assert!(
        (1..8).contains(&completed) && completed as i32 <= seen + 1,
        "stopped after {completed} of 8 steps, deleted after step {seen}: {error}\n{}",
        setup.log_text()
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "job finished"
                && l["fields"]["result"] == "Cancelled"),
        "the Cancelled status was not written:\n{}",
        setup.log_text()
    );
    let video = setup.out.path().join(&setup.ns.name).join("long/video.mp4");
    assert!(!video.exists(), "a cancelled job wrote {}", video.display());

    assert_eq!(setup.probe("/healthz").await?, 200);
    assert_eq!(setup.probe("/readyz").await?, 200);
    let spec = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "the next fox",
        "seed": 4});
    setup.create_job("next", spec).await?;
    setup.wait_succeeded(&["next"], 120).await?;

    // Deleting a finished job removes its files; nothing of the cancelled attempt is left.
    let folder = setup.out.path().join(&setup.ns.name).join("next");
    assert!(folder.join("video.mp4").exists() && folder.join("preview.png").exists());
    setup
        .jobs()
        .delete("next", &DeleteParams::default())
        .await?;
    eventually(60, "the deleted job's files to go", || async {
        setup.check_runner()?;
        Ok((!folder.exists()).then_some(()))
    })
    .await
    .with_context(|| setup.log_text())?;
    setup.no_staged_files()?;
    setup.stop().await
}

/// A runner that does not load a model its lane serves (started before the lane took it, its
/// pod about to be replaced) leaves that model's jobs queued and runs the next job it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_leaves_jobs_of_a_model_it_does_not_load_queued() -> Result<()> {
    let setup = Setup::start("runner-serves", "Shared", &["anisora", "phr00t"]).await?;
    setup.runner.lock().expect("runner lock").start_kill()?;
    let (anisora, phr00t) = (
        setup.model("anisora").to_owned(),
        setup.model("phr00t").to_owned(),
    );
    let older = RunnerLane {
        name: setup.lane.name.clone(),
        mode: "Shared".into(),
        models: anisora.clone(),
    };
    let (mut runner, _, log) = older.spawn(
        "runner-1",
        &setup.ns,
        setup.out.path(),
        &setup.env.kubeconfig,
        &[],
    )?;
    setup
        .create_job(
            "other",
            json!({"model": phr00t, "prompt": "a lighthouse", "seed": 1}),
        )
        .await?;
    setup
        .create_job(
            "mine",
            json!({"model": anisora, "mode": "i2v", "image": FIRST_FRAME,
            "prompt": "a fox", "seed": 2}),
        )
        .await?;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let done = eventually(180, "runner-1 to finish its model's job", || async {
        let job = setup.jobs().get("mine").await?;
        let status = job.status.unwrap_or_default();
        ensure!(
            status.phase != Some(JobPhase::Failed),
            "mine failed: {:?}",
            status.message
        );
        Ok((status.phase == Some(JobPhase::Succeeded)).then_some(status))
    })
    .await
    .with_context(log_text)?;
    assert_eq!(done.runner.as_deref(), Some("runner-1"));
    let other = setup.jobs().get("other").await?.status.unwrap_or_default();
    assert_eq!(
        (other.phase, other.runner),
        (Some(JobPhase::Queued), None),
        "{}",
        log_text()
    );
    runner.kill().await?;
    setup.stop().await
}

/// A runner told to stop (SIGTERM: its pod is being deleted) claims nothing more, stops its
/// job at the next step, gives it back to its place in the queue at once, and exits well
/// inside a pod's 30 s grace period; another runner then takes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_runner_hands_its_job_back_and_exits() -> Result<()> {
    let setup = Setup::start("runner-stop", "Dedicated", &["anisora"]).await?;
    let model = setup.model("anisora").to_owned();
    setup.create_job("long", long_job(&model)).await?;
    setup.until_denoising("long").await?;
    let queued_at = setup.jobs().get("long").await?.status.unwrap().queued_at;
    let later = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a later fox",
        "seed": 4});
    setup.create_job("later", later).await?;
    let pid = setup
        .runner
        .lock()
        .expect("runner lock")
        .id()
        .context("the runner's pid")?;
    let sent = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(kill.success(), "kill -TERM {pid}: {kill}");
    let exited = eventually(30, "the runner to exit", || async {
        Ok(setup.runner.lock().expect("runner lock").try_wait()?)
    })
    .await
    .with_context(|| setup.log_text())?;
    let took = sent.elapsed();
    assert!(
        exited.success(),
        "the runner exited with {exited}:\n{}",
        setup.log_text()
    );
    assert!(took < Duration::from_secs(20), "it took {took:?} to stop");
    let job = setup.jobs().get("long").await?;
    let status = job.status.unwrap();
    assert_eq!(
        (
            status.phase,
            status.reason,
            status.runner.as_deref(),
            status.attempts
        ),
        (
            Some(JobPhase::Queued),
            Some(JobReason::Requeued),
            None,
            Some(1)
        )
    );
    assert_eq!(
        status.queued_at, queued_at,
        "its place in the queue is kept"
    );
    // Its Running condition tells why (the message moves on to its place in the queue).
    let running = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Running")
        .context("a Running condition")?;
    assert_eq!(
        (running.status.as_str(), running.reason.as_str()),
        ("False", "Requeued")
    );
    assert!(
        running.message.contains("gave the job back unfinished"),
        "{}",
        running.message
    );
    // It claimed nothing after the signal.
    let later = setup.jobs().get("later").await?;
    assert_eq!(later.status.and_then(|s| s.phase), Some(JobPhase::Queued));
    assert!(
        setup
            .log_lines()
            .iter()
            .any(|l| l["fields"]["message"] == "job handed back: the runner is stopping"),
        "{}",
        setup.log_text()
    );
    setup.no_staged_files()?;
    // Another runner of the lane takes it, first in line.
    let (mut next, _, log) = setup.another_runner("runner-1")?;
    let taken = eventually(120, "runner-1 to take the job back", || async {
        let job = setup.jobs().get("long").await?;
        let status = job.status.unwrap_or_default();
        Ok((status.runner.as_deref() == Some("runner-1")).then_some(status))
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    assert_eq!(taken.attempts, Some(2));
    next.kill().await?;
    setup.stop().await
}

/// A runner cut off from the API server while it generates goes on and finishes its video,
/// but its heartbeat goes stale, so the job is requeued and a second runner runs it again.
/// When the first runner's connection comes back, its late result is refused: the video in
/// place and the sha256 in status stay the second runner's, and the first's files are
/// thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_runners_late_video_is_refused_and_the_retrys_stays() -> Result<()> {
    let env = TestEnv::get()?;
    let name = format!("kubeconfig-runner-zombie-{}", std::process::id());
    let (proxy, proxied) = StallProxy::start(&env.kubeconfig, &name)?;
    let setup =
        Setup::start_through("runner-zombie", "Dedicated", &["anisora"], &[], &proxied).await?;
    let model = setup.model("anisora").to_owned();
    // Long enough (seconds per step on the CPU) to be cut off mid-generation.
    let spec = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a late fox",
        "seed": 5, "width": 512, "height": 512, "frames": 33});
    setup.create_job("late", spec).await?;
    setup.until_denoising("late").await?;

    proxy.cut();
    let (mut second, _, second_log) = setup.another_runner("runner-1")?;
    let second_text = || std::fs::read_to_string(&second_log).unwrap_or_default();
    // The second runner shares the CPU with the first, which generates on, cut off: with the
    // other suites' runners beside them this took over 300 s once.
    let done = setup
        .wait_succeeded(&["late"], 600)
        .await
        .with_context(second_text)?;
    let status = done[0].status.clone().unwrap_or_default();
    assert_eq!(status.runner.as_deref(), Some("runner-1"), "{status:?}");
    assert_eq!(status.attempts, Some(2), "{status:?}");
    let video = setup.out.path().join(&setup.ns.name).join("late/video.mp4");
    let published = std::fs::metadata(&video)?;
    let sha = |path: &std::path::Path| -> Result<String> {
        Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
    };
    let output = status.output.clone().context("no output in status")?;
    assert_eq!(sha(&video)?, output.sha256);

    // The first runner finished meanwhile and keeps its files staged until it can ask the
    // API server whether the job is still its own.
    proxy.restore();
    eventually(120, "the first runner to throw its files away", || async {
        setup.check_runner()?;
        Ok(setup
            .log_lines()
            .iter()
            .any(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("the job is no longer this runner's"))
            })
            .then_some(()))
    })
    .await
    .with_context(|| setup.log_text())?;
    let job = setup.jobs().get("late").await?;
    let after = job.status.unwrap_or_default();
    assert_eq!(after.runner.as_deref(), Some("runner-1"), "{after:?}");
    assert_eq!(after.attempts, Some(2), "{after:?}");
    assert_eq!(after.output, Some(output.clone()));
    use std::os::unix::fs::MetadataExt;
    let now = std::fs::metadata(&video)?;
    assert_eq!(
        (now.ino(), now.mtime_nsec()),
        (published.ino(), published.mtime_nsec()),
        "the video in place was replaced"
    );
    assert_eq!(sha(&video)?, output.sha256);
    setup.no_staged_files()?;
    second.kill().await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_refuses_a_job_too_large_for_its_device_and_tiles_one_that_needs_it() -> Result<()>
{
    // 1,227,000,000 bytes leave 600 MiB usable. The tiny anisora's weights and a 256x256x9
    // job (about 350 MiB on the CPU) fit whole; 384x384x9 needs 771 MiB to encode its start
    // image whole and 396 MiB in tiles; 768x768x33 does not fit even in tiles. The experts'
    // linear weights are stored in fp8 (the lane's `transformerWeights: fp8`).
    let setup = Setup::start_with(
        "runner-fit",
        "Dedicated",
        &["anisora"],
        &[
            "--device-memory-bytes",
            "1227000000",
            "--transformer-weights",
            "fp8",
        ],
    )
    .await?;
    let model = setup.model("anisora").to_owned();
    let lease = eventually(60, "the runner's memory report", || async {
        let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
            setup.ns.client.clone(),
            &setup.ns.name,
        )
        .get_opt("runner-0")
        .await?;
        Ok(lease.and_then(|l| {
            l.metadata
                .annotations
                .and_then(|a| a.get("framelane.dev/memory").cloned())
        }))
    })
    .await
    .with_context(|| setup.log_text())?;
    let report: Value = serde_json::from_str(&lease)?;
    assert_eq!(
        (
            &report["v"],
            &report["deviceBytes"],
            &report["mode"],
            &report["vaeTiling"]
        ),
        (
            &json!(2),
            &json!(1_227_000_000u64),
            &json!("resident"),
            &json!("auto")
        ),
        "{report}"
    );
    // fp8: each expert under three quarters of its 3,831,680 bfloat16 bytes (its linear
    // weights are about two thirds of them; the weights diffusers keeps in float32 count four
    // bytes each), and an upcast weight while it runs.
    let profile = &report["models"][&model];
    let experts = profile["transformerBytes"]
        .as_array()
        .context("transformerBytes")?;
    assert_eq!(experts.len(), 2, "{report}");
    assert!(
        experts
            .iter()
            .all(|b| b.as_u64().is_some_and(|b| b < 3_831_680 * 3 / 4)),
        "{report}"
    );
    assert!(
        profile["upcastBytes"].as_u64().is_some_and(|b| b > 0),
        "{report}"
    );

    let large = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a fox",
        "width": 768, "height": 768, "frames": 33});
    setup.create_job("large", large).await?;
    let (reason, message) = setup.wait_failed("large", 120).await?;
    assert_eq!(reason, JobReason::DoesNotFit.as_str());
    assert!(
        message.starts_with("needs ")
            && message.contains("768x768x33 in memory mode resident with the VAE tiled;")
            && message.contains("runners have 600 MiB usable; the largest that fit: "),
        "{message}"
    );
    let generated = setup.log_lines().iter().any(|l| {
        l["fields"]["message"] == "job memory"
            && l["fields"]["job"]
                .as_str()
                .is_some_and(|j| j.ends_with("large"))
    });
    ensure!(!generated, "the refused job never reached the GPU");

    assert_eq!(setup.probe("/healthz").await?, 200);
    let small = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a fox",
        "width": 256, "height": 256, "frames": 9});
    setup.create_job("small", small).await?;
    let tiled = json!({"model": model, "mode": "i2v", "image": FIRST_FRAME, "prompt": "a fox",
        "width": 384, "height": 384, "frames": 9});
    setup.create_job("tiled", tiled).await?;
    // Beside the suite's other runners on a 2-core machine, not alone (about 60 s).
    let done = setup.wait_succeeded(&["small", "tiled"], 600).await?;
    let tiled: Vec<Option<bool>> = done
        .iter()
        .map(|job| job.status.as_ref()?.memory.as_ref()?.vae_tiled)
        .collect();
    assert_eq!(
        tiled,
        [Some(false), Some(true)],
        "only the larger job tiles"
    );
    setup.stop().await
}
