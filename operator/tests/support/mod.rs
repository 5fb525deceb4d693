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

use anyhow::{Context, Result, ensure};
use framelane_api::modellane::{MemoryMode, VaeTiling};
use framelane_api::{
    ModelLane, VideoJob, VideoModel,
    reasons::JobReason,
    videojob::{JobPhase, Output},
};
use framelane_contract::{
    ContractError, Runner, heartbeat::HeartbeatHandle, readable::WatchErrorLabels,
};
use framelane_core::defaults;
use framelane_core::memory::{ANNOTATION_VERSION, ModelProfile, RunnerMemory, usable_bytes};
pub use framelane_testenv::eventually;
use framelane_testenv::{TEST_LABEL, TestEnv, TestNamespace, free_port};
use k8s_openapi::{ByteString, api::core::v1::Namespace};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
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

    /// The name of this test's webhook configurations (validating and mutating).
    pub fn webhook_configuration(&self) -> String {
        format!("framelane-{}", self.ns.name)
    }

    /// This test's two webhook configurations: their API, kind, webhook name and the path
    /// the operator serves them on.
    fn webhook_configurations(
        &self,
    ) -> [(Api<DynamicObject>, &'static str, &'static str, &'static str); 2] {
        let api = |kind: &str| {
            let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
            Api::all_with(self.client.clone(), &ApiResource::from_gvk(&gvk))
        };
        [
            (
                api("ValidatingWebhookConfiguration"),
                "ValidatingWebhookConfiguration",
                "videojobs.framelane.dev",
                "/validate-videojob",
            ),
            (
                api("MutatingWebhookConfiguration"),
                "MutatingWebhookConfiguration",
                "defaults.videojobs.framelane.dev",
                "/mutate-videojob",
            ),
        ]
    }

    /// Starts an operator that also serves the admission webhook, on `port` (0: a free one).
    /// Returns it and its webhook port.
    pub fn webhook_operator(
        &self,
        identity: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<(OperatorProcess, u16)> {
        let mut args = vec!["--watch-namespace", &self.ns.name];
        args.extend(extra);
        self.webhook_operator_watching_all(identity, port, &args)
    }

    /// The same, for the jobs of every namespace (still only this test's lanes).
    pub fn webhook_operator_watching_all(
        &self,
        identity: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<(OperatorProcess, u16)> {
        self.webhook_operator_with_env(identity, port, extra, &[])
    }

    /// The same, with `env` added to the process's environment (libfaketime, say).
    pub fn webhook_operator_with_env(
        &self,
        identity: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(OperatorProcess, u16)> {
        let ca = self.ns.env.webhook_client_ca().display().to_string();
        let mut args = vec!["--webhook-client-ca", &ca];
        args.extend(extra);
        self.webhook_operator_open_with_env(identity, port, &args, env)
    }

    /// A webhook operator for this test's namespace that asks callers for no client
    /// certificate (unless `extra` gives `--webhook-client-ca`): for load generators such as
    /// wrk, which cannot show one.
    pub fn webhook_operator_open(
        &self,
        identity: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<(OperatorProcess, u16)> {
        self.webhook_operator_open_with_env(identity, port, extra, &[])
    }

    fn webhook_operator_open_with_env(
        &self,
        identity: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(OperatorProcess, u16)> {
        let port = if port == 0 { free_port()? } else { port };
        let mut args = vec![
            "--webhook-addr".to_string(),
            format!("127.0.0.1:{port}"),
            "--webhook-configuration".into(),
            self.webhook_configuration(),
            // Longer than the round robin's ENDPOINTS_LAG.
            "--shutdown-delay-seconds".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok((
            OperatorProcess::start_with_env(&self.ns, identity, &args, env)?,
            port,
        ))
    }

    /// Registers the webhooks at `port` for this test's namespace only (so other tests on
    /// the shared control plane never call them), as the chart does for a cluster: CREATE of
    /// VideoJobs, failurePolicy Fail, no side effects, a 5 s timeout; the validating one and
    /// the mutating one that fills in defaults. The operator fills in the caBundle.
    pub async fn register_webhook(&self, port: u16) -> Result<()> {
        self.register_webhook_with(port, json!({})).await
    }

    /// The same, with `webhook` merged over each webhook's entry (an `objectSelector`, say).
    pub async fn register_webhook_with(&self, port: u16, webhook: Value) -> Result<()> {
        for (api, kind, name, path) in self.webhook_configurations() {
            let mut entry = json!({
                "name": name,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 5,
                "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}")},
                "rules": [{"apiGroups": ["framelane.dev"], "apiVersions": ["v1alpha1"],
                    "operations": ["CREATE"], "resources": ["videojobs"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns.name}},
            });
            if kind == "MutatingWebhookConfiguration" {
                // As the chart's: only a job that leaves something out is sent to it.
                entry["matchConditions"] = json!([{"name": "leaves-a-default-out",
                    "expression": defaults::leaves_a_default_out()}]);
            }
            merge(&mut entry, webhook.clone());
            let configuration: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": kind,
                "metadata": {"name": self.webhook_configuration(), "labels": {INSTANCE_LABEL: self.ns.name}},
                "webhooks": [entry]
            }))?;
            api.create(&PostParams::default(), &configuration).await?;
        }
        Ok(())
    }

    /// Sets the caBundle of this test's webhook configurations, as cert-manager's cainjector
    /// does.
    pub async fn set_ca_bundle(&self, pem: &str) -> Result<()> {
        let bundle = serde_json::to_value(ByteString(pem.as_bytes().to_vec()))?;
        self.patch_webhooks(
            json!([{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle}]),
            None,
        )
        .await
    }

    /// Points this test's webhook configurations at `port`, keeping their caBundle.
    pub async fn point_webhook(&self, port: u16) -> Result<()> {
        self.patch_webhooks(json!([]), Some(port)).await
    }

    /// Applies the JSON patch `ops` to both configurations, and with `port` points them there.
    async fn patch_webhooks(&self, ops: Value, port: Option<u16>) -> Result<()> {
        for (api, _, _, path) in self.webhook_configurations() {
            let mut ops = ops.as_array().cloned().unwrap_or_default();
            if let Some(port) = port {
                ops.push(
                    json!({"op": "replace", "path": "/webhooks/0/clientConfig/url",
                    "value": format!("https://127.0.0.1:{port}{path}")}),
                );
            }
            api.patch(
                &self.webhook_configuration(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::<()>::Json(serde_json::from_value(Value::Array(ops))?),
            )
            .await?;
        }
        Ok(())
    }

    /// Points this test's mutating webhook at a port nothing listens on: every call to it
    /// fails (failurePolicy Fail), so a create that succeeds was not sent to it.
    pub async fn unreachable_mutating_webhook(&self) -> Result<()> {
        let [_, (api, ..)] = self.webhook_configurations();
        let ops = json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url",
            "value": "https://127.0.0.1:1/mutate-videojob"}]);
        api.patch(
            &self.webhook_configuration(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::<()>::Json(serde_json::from_value(ops)?),
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

    /// A runner of `lane` called `name` that only heartbeats, reporting an 80 GiB GPU serving
    /// `model` (Wan 2.2 A14B's profile) in `mode` and `vae_tiling` through the runner contract
    /// (`framelane.dev/memory`): the webhook's fit check then weighs that lane's jobs. It claims
    /// nothing, so admitted jobs stay Queued; it heartbeats until the handle is dropped.
    pub fn memory_runner(
        &self,
        name: &str,
        lane: &str,
        model: &str,
        mode: MemoryMode,
        vae_tiling: VaeTiling,
    ) -> HeartbeatHandle {
        const GIB: u64 = 1 << 30;
        let memory = RunnerMemory {
            v: ANNOTATION_VERSION,
            device_bytes: 80 * GIB,
            budget_bytes: usable_bytes(80 * GIB),
            mode,
            vae_tiling,
            models: [(model.to_owned(), ModelProfile::wan22_a14b_i2v())].into(),
        };
        let runner = Runner::start(
            self.client.clone(),
            &self.ns.name,
            name,
            lane,
            self.jobs.clone(),
        )
        .reporting_memory(&memory);
        let (_, serving) = watch::channel(None);
        runner.keep_alive(serving)
    }

    /// Waits until `lane`'s status counts `n` ready runners.
    pub async fn until_ready_runners(&self, lane: &str, n: i32) -> Result<()> {
        eventually(30, "the lane's runners to be seen", || async {
            Ok((self.lane_status(lane).await?.ready_runners == n).then_some(()))
        })
        .await
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
                "validatingwebhookconfigurations,mutatingwebhookconfigurations,validatingadmissionpolicies,validatingadmissionpolicybindings",
                "-l",
                &selector,
                "--wait=false",
            ])
            .output();
    }
}

/// `over` merged into `base`, objects key by key (as a JSON merge patch, without deletions).
pub fn merge(base: &mut Value, over: Value) {
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
        let mut args = vec!["--watch-namespace", &ns.name];
        args.extend(extra);
        OperatorProcess::start_watching_all(ns, identity, &args)
    }

    /// The same, for the jobs of every namespace (still only this test's lanes).
    pub fn start_watching_all(
        ns: &TestNamespace,
        identity: &str,
        extra: &[&str],
    ) -> Result<OperatorProcess> {
        OperatorProcess::start_with_env(ns, identity, extra, &[])
    }

    /// The same, with `env` added to the process's environment.
    pub fn start_with_env(
        ns: &TestNamespace,
        identity: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<OperatorProcess> {
        let port = free_port()?;
        let log =
            std::env::temp_dir().join(format!("framelane-operator-{}-{identity}.log", ns.name));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_framelane-operator"))
            .env("KUBECONFIG", &ns.env.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .envs(env.iter().copied())
            .args(["--namespace", &ns.name, "--identity", identity])
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

    /// SIGTERM, as the kubelet sends when a pod is deleted.
    pub fn terminate(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {}: {status}", self.child.id());
        Ok(())
    }

    /// Waits until the process has exited; its exit status.
    pub async fn until_exited(&mut self) -> Result<std::process::ExitStatus> {
        let child = &mut self.child;
        eventually(30, "the operator to exit", || {
            std::future::ready(child.try_wait().map_err(anyhow::Error::from))
        })
        .await
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

/// How long a replica's readiness takes to reach the round robin, as an EndpointSlice
/// change takes a moment to reach kube-proxy and the API server.
const ENDPOINTS_LAG: Duration = Duration::from_secs(1);

/// One replica behind the round robin.
struct Backend {
    port: u16,
    metrics_port: u16,
    /// Whether new connections go to it.
    routed: bool,
    /// What /readyz said last, and since when.
    ready: bool,
    since: tokio::time::Instant,
}

/// A TCP round robin in front of several webhook replicas, as a Service spreads
/// connections over its ready pods: a new connection goes to the next replica whose /readyz
/// has answered 200 for [`ENDPOINTS_LAG`] (a replica that stops being ready keeps getting
/// connections for as long); open connections stay where they are.
pub struct RoundRobin {
    pub port: u16,
    backends: Arc<Mutex<Vec<Backend>>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl RoundRobin {
    /// In front of `replicas` (each an operator and its webhook port).
    pub async fn start(replicas: &[(&OperatorProcess, u16)]) -> Result<RoundRobin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let backends = Arc::new(Mutex::new(Vec::<Backend>::new()));
        let pick = backends.clone();
        let proxy = tokio::spawn(async move {
            let mut next = 0;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let backend = {
                    let backends = pick.lock().expect("backends lock");
                    let routed: Vec<u16> = backends
                        .iter()
                        .filter(|b| b.routed)
                        .map(|b| b.port)
                        .collect();
                    next += 1;
                    (!routed.is_empty()).then(|| routed[next % routed.len()])
                };
                // No ready replica: the connection is refused, as with no endpoints.
                let Some(backend) = backend else { continue };
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let probed = backends.clone();
        let probes = tokio::spawn(async move {
            loop {
                let ports: Vec<u16> = probed
                    .lock()
                    .expect("backends lock")
                    .iter()
                    .map(|b| b.metrics_port)
                    .collect();
                let mut ready = Vec::new();
                for port in ports {
                    ready.push(readyz(port).await);
                }
                let now = tokio::time::Instant::now();
                for (b, ready) in probed.lock().expect("backends lock").iter_mut().zip(ready) {
                    if b.ready != ready {
                        (b.ready, b.since) = (ready, now);
                    }
                    if now.duration_since(b.since) >= ENDPOINTS_LAG {
                        b.routed = b.ready;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let service = RoundRobin {
            port,
            backends,
            tasks: [proxy, probes],
        };
        for (operator, webhook_port) in replicas {
            service.add(operator, *webhook_port);
        }
        Ok(service)
    }

    /// Another replica behind it (a new pod of a rollout).
    pub fn add(&self, operator: &OperatorProcess, webhook_port: u16) {
        self.backends.lock().expect("backends lock").push(Backend {
            port: webhook_port,
            metrics_port: operator.metrics_port,
            routed: false,
            ready: false,
            since: tokio::time::Instant::now(),
        });
    }
}

/// Whether the process's /readyz on `port` answers 200.
async fn readyz(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Ok(true))
    )
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
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
    /// Its watch's errors by cause, as the runner binary exports them.
    watch_errors: Family<WatchErrorLabels, Counter>,
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
        let watch_errors = runner.watch_errors().clone();
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
                    // As the real runner: a job no longer its own stops it; a refused
                    // write (the API server unreachable) does not stop the work.
                    match claimed
                        .progress("Denoising", step, behaviour.steps, percent)
                        .await
                    {
                        Err(e @ ContractError::Lost(_)) => {
                            eprintln!("runner {}: {e}", runner.name());
                            break;
                        }
                        Err(e) => eprintln!("runner {}: progress not written: {e}", runner.name()),
                        Ok(()) => {}
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
            watch_errors,
        }
    }

    /// How many times this runner's job watch expired (410 Gone) and was listed again.
    pub fn watch_expiries(&self) -> u64 {
        self.watch_errors
            .get_or_create(&WatchErrorLabels {
                kind: "VideoJob".into(),
                cause: "expired".into(),
            })
            .get()
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

/// A VideoJob named `name` with `spec`.
pub fn job(name: &str, spec: Value) -> VideoJob {
    serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": name}, "spec": spec
    }))
    .expect("a VideoJob")
}

/// `n` concurrent creates of jobs of `model` named `<prefix>-<i>` (each retried only on 429,
/// the API server's own back-pressure): how many were admitted, and the refusals' Statuses.
pub async fn burst(
    jobs: &Api<VideoJob>,
    model: &str,
    prefix: &str,
    n: usize,
) -> (usize, Vec<Box<kube::core::Status>>) {
    let creates = (0..n).map(|i| {
        let job = job(
            &format!("{prefix}-{i}"),
            json!({"model": model, "prompt": format!("burst {i}")}),
        );
        async move {
            loop {
                match jobs.create(&PostParams::default(), &job).await {
                    Err(kube::Error::Api(s)) if s.code == 429 => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    result => return result,
                }
            }
        }
    });
    let mut admitted = 0;
    let mut refused = Vec::new();
    for result in futures::future::join_all(creates).await {
        match result {
            Ok(_) => admitted += 1,
            Err(kube::Error::Api(status)) => refused.push(status),
            Err(e) => panic!("a create failed without a Status: {e}"),
        }
    }
    (admitted, refused)
}

/// The Events about the object `kind`/`name` (in `namespace`, for a namespaced kind) as
/// `(reason, note)`, oldest first.
pub async fn events_about(
    client: &Client,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<Vec<(String, String)>> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let mut found: Vec<_> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some(kind)
                    && r.name.as_deref() == Some(name)
                    && r.namespace.as_deref() == namespace
            })
        })
        .collect();
    found.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(found
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
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

/// Stops one of this checkout's control plane processes (tests/testenv/outage.sh); starts it
/// again when ended or dropped, so a failing test leaves the control plane up for the next one.
pub struct Outage {
    component: &'static str,
    stopped: bool,
}

impl Outage {
    /// Async, so that the simulated runners and proxies of the test's runtime go on (a
    /// blocking wait would freeze their heartbeats while the API server comes back).
    pub async fn begin(component: &'static str) -> Result<Outage> {
        outage("stop", component).await?;
        Ok(Outage {
            component,
            stopped: true,
        })
    }

    pub async fn end(&mut self) -> Result<()> {
        self.stopped = false;
        outage("start", self.component).await
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.stopped {
            let _ = Command::new(outage_script())
                .args(["start", self.component])
                .status();
        }
    }
}

fn outage_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/testenv/outage.sh")
}

async fn outage(action: &str, component: &str) -> Result<()> {
    let status = tokio::process::Command::new(outage_script())
        .args([action, component])
        .status()
        .await?;
    ensure!(
        status.success(),
        "tests/testenv/outage.sh {action} {component}: {status}"
    );
    Ok(())
}

/// User plus system CPU time of `pid` so far, in seconds (clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), which ends at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// The pid of the local control plane's process `name` (kube-apiserver, etcd, ...), from the
/// pid file up.sh wrote.
pub fn control_plane_pid(name: &str) -> Result<u32> {
    let file = TestEnv::get()?.root.join(format!(".testenv/{name}.pid"));
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file:?}"))?;
    Ok(text.trim().parse()?)
}

/// [`cpu_seconds`] of each of `pids`, read one after another.
pub fn cpu_seconds_each<const N: usize>(pids: [u32; N]) -> Result<[f64; N]> {
    let mut seconds = [0.0; N];
    for (s, pid) in seconds.iter_mut().zip(pids) {
        *s = cpu_seconds(pid)?;
    }
    Ok(seconds)
}
