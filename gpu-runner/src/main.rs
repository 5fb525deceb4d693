//! framelane-runner: the process in a lane's runner pod. It loads its model (Dedicated) or
//! switches between models (Shared), renews its heartbeat Lease, claims its lane's oldest
//! queued VideoJob, generates the video with progress at every step, and records the output
//! or the failure, with the job's GPU memory, in the job's status.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use framelane_api::{
    VideoJob, VideoModel,
    reasons::JobReason,
    videojob::{JobPhase, MemoryReport},
};
use framelane_contract::{ClaimedJob, ContractError, Runner, backoff::Backoff, outputs};
use framelane_core::memory::RunnerMemory;
use framelane_runner::{
    cache::{CacheError, LaneMode, ModelCache},
    generate::{JobOutcome, JobRequest, Progress, run_job},
    inputs::read_image,
    job::{model_ref, output_for, request_for},
    memory::{RunnerDevice, default_host_budget},
    metrics::{MemoryLabels, Metrics, ResultLabels},
    profile::{MemoryArgs, fit_job, runner_memory},
    sampler::StepControl,
    wan::pipeline::{MemoryPlan, Precision},
};
use kube::{Api, ResourceExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc, watch};

/// framelane-runner: generates the VideoJobs of one lane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// This runner's name (its pod's name); also the name of its heartbeat Lease.
    #[arg(long, env = "POD_NAME")]
    name: String,
    /// The uid of this runner's pod: when set, the pod owns the heartbeat Lease, which the
    /// garbage collector then deletes with the pod.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Namespace of the heartbeat Lease (the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// The lane this runner serves.
    #[arg(long, env = "FRAMELANE_LANE")]
    lane: String,
    /// Dedicated (one model, loaded at start and kept) or Shared (switch as jobs need).
    #[arg(long, env = "FRAMELANE_LANE_MODE", default_value = "Dedicated")]
    mode: String,
    /// The lane's VideoModels, comma-separated.
    #[arg(long, env = "FRAMELANE_MODELS", value_delimiter = ',')]
    models: Vec<String>,
    /// Root of the model volume; each VideoModel's spec.weights paths, and i2v start images
    /// given as paths, are below it.
    #[arg(long, env = "FRAMELANE_MODELS_DIR", default_value = "/models")]
    models_dir: PathBuf,
    /// Hosts a job's spec.image URL may name (comma-separated; the operator's
    /// --image-url-hosts). Empty: start images are read from the model volume only.
    #[arg(long, env = "FRAMELANE_IMAGE_URL_HOSTS", value_delimiter = ',')]
    image_url_hosts: Vec<String>,
    /// What the transformers and the text encoder compute in (the VAE computes in float32).
    #[arg(long, env = "FRAMELANE_WEIGHTS_DTYPE", value_enum, default_value_t = WeightsDtype::Bfloat16)]
    weights_dtype: WeightsDtype,
    /// Root of the output volume; videos go to <namespace>/<name>/.
    #[arg(long, env = "FRAMELANE_OUTPUT_DIR", default_value = "/outputs")]
    output_dir: PathBuf,
    /// Only VideoJobs of this namespace (default: every namespace).
    #[arg(long, env = "FRAMELANE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FRAMELANE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// `--weights-dtype`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum WeightsDtype {
    /// As the Wan models are published and run.
    Bfloat16,
    /// Twice the memory; what the tests compare with diffusers.
    Float32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let client = framelane_contract::serve::client(args.kubeconfig.as_deref()).await?;
    let jobs: Api<VideoJob> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Watching from the start (claims come only once ready), so its errors are in the metrics.
    let mut runner = Runner::start(
        client.clone(),
        &args.namespace,
        &args.name,
        &args.lane,
        jobs,
    );
    let metrics = Arc::new(Metrics::new(runner.watch_errors().clone()));
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(framelane_contract::serve::probes(
        args.metrics_addr,
        metrics.clone(),
        ready.clone(),
        "loading the model".into(),
    ));

    // SIGTERM (the pod is being deleted: a lane change, a drain) or Ctrl-C: no more claims,
    // and a running job stops at its next step and goes back to the queue. A runner not yet
    // ready has nothing to give back and exits at once.
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(Notify::new());
    tokio::spawn({
        let (stopping, stop, ready) = (stopping.clone(), stop.clone(), ready.clone());
        async move {
            let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if !ready.swap(false, Ordering::Relaxed) {
                tracing::info!("stopping before the runner was ready");
                std::process::exit(0);
            }
            tracing::info!("stopping: no more claims; a running job goes back to the queue");
            stopping.store(true, Ordering::Relaxed);
            stop.notify_one();
        }
    });

    let mode = match args.mode.as_str() {
        "Dedicated" => LaneMode::Dedicated,
        "Shared" => LaneMode::Shared,
        other => anyhow::bail!("--mode {other:?}: use Dedicated or Shared (the lane's spec.mode)"),
    };
    let models_api: Api<VideoModel> = Api::all(client.clone());
    let mut models = Vec::new();
    for name in &args.models {
        let model = models_api
            .get(name)
            .await
            .with_context(|| format!("VideoModel {name} (from --models) cannot be read; create it or fix the lane's spec.models"))?;
        models.push(model);
    }
    let refs = models
        .iter()
        .map(|m| model_ref(m, &args.models_dir))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    let precision = args.memory.precision(match args.weights_dtype {
        WeightsDtype::Bfloat16 => Precision::BFLOAT16,
        WeightsDtype::Float32 => Precision::FLOAT32,
    });
    let device = RunnerDevice::detect()?;
    // Bytes allocated before any model is loaded: after a Shared switch's unload the device
    // is back to this (on the CPU, the counting allocator's live tensor bytes).
    tracing::info!(
        device = %device.name(),
        lane = args.lane,
        allocated_bytes = device.stats()?.allocated_current,
        "runner starting"
    );
    let fit = runner_memory(&args.memory, &device, &refs, precision)
        .context("reading the models' shapes for the fit check")?;
    // The mode the runner reports (resolved with the device's budget) is the one it runs in;
    // under `auto` tiling, each job tiles as its fit check decided (see `Worker::run`).
    let memory_mode = match &fit {
        Some(fit) => {
            tracing::info!(
                device_bytes = fit.device_bytes,
                budget_bytes = fit.budget_bytes,
                mode = fit.mode.as_str(),
                vae_tiling = fit.vae_tiling.as_str(),
                "fit check"
            );
            fit.mode
        }
        None => {
            tracing::info!("device memory unknown: no fit check (see --device-memory-bytes)");
            args.memory.memory_mode
        }
    };
    let plan = MemoryPlan {
        mode: memory_mode,
        vae_tiling: args.memory.vae_tiling,
        ..MemoryPlan::default()
    };
    let host_budget = args
        .memory
        .host_memory_bytes
        .or_else(default_host_budget)
        .unwrap_or(0);
    let cache = Arc::new(Mutex::new(
        ModelCache::new(mode, device, precision, plan, refs)?.with_host_budget(host_budget)?,
    ));
    let (loaded_tx, loaded_rx) = watch::channel(None::<String>);
    if mode == LaneMode::Dedicated {
        // A Dedicated runner is ready (and announces itself) only with its model loaded.
        let model = args.models[0].clone();
        let loaded = tokio::task::spawn_blocking({
            let (cache, metrics) = (cache.clone(), metrics.clone());
            move || {
                let mut cache = ModelCache::lock(&cache)?;
                cache.get(&model)?;
                metrics.record_load(&cache);
                Ok::<_, CacheError>(())
            }
        })
        .await?;
        loaded.with_context(|| format!("loading model {}", args.models[0]))?;
        loaded_tx.send_replace(Some(args.models[0].clone()));
    }
    ready.store(true, Ordering::Relaxed);

    runner = runner.serving(args.models.clone());
    if let Some(uid) = &args.pod_uid {
        runner = runner.owned_by_pod(uid);
    }
    if let Some(fit) = &fit {
        runner = runner.reporting_memory(fit);
    }
    runner = runner.removing_outputs_of_deleted_jobs(&args.output_dir);
    let _heartbeat = runner.keep_alive(loaded_rx);
    let worker = Worker {
        cache,
        device,
        output_dir: args.output_dir.clone(),
        models_dir: args.models_dir.clone(),
        image_url_hosts: args.image_url_hosts.clone(),
        models,
        metrics,
        loaded: loaded_tx,
        fit,
        lane: args.lane.clone(),
        stopping: stopping.clone(),
    };
    let retry = || Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut backoff = retry();
    while !stopping.load(Ordering::Relaxed) {
        match runner.claim_next().await {
            Ok(claimed) => {
                backoff = retry();
                match claimed {
                    Some(job) => worker.run(job).await,
                    None => tokio::select! {
                        _ = runner.wait_for_change(Duration::from_secs(2)) => {}
                        _ = stop.notified() => {}
                    },
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming a job failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_wait()) => {}
                    _ = stop.notified() => {}
                }
            }
        }
    }
    tracing::info!("runner stopped");
    Ok(())
}

struct Worker {
    cache: Arc<Mutex<ModelCache>>,
    device: RunnerDevice,
    output_dir: PathBuf,
    models_dir: PathBuf,
    image_url_hosts: Vec<String>,
    models: Vec<VideoModel>,
    metrics: Arc<Metrics>,
    loaded: watch::Sender<Option<String>>,
    /// What the fit check measures jobs against, when the device's memory is known.
    fit: Option<RunnerMemory>,
    lane: String,
    /// Set on SIGTERM: the running job stops at its next step and is handed back.
    stopping: Arc<AtomicBool>,
}

/// How often a running job's cancellation (deletion, or another runner taking it) is looked
/// up in the watch cache, besides at each step.
const CANCEL_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// What a generation task gives back: the outcome, or why the model could not be loaded.
type Generated = Result<JobOutcome, CacheError>;

impl Worker {
    /// Generates one claimed job and writes its final status. Never panics the runner: every
    /// failure becomes the job's reason.
    async fn run(&self, mut claimed: ClaimedJob) {
        let started = Instant::now();
        let job = claimed.job().clone();
        let name = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
        let Some(model) = self.model_of(&job) else {
            let message = format!(
                "this runner serves {:?}, not model {}; check the lane's spec.models",
                self.model_names(),
                job.spec.model
            );
            self.fail(claimed, JobReason::GenerationFailed, &message, None, &name)
                .await;
            return;
        };
        // A job admitted before this lane's runners reported their memory is checked here,
        // before the GPU is touched; one that fits runs with the VAE tiling it was weighed with.
        let fitted = self
            .fit
            .as_ref()
            .map(|fit| fit_job(fit, &job, &model, &self.lane));
        let vae_tiling = match fitted.transpose() {
            Ok(tiles) => tiles,
            Err(message) => {
                self.fail(claimed, JobReason::DoesNotFit, &message, None, &name)
                    .await;
                return;
            }
        };
        let mut request = JobRequest {
            vae_tiling,
            ..request_for(&job, &model)
        };
        if let Some(image) = &job.spec.image {
            match read_image(image, &self.models_dir, &self.image_url_hosts).await {
                Ok(bytes) => request.image = Some(bytes),
                Err(e) => {
                    let message = format!("spec.image {image:?}: {e}");
                    self.fail(claimed, JobReason::GenerationFailed, &message, None, &name)
                        .await;
                    return;
                }
            }
        }
        if self.stopping.load(Ordering::Relaxed) && !claimed.is_cancelled() {
            self.hand_back(claimed, &name).await;
            return;
        }
        // Deleted while its image was read: no model switch, no GPU work for it.
        if claimed.is_cancelled() {
            let message = "cancelled before its generation started";
            self.fail(claimed, JobReason::Cancelled, message, None, &name)
                .await;
            return;
        }
        let generated = self.generate(&mut claimed, &job, &model, request).await;
        self.metrics
            .generation_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = match generated {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(load_error)) => {
                let reason = load_error.reason();
                if reason == JobReason::GpuOutOfMemory {
                    self.metrics.ooms.inc();
                }
                let message = format!(
                    "model {} could not be loaded: {load_error}",
                    model.name_any()
                );
                self.fail(claimed, reason, &message, None, &name).await;
                return;
            }
            Err(panic) => {
                // Whatever the attempt wrote before it panicked stays out of the volume.
                if let Err(e) = outputs::discard(&claimed.staging_dir(&self.output_dir)) {
                    tracing::warn!(job = name, error = %e, "could not remove a failed attempt's files");
                }
                let message = format!("the generation task failed: {panic}");
                self.fail(claimed, JobReason::GenerationFailed, &message, None, &name)
                    .await;
                return;
            }
        };
        self.report(claimed, outcome, &name).await;
    }

    fn model_of(&self, job: &VideoJob) -> Option<VideoModel> {
        self.models
            .iter()
            .find(|m| m.name_any() == job.spec.model)
            .cloned()
    }

    /// Runs the generation on a blocking thread, writing its progress to the job at each step
    /// and stopping it at the next step boundary once the job is cancelled or taken away.
    async fn generate(
        &self,
        claimed: &mut ClaimedJob,
        job: &VideoJob,
        model: &VideoModel,
        request: JobRequest,
    ) -> Result<Generated, tokio::task::JoinError> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<Progress>();
        let task = tokio::task::spawn_blocking({
            // The attempt's own folder: `report` moves the files into place once the job
            // is confirmed still this runner's.
            let (cache, device, out, cancel, metrics, loaded) = (
                self.cache.clone(),
                self.device,
                claimed.staging_dir(&self.output_dir),
                cancel.clone(),
                self.metrics.clone(),
                self.loaded.clone(),
            );
            let model_name = model.name_any();
            move || {
                let mut cache = ModelCache::lock(&cache).inspect_err(|_| {
                    // A poisoned cache that could not be cleaned up dropped its model.
                    loaded.send_replace(None);
                })?;
                let loads = cache.loads();
                // The heartbeat tells the model loaded as soon as it is (or none, after a
                // Shared switch that unloaded one and could not load the next).
                let pipeline = match cache.get(&model_name) {
                    Ok(pipeline) => pipeline,
                    Err(e) => {
                        loaded.send_replace(cache.loaded_model().map(str::to_owned));
                        return Err(e);
                    }
                };
                loaded.send_replace(Some(model_name.clone()));
                let mut outcome = run_job(pipeline, &device, &request, &out, |p| {
                    let _ = progress_tx.send(*p);
                    if cancel.load(Ordering::Relaxed) {
                        StepControl::Cancel
                    } else {
                        StepControl::Continue
                    }
                });
                if let Ok(memory) = &mut outcome.memory {
                    memory.status.model_load_seconds = Some(cache.last_load_seconds());
                }
                if cache.loads() > loads {
                    metrics.record_load(&cache);
                } else {
                    metrics.warm_hits.inc();
                }
                Ok(outcome)
            }
        });
        tokio::pin!(task);
        let mut percent = 0;
        // A deletion is noticed within this, so that the step running then is the last.
        let mut check = tokio::time::interval(CANCEL_CHECK);
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if self.must_stop(claimed) {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                Some(p) = progress_rx.recv() => {
                    if self.must_stop(claimed) {
                        cancel.store(true, Ordering::Relaxed);
                    }
                    // Stages without steps (loading, decoding, encoding) keep the last percent;
                    // 100 is the finished job's (decoding and writing the video come after
                    // the last step).
                    if let Some(done) = (p.step * 100).checked_div(p.total_steps) {
                        percent = (done as i32).min(99);
                    }
                    match claimed.progress(p.stage.as_str(), p.step as i32, p.total_steps as i32, percent).await {
                        Err(ContractError::Lost(_)) => cancel.store(true, Ordering::Relaxed),
                        Err(e) => tracing::warn!(job = %job.name_any(), error = %e, "cannot write progress"),
                        Ok(()) => {}
                    }
                }
                joined = &mut task => return joined,
            }
        }
    }

    /// Writes the outcome of a generation: the video, or the failure with its reason, with
    /// the job's memory either way.
    async fn report(&self, mut claimed: ClaimedJob, outcome: JobOutcome, name: &str) {
        let memory = outcome.memory.ok().map(|m| {
            self.metrics.observe_job(&m);
            let kinds = [
                ("allocated", m.status.after_cleanup_allocated_bytes),
                ("reserved", m.status.after_cleanup_reserved_bytes),
            ];
            for (kind, bytes) in kinds {
                self.metrics
                    .memory_after_cleanup
                    .get_or_create(&MemoryLabels { kind: kind.into() })
                    .set(bytes);
            }
            m.status
        });
        match outcome.result {
            Ok(video) => {
                let files = [video.path.clone(), video.preview_path.clone()];
                match claimed.publish(&self.output_dir, &files).await {
                    Ok(()) => {
                        let written = claimed.complete(output_for(&video), memory).await;
                        self.finished(written, JobPhase::Succeeded.as_str(), name);
                    }
                    // Taken over by another runner meanwhile (`publish` logged it).
                    Err(ContractError::Lost(_)) => {}
                    Err(ContractError::Deleted(_)) => {
                        let message =
                            "cancelled while its video was being finished: nothing was saved";
                        self.fail(claimed, JobReason::Cancelled, message, memory, name)
                            .await;
                    }
                    Err(e) => {
                        let message = format!("the video was made but not saved: {e}");
                        self.fail(claimed, JobReason::GenerationFailed, &message, memory, name)
                            .await;
                    }
                }
            }
            Err(error) => {
                // Whatever a failed attempt wrote stays out of the output volume.
                if let Err(e) = outputs::discard(&claimed.staging_dir(&self.output_dir)) {
                    tracing::warn!(job = name, error = %e, "could not remove a failed attempt's files");
                }
                let reason = error.reason();
                if reason == JobReason::Cancelled
                    && self.stopping.load(Ordering::Relaxed)
                    && !claimed.is_cancelled()
                {
                    self.hand_back(claimed, name).await;
                    return;
                }
                if reason == JobReason::GpuOutOfMemory {
                    self.metrics.ooms.inc();
                }
                self.fail(claimed, reason, &error.to_string(), memory, name)
                    .await;
            }
        }
    }

    /// Whether the running job stops at its next step: it was deleted or taken away, or this
    /// runner is stopping.
    fn must_stop(&self, claimed: &ClaimedJob) -> bool {
        claimed.is_cancelled() || self.stopping.load(Ordering::Relaxed)
    }

    /// Gives a job this stopping runner did not finish back to its queue.
    async fn hand_back(&self, claimed: ClaimedJob, name: &str) {
        match claimed.hand_back().await {
            Ok(_) => tracing::info!(job = name, "job handed back: the runner is stopping"),
            Err(e) => {
                tracing::warn!(job = name, error = %e, "could not hand the job back; it is requeued once this runner's heartbeat lapses")
            }
        }
    }

    async fn fail(
        &self,
        claimed: ClaimedJob,
        reason: JobReason,
        message: &str,
        memory: Option<MemoryReport>,
        name: &str,
    ) {
        let written = claimed.fail(reason, message, memory).await;
        self.finished(written, reason.as_str(), name);
    }

    fn finished(&self, written: Result<VideoJob, ContractError>, result: &str, name: &str) {
        match written {
            Ok(_) => {
                self.metrics
                    .jobs
                    .get_or_create(&ResultLabels {
                        result: result.into(),
                    })
                    .inc();
                tracing::info!(job = name, result, "job finished");
            }
            // Deleted or taken away meanwhile: nothing of ours to record.
            Err(e) => tracing::warn!(job = name, error = %e, "final status not written"),
        }
    }

    fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name_any()).collect()
    }
}
