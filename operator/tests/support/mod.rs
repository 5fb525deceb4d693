//! A test fixture for the operator on the real local control plane: its own namespace,
//! models and lanes (selected by a label only this test's operators watch), operator
//! processes, and simulated runners that follow the runner contract.

#![allow(dead_code)] // each test binary uses a different part of the fixture

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use framelane_api::{
    ModelLane, VideoJob, VideoModel,
    reasons::JobReason,
    videojob::{JobPhase, Output},
};
use framelane_contract::Runner;
pub use framelane_testenv::eventually;
use framelane_testenv::{TEST_LABEL, TestEnv, TestNamespace};
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Namespace},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

pub const INSTANCE_LABEL: &str = "framelane.dev/test-instance";

pub struct Fixture {
    pub ns: TestNamespace,
    pub client: Client,
    pub jobs: Api<VideoJob>,
}

impl Fixture {
    pub async fn new(prefix: &str) -> Result<Fixture> {
        let env = TestEnv::get()?;
        let ns = env.namespace(prefix).await?;
        let client = ns.client.clone();
        let jobs = ns.api();
        Ok(Fixture { ns, client, jobs })
    }

    /// A cluster-scoped name unique to this test: `<namespace>-<name>`.
    pub fn scoped(&self, name: &str) -> String {
        format!("{}-{name}", self.ns.name)
    }

    /// Creates a VideoModel with `steps` (and `cfg`, if any).
    pub async fn model(&self, name: &str, steps: i32, cfg: Option<f64>) -> Result<String> {
        self.model_with(name, steps, cfg, json!({})).await
    }

    /// The same, with `spec` merged over the model's spec.
    pub async fn model_with(
        &self,
        name: &str,
        steps: i32,
        cfg: Option<f64>,
        spec: Value,
    ) -> Result<String> {
        let name = self.scoped(name);
        let mut fixed = json!({"steps": steps});
        if let Some(cfg) = cfg {
            fixed["cfg"] = json!(cfg);
        }
        let mut full = json!({"fixedParameters": fixed, "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
            "limits": {"maxWidth": 1280, "maxHeight": 1280, "maxFrames": 161}, "weights": {"format": "diffusers", "path": name}, "modes": ["t2v"]});
        merge(&mut full, spec);
        let model: VideoModel = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
            "metadata": {"name": name, "labels": {INSTANCE_LABEL: self.ns.name}},
            "spec": full
        }))?;
        Api::<VideoModel>::all(self.client.clone())
            .create(&PostParams::default(), &model)
            .await?;
        Ok(name)
    }

    /// An anisora model with a lane that never fills or times out (for benchmarks that
    /// create thousands of jobs with no runner); returns the model's name.
    pub async fn unbounded_anisora(&self) -> Result<String> {
        let model = self.model("anisora", 8, None).await?;
        self.lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxDepth": 10000, "maxWaitSeconds": 86400}}),
        )
        .await?;
        Ok(model)
    }

    /// Creates a lane watched only by this test's operators. `spec` is merged over a
    /// Dedicated lane for `models` whose runners request CPU only (so tests do not hold the
    /// fake GPUs), unless `spec` sets its own runner.
    pub async fn lane(&self, name: &str, models: &[&str], spec: Value) -> Result<String> {
        let name = self.scoped(name);
        let mut full = json!({"mode": "Dedicated", "models": models,
            "runner": {"resources": {"requests": {"cpu": "100m"}}, "modelVolume": {"emptyDir": {}}, "outputVolume": {"emptyDir": {}}}, "queue": {"maxDepth": 500, "maxWaitSeconds": 300}});
        merge(&mut full, spec);
        let lane: ModelLane = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": name, "labels": {INSTANCE_LABEL: self.ns.name}}, "spec": full
        }))?;
        Api::<ModelLane>::all(self.client.clone())
            .create(&PostParams::default(), &lane)
            .await?;
        Ok(name)
    }

    /// Starts an operator process for this test's lanes and namespace.
    pub fn operator(&self, identity: &str) -> Result<OperatorProcess> {
        OperatorProcess::start(&self.ns, identity, &[])
    }

    /// The test's jobs through a client that does not retry: kube-rs retries every 503 by
    /// default (15 times, backing off to minutes), which would hide `queue_overloaded`.
    pub async fn jobs_without_retries(&self) -> Result<Api<VideoJob>> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.ns.env.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        config.default_retry = false;
        Ok(Api::namespaced(Client::try_from(config)?, &self.ns.name))
    }

    /// The name of this test's ValidatingWebhookConfiguration.
    pub fn webhook_configuration(&self) -> String {
        format!("framelane-{}", self.ns.name)
    }

    /// Starts an operator that also serves the admission webhook, on `port` (0: a free one).
    /// Returns it and its webhook port.
    pub fn webhook_operator(
        &self,
        identity: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<(OperatorProcess, u16)> {
        let port = if port == 0 { free_port()? } else { port };
        let mut args = vec![
            "--webhook-addr".to_string(),
            format!("127.0.0.1:{port}"),
            "--webhook-configuration".into(),
            self.webhook_configuration(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok((OperatorProcess::start(&self.ns, identity, &args)?, port))
    }

    /// Registers the webhook at `port` for this test's namespace only (so other tests on
    /// the shared control plane never call it), as the chart does for a cluster: CREATE of
    /// VideoJobs, failurePolicy Fail, no side effects, a 5 s timeout. The operator fills in
    /// the caBundle.
    pub async fn register_webhook(&self, port: u16) -> Result<()> {
        self.register_webhook_with(port, json!({})).await
    }

    /// The same, with `webhook` merged over the webhook's entry (an `objectSelector`, say).
    pub async fn register_webhook_with(&self, port: u16, webhook: Value) -> Result<()> {
        let mut entry = json!({
            "name": "videojobs.framelane.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate-videojob")},
            "rules": [{"apiGroups": ["framelane.dev"], "apiVersions": ["v1alpha1"],
                "operations": ["CREATE"], "resources": ["videojobs"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns.name}},
        });
        merge(&mut entry, webhook);
        let configuration: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": self.webhook_configuration(), "labels": {INSTANCE_LABEL: self.ns.name}},
            "webhooks": [entry]
        }))?;
        Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .create(&PostParams::default(), &configuration)
            .await?;
        Ok(())
    }

    /// Sets the caBundle of this test's webhook configuration, as cert-manager's cainjector
    /// does.
    pub async fn set_ca_bundle(&self, pem: &str) -> Result<()> {
        let configurations = Api::<ValidatingWebhookConfiguration>::all(self.client.clone());
        let mut configuration = configurations.get(&self.webhook_configuration()).await?;
        for webhook in configuration.webhooks.iter_mut().flatten() {
            webhook.client_config.ca_bundle = Some(ByteString(pem.as_bytes().to_vec()));
        }
        configurations
            .replace(
                &self.webhook_configuration(),
                &PostParams::default(),
                &configuration,
            )
            .await?;
        Ok(())
    }

    /// Points this test's webhook configuration at `port`, keeping its caBundle.
    pub async fn point_webhook(&self, port: u16) -> Result<()> {
        let patch = json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url",
            "value": format!("https://127.0.0.1:{port}/validate-videojob")}]);
        Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .patch(
                &self.webhook_configuration(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::<()>::Json(serde_json::from_value(patch)?),
            )
            .await?;
        Ok(())
    }

    /// Waits until the API server calls the webhook over TLS (the operator has published
    /// its CA): a dry-run create with a wrong `steps` for `model` is refused with 422, and
    /// one without it is admitted.
    pub async fn webhook_effective(&self, model: &str) -> Result<()> {
        let probe: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "webhook-probe"},
            "spec": {"model": model, "prompt": "probe", "steps": 999}
        }))?;
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let jobs = self.jobs_without_retries().await?;
        eventually(60, "the webhook to answer over TLS", || async {
            Ok(match jobs.create(&dry_run, &probe).await {
                Err(kube::Error::Api(s)) if s.code == 422 => Some(()),
                _ => None,
            })
        })
        .await?;
        // And the leader has read its caches: a valid create is admitted (a dry run takes
        // no slot).
        let mut valid = probe.clone();
        valid.spec.steps = None;
        eventually(60, "the webhook to admit a valid job", || async {
            Ok(jobs.create(&dry_run, &valid).await.ok().map(|_| ()))
        })
        .await
    }

    pub async fn create_job(&self, name: impl Into<String>, model: &str) -> Result<VideoJob> {
        let name: String = name.into();
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": name},
            "spec": {"model": model, "prompt": format!("job {name}"), "frames": 17, "width": 256, "height": 256}
        }))?;
        Ok(self.jobs.create(&PostParams::default(), &job).await?)
    }

    pub async fn list_jobs(&self) -> Result<Vec<VideoJob>> {
        Ok(self.jobs.list(&ListParams::default()).await?.items)
    }

    pub async fn lane_status(
        &self,
        lane: &str,
    ) -> Result<framelane_api::modellane::ModelLaneStatus> {
        Ok(Api::<ModelLane>::all(self.client.clone())
            .get(lane)
            .await?
            .status
            .unwrap_or_default())
    }

    /// Starts a simulated runner of `lane`, called `name`.
    pub fn runner(&self, name: &str, lane: &str, behaviour: Behaviour) -> SimRunner {
        SimRunner::start(
            self.client.clone(),
            &self.ns.name,
            name,
            lane,
            self.jobs.clone(),
            behaviour,
        )
    }
}

/// Removes the test's lanes (their pods go with them) and models, also when the test failed,
/// so a rerun on the same control plane finds the fake GPUs free.
impl Drop for Fixture {
    fn drop(&mut self) {
        let selector = format!("{INSTANCE_LABEL}={}", self.ns.name);
        let _ = self
            .ns
            .env
            .kubectl()
            .args(["delete", "modellanes", "-l", &selector, "--wait=false"])
            .output();
        let _ = self
            .ns
            .env
            .kubectl()
            .args(["delete", "videomodels", "-l", &selector, "--wait=false"])
            .output();
        let _ = self
            .ns
            .env
            .kubectl()
            .args([
                "delete",
                "validatingwebhookconfigurations",
                "-l",
                &selector,
                "--wait=false",
            ])
            .output();
    }
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// An operator process; killed (SIGKILL) when dropped.
pub struct OperatorProcess {
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl OperatorProcess {
    pub fn start(ns: &TestNamespace, identity: &str, extra: &[&str]) -> Result<OperatorProcess> {
        let port = free_port()?;
        let log =
            std::env::temp_dir().join(format!("framelane-operator-{}-{identity}.log", ns.name));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_framelane-operator"))
            .env("KUBECONFIG", &ns.env.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .args([
                "--namespace",
                &ns.name,
                "--watch-namespace",
                &ns.name,
                "--identity",
                identity,
            ])
            .args(["--lane-selector", &format!("{INSTANCE_LABEL}={}", ns.name)])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(OperatorProcess {
            child,
            metrics_port: port,
            log,
        })
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether /readyz answers 200 (with a webhook: once it serves its certificate).
    pub async fn ready(&self) -> Result<bool> {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        let out = tokio::process::Command::new("curl")
            .args(["-sf", &url])
            .output()
            .await?;
        Ok(out.status.success())
    }

    /// Waits until /readyz answers 200.
    pub async fn until_ready(&self) -> Result<()> {
        eventually(30, "the operator to be ready", || async {
            Ok(self.ready().await?.then_some(()))
        })
        .await
    }

    /// Waits until the operator's log has a line containing `text`.
    pub async fn until_logged(&self, text: &str) -> Result<()> {
        eventually(30, &format!("the operator to log {text:?}"), || async {
            Ok(self.log_text().contains(text).then_some(()))
        })
        .await
    }

    /// Waits until this replica reports itself the leader.
    pub async fn until_leading(&self) -> Result<()> {
        eventually(30, "the operator to lead", || async {
            Ok((sample(&self.metrics().await?, "framelane_leader") == Some(1.0)).then_some(()))
        })
        .await
    }

    pub async fn metrics(&self) -> Result<String> {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sf",
                &format!("http://127.0.0.1:{}/metrics", self.metrics_port),
            ])
            .output()
            .await?;
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A TCP round robin in front of several webhook replicas, as a Service spreads
/// connections over the pods behind it.
pub struct RoundRobin {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    pub async fn start(backends: Vec<u16>) -> Result<RoundRobin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            let mut next = 0;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let backend = backends[next % backends.len()];
                next += 1;
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(RoundRobin { port, task })
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a simulated runner works.
#[derive(Clone)]
pub struct Behaviour {
    /// Denoising steps per job.
    pub steps: i32,
    /// Time per step.
    pub step_time: Duration,
    /// When set, each job needs a permit: the test lets jobs through in batches.
    pub permits: Option<Arc<Semaphore>>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            steps: 2,
            step_time: Duration::from_millis(10),
            permits: None,
        }
    }
}

/// What the runners did, in order: (job name, runner name).
pub type RunLog = Arc<Mutex<Vec<(String, String)>>>;

/// A runner that follows the contract: heartbeat, claim the oldest job, report progress
/// at each step, stop on cancellation, complete. Dropping it (or `kill`) stops it dead,
/// like a crashed pod: no more heartbeats, no clean-up.
pub struct SimRunner {
    pub name: String,
    task: tokio::task::JoinHandle<()>,
    pub log: RunLog,
    pub loads: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
}

impl SimRunner {
    pub fn start(
        client: Client,
        ns: &str,
        name: &str,
        lane: &str,
        jobs: Api<VideoJob>,
        behaviour: Behaviour,
    ) -> SimRunner {
        let log: RunLog = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicUsize::new(0));
        let (model_tx, model_rx) = watch::channel(None::<String>);
        let mut runner = Runner::start(client, ns, name, lane, jobs);
        let (task_log, task_loads, task_cancelled) =
            (log.clone(), loads.clone(), cancelled.clone());
        let task = tokio::spawn(async move {
            let _heartbeat = runner.keep_alive(model_rx);
            loop {
                let permit = match &behaviour.permits {
                    Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore open")),
                    None => None,
                };
                let mut claimed = loop {
                    match runner.claim_next().await {
                        Ok(Some(job)) => break job,
                        Ok(None) => runner.wait_for_change(Duration::from_millis(200)).await,
                        Err(e) => {
                            eprintln!("runner {}: claim failed: {e}", runner.name());
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                };
                // Each permit lets exactly one job through.
                if let Some(permit) = permit {
                    permit.forget();
                }
                let model = claimed.job().spec.model.clone();
                if model_tx.borrow().as_deref() != Some(model.as_str()) {
                    task_loads.fetch_add(1, Ordering::SeqCst);
                    model_tx.send_replace(Some(model));
                }
                let job_name = claimed.job().name_any();
                task_log
                    .lock()
                    .unwrap()
                    .push((job_name.clone(), runner.name().to_string()));
                let mut cancelled_at = None;
                for step in 1..=behaviour.steps {
                    if claimed.is_cancelled() {
                        cancelled_at = Some(step);
                        break;
                    }
                    tokio::time::sleep(behaviour.step_time).await;
                    let percent = step * 100 / behaviour.steps;
                    if let Err(e) = claimed
                        .progress("Denoising", step, behaviour.steps, percent)
                        .await
                    {
                        eprintln!("runner {}: {e}", runner.name());
                        break;
                    }
                }
                let result = if let Some(step) = cancelled_at {
                    task_cancelled.fetch_add(1, Ordering::SeqCst);
                    claimed
                        .fail(
                            JobReason::Cancelled,
                            &format!("cancelled at step {step}"),
                            None,
                        )
                        .await
                        .map(|_| ())
                } else {
                    let output = Output {
                        path: format!(
                            "{}/{job_name}/video.mp4",
                            claimed.job().namespace().unwrap_or_default()
                        ),
                        frames: 17,
                        fps: 16,
                        width: 256,
                        height: 256,
                        ..Default::default()
                    };
                    claimed.complete(output, None).await.map(|_| ())
                };
                if let Err(e) = result {
                    eprintln!("runner {}: finishing {job_name}: {e}", runner.name());
                }
            }
        });
        SimRunner {
            name: name.into(),
            task,
            log,
            loads,
            cancelled,
        }
    }

    /// Stops the runner as a crash would.
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for SimRunner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of one series (its name with labels, as Prometheus text writes it) in `metrics`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let value = l.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// When a watch first saw each job Queued, and the `status.queuedAt` it carried (when the
/// operator took the job's slot, by this machine's clock).
pub type QueuedAt =
    Arc<Mutex<std::collections::HashMap<String, (std::time::Instant, std::time::SystemTime)>>>;

/// A [`QueuedAt`] for the jobs of `jobs`, by name, kept current by a task (abort it when
/// done).
pub fn watch_queued(jobs: Api<VideoJob>) -> (QueuedAt, tokio::task::JoinHandle<()>) {
    use futures::TryStreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let queued_at = QueuedAt::default();
    let seen = queued_at.clone();
    let task = tokio::spawn(async move {
        let _ = watcher(jobs, watcher::Config::default())
            .applied_objects()
            .try_for_each(move |job: VideoJob| {
                let queued_at = job.status.as_ref().and_then(|s| s.queued_at.as_ref());
                if let (Some(JobPhase::Queued), Some(at)) = (phase(&job), queued_at) {
                    let reserved = std::time::SystemTime::from(at.0);
                    seen.lock()
                        .unwrap()
                        .entry(job.name_any())
                        .or_insert_with(|| (std::time::Instant::now(), reserved));
                }
                futures::future::ready(Ok(()))
            })
            .await;
    });
    (queued_at, task)
}

/// Deletes the namespaces of every fixture made with `prefix` (other tests' are left alone)
/// and waits until they are gone: a benchmark's thousands of jobs left in the API server
/// would slow the runs after it.
pub async fn remove_namespaces(prefix: &str) -> Result<()> {
    let namespaces = Api::<Namespace>::all(TestEnv::get()?.client().await?);
    let selector = ListParams::default().labels(&format!("{TEST_LABEL}={prefix}"));
    for ns in namespaces.list(&selector).await? {
        match namespaces
            .delete(&ns.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    eventually(
        600,
        &format!("the {prefix} namespaces to be deleted"),
        || async {
            Ok(namespaces
                .list(&selector)
                .await?
                .items
                .is_empty()
                .then_some(()))
        },
    )
    .await
}

pub fn phase(job: &VideoJob) -> Option<JobPhase> {
    job.status.as_ref().and_then(|s| s.phase)
}

pub fn count_phases(jobs: &[VideoJob]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for job in jobs {
        *counts.entry(format!("{:?}", phase(job))).or_insert(0) += 1;
    }
    counts
}
