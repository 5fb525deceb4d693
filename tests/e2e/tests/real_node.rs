//! The Helm chart with the images `just images` builds, in real pods on the real node of the
//! local control plane (tests/testenv/node.sh: containerd, kubelet, kube-proxy), where the
//! other suites play the operator and the runners as processes on kwok's fake nodes:
//! - `helm install` with the local images: both operator pods become Ready through their own
//!   probes, one leads, and the API server calls the webhook in the pods behind the chart's
//!   Service; a CPU lane (runners that ask for no GPU) runs its runner pod on the node, which
//!   turns a VideoJob into an MP4 on the outputs volume;
//! - the operator and the runner run as user 65532 on a read-only root filesystem;
//! - from a pod in another namespace, forged AdmissionReviews to the webhook's Service (the
//!   API server's paths and the leader path) are refused and take no slot of the queue;
//! - the leader pod deleted: the other replica takes over and no job is lost;
//! - the runner's container killed: its job is requeued and finishes;
//! - `helm upgrade` to another operator image tag while jobs are created: every create is
//!   answered and every job finishes;
//! - `helm uninstall` removes the pods.
//!
//! Run with `just test-real-node` (the `real-node` feature; root, Docker, the images).
//!
//! The test's namespace asks for the real node (it is tainted: kwok keeps every other pod), so
//! the release's operator pods and the lane's runner pods land there.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use framelane_api::{ModelLane, VideoJob, videojob::JobPhase};
use framelane_e2e::until_succeeded;
use framelane_testenv::{
    TestEnv, TestNamespace, eventually, forged_review, repo_root, run_tool, tiny_models,
};
use k8s_openapi::api::{
    admissionregistration::v1::ValidatingWebhookConfiguration,
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{PersistentVolume, Pod, Service},
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The user and group of both images and of the chart's pods.
const NONROOT: &str = "65532";

/// The CPU lane's queue depth: deep enough for the upgrade's burst.
const MAX_DEPTH: usize = 100;

/// The ConfigMap with the CA of the API server's webhook client certificate (webhook.clientCA).
const WEBHOOK_CLIENT_CA: &str = "apiserver-webhook-client-ca";

/// The real node as up.sh recorded it in .testenv/env.
struct Node {
    name: String,
    /// containerd's socket, for what the API does not show: a container's process.
    containerd: String,
}

impl Node {
    fn of(env: &TestEnv) -> Result<Node> {
        let path = env.root.join(".testenv/env");
        let vars: BTreeMap<String, String> = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let var = |key: &str| {
            vars.get(key).cloned().with_context(|| {
                format!(
                    "{} has no {key}: the control plane runs without its real node; \
                     run `just test-real-node` as root (it starts the control plane with TESTENV_REAL_NODE=1)",
                    path.display()
                )
            })
        };
        Ok(Node {
            name: var("NODE_NAME")?,
            containerd: var("NODE_CONTAINERD")?,
        })
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.args(["--address", &self.containerd, "--namespace", "k8s.io"]);
        cmd
    }

    /// The host pid of a pod's container, from its containerd task.
    fn pid(&self, pod: &Pod, container: &str) -> Result<u32> {
        let status = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|s| s.iter().find(|c| c.name == container))
            .with_context(|| format!("{container} of {:?} has no status", pod.metadata.name))?;
        let id = status
            .container_id
            .as_deref()
            .and_then(|id| id.strip_prefix("containerd://"))
            .with_context(|| format!("{container} has no containerd id: {status:?}"))?;
        let tasks = run_tool(self.ctr().args(["task", "ls"]))?;
        tasks
            .lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(id)).then(|| cols.next()?.parse().ok())?
            })
            .with_context(|| format!("no running task {id} in\n{tasks}"))
    }
}

/// Puts a namespace's pods on the real node (tests/testenv/node.sh: it is tainted, and the
/// API server's PodNodeSelector and PodTolerationRestriction read these annotations).
fn on_the_real_node(env: &TestEnv, namespace: &str) -> Result<()> {
    let tolerations =
        r#"[{"key":"framelane.dev/real-node","operator":"Exists","effect":"NoSchedule"}]"#;
    run_tool(env.kubectl().args([
        "annotate",
        "namespace",
        namespace,
        "scheduler.alpha.kubernetes.io/node-selector=framelane.dev/node=real",
        &format!("scheduler.alpha.kubernetes.io/defaultTolerations={tolerations}"),
    ]))?;
    Ok(())
}

/// The user and group a process runs as, and whether its root filesystem is read-only, from
/// /proc on the host.
fn process_identity(pid: u32) -> Result<(String, String, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ids = |key: &str| -> Result<String> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
        // Real, effective, saved and filesystem ids must all agree.
        let ids: Vec<&str> = line[key.len()..].split_whitespace().collect();
        ensure!(ids.iter().all(|id| *id == ids[0]), "{line}");
        Ok(ids[0].to_string())
    };
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // Fields: id, parent, major:minor, root, mount point, options, ...
    let root = mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 5 && f[4] == "/")
        .with_context(|| format!("no root mount in /proc/{pid}/mountinfo"))?;
    let read_only = root[5].split(',').any(|o| o == "ro");
    Ok((ids("Uid:")?, ids("Gid:")?, read_only))
}

/// The chart's images: the repositories of its values at its appVersion, and the CPU flavour
/// of the runner (`just images` tags it `<tag>-cpu`).
fn images() -> Result<(String, String, String)> {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("charts/framelane/Chart.yaml"),
    )?)?;
    let values: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("charts/framelane/values.yaml"),
    )?)?;
    let app = chart["appVersion"]
        .as_str()
        .context("Chart.yaml has an appVersion")?
        .to_string();
    let repository = |component: &str| {
        values[component]["image"]["repository"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("values.yaml names {component}.image.repository"))
    };
    Ok((
        format!("{}:{app}", repository("operator")?),
        format!("{}:{app}-cpu", repository("runner")?),
        app,
    ))
}

/// The webhook's 422 for a job whose model does not exist.
fn names_the_model(answer: Result<VideoJob, kube::Error>) -> bool {
    match answer {
        Err(kube::Error::Api(s)) => s.code == 422 && s.message.contains("spec.model"),
        _ => false,
    }
}

fn sha256(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

/// The release under test, its namespace and the host folders behind its volumes.
struct Release {
    env: &'static TestEnv,
    node: Node,
    ns: TestNamespace,
    name: String,
    /// `<release>-framelane`, the prefix of the chart's object names.
    full: String,
    dir: tempfile::TempDir,
}

impl Release {
    fn model(&self) -> String {
        format!("{}-anisora", self.ns.name)
    }

    fn lane(&self) -> String {
        format!("{}-cpu", self.ns.name)
    }

    fn outputs(&self) -> PathBuf {
        self.dir.path().join("outputs")
    }

    /// The release's values: the CPU runner image, the webhook behind the chart's Service for
    /// this namespace only, answering only the API server (its client CA), one tiny model (text
    /// to video, small default sizes) and one CPU lane (no GPU asked for, a queue deep enough
    /// for the upgrade's burst), volumes bound to this test's folders.
    fn values(&self, runner_tag: &str, operator_tag: &str) -> Value {
        let ns = &self.ns.name;
        json!({
            // Keeps the operator of `just up` away from the release's lanes (its selector
            // leaves the tests' out), so only the release's own operator runs them.
            "commonLabels": {"framelane.dev/test-instance": ns},
            "operator": {
                "image": {"tag": operator_tag},
                "laneSelector": format!("app.kubernetes.io/instance={}", self.name),
            },
            "runner": {"image": {"tag": runner_tag}},
            "webhook": {
                "clientCA": {"configMap": WEBHOOK_CLIENT_CA},
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            },
            "volumes": {
                "models": {"storageClassName": "", "volumeName": format!("{ns}-models")},
                "outputs": {"storageClassName": "", "volumeName": format!("{ns}-outputs")},
            },
            "models": [{"name": self.model(), "spec": {"fixedParameters": {"steps": 4, "cfg": 1.0},
                "defaults": {"width": 256, "height": 256, "frames": 5, "fps": 8},
                "limits": {"maxWidth": 512, "maxHeight": 512, "maxFrames": 81},
                "weights": {"format": "comfyui", "file": "phr00t/phr00t-aio.safetensors",
                    "tokenizer": "phr00t/tokenizer"},
                "sampling": {"solver": "euler_ancestral", "schedule": "beta", "shift": 8.0},
                "modes": ["t2v"]}}],
            "lanes": [{"name": self.lane(), "spec": {"mode": "Dedicated", "models": [self.model()],
                "queue": {"maxDepth": MAX_DEPTH, "maxWaitSeconds": 600},
                "runner": {"resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                    "limits": {"memory": "4Gi"}}}}}],
        })
    }

    fn helm(&self, verb: &str, args: &[&str]) -> Result<String> {
        run_tool(
            Command::new(self.env.bin_dir.join("helm"))
                .env("KUBECONFIG", &self.env.kubeconfig)
                .args([verb, &self.name, "-n", &self.ns.name])
                .args(args),
        )
    }

    fn install_or_upgrade(&self, verb: &str, runner_tag: &str, operator_tag: &str) -> Result<()> {
        let values = self.dir.path().join(format!("values-{verb}.yaml"));
        std::fs::write(
            &values,
            serde_yaml::to_string(&self.values(runner_tag, operator_tag))?,
        )?;
        let chart = repo_root().join("charts/framelane");
        self.helm(
            verb,
            &[
                &chart.to_string_lossy(),
                "-f",
                &values.to_string_lossy(),
                "--wait",
                "--timeout=300s",
            ],
        )?;
        Ok(())
    }

    async fn pods(&self, selector: &str) -> Result<Vec<Pod>> {
        Ok(self
            .ns
            .api::<Pod>()
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }

    async fn operator_pods(&self) -> Result<Vec<Pod>> {
        self.pods(&format!(
            "app.kubernetes.io/name=framelane-operator,app.kubernetes.io/instance={}",
            self.name
        ))
        .await
    }

    async fn runner_pod(&self) -> Result<Pod> {
        let mut pods = self
            .pods(&format!("framelane.dev/lane={}", self.lane()))
            .await?;
        ensure!(pods.len() == 1, "the lane has one runner pod: {pods:?}");
        Ok(pods.remove(0))
    }

    async fn leader(&self) -> Result<Option<String>> {
        let lease = self
            .ns
            .api::<Lease>()
            .get(&format!("{}-operator", self.full))
            .await?;
        Ok(lease.spec.and_then(|s| s.holder_identity))
    }

    /// A job at the model's default size, or (`long`) at its largest, which runs for a while.
    async fn create_job(&self, name: &str, long: bool) -> Result<(), kube::Error> {
        let mut spec = json!({"model": self.model(), "prompt": format!("{name} by the sea"),
            "seed": 7});
        if long {
            spec["width"] = json!(512);
            spec["height"] = json!(512);
            spec["frames"] = json!(81);
        }
        let job: VideoJob = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": name}, "spec": spec,
        }))
        .expect("a VideoJob");
        self.ns
            .api::<VideoJob>()
            .create(&PostParams::default(), &job)
            .await
            .map(|_| ())
    }

    /// Waits for the jobs to succeed: up to 300 s (the long job takes minutes on a CPU), and
    /// 30 s more a job (one runner on a shared CPU runs them one after another).
    async fn wait_succeeded(&self, names: &[String]) -> Result<()> {
        let secs = 300 + 30 * names.len() as u64;
        until_succeeded(&self.ns.api(), names, secs, || Ok(())).await?;
        Ok(())
    }

    /// The job's MP4 is on the outputs volume, as its status describes it.
    async fn check_output(&self, name: &str) -> Result<()> {
        let job = self.ns.api::<VideoJob>().get(name).await?;
        let output = job
            .status
            .and_then(|s| s.output)
            .with_context(|| format!("{name} has an output"))?;
        let file = self.outputs().join(&output.path);
        ensure!(
            file.metadata()?.len() == output.size_bytes as u64,
            "{output:?}"
        );
        ensure!(sha256(&file)? == output.sha256, "{output:?}");
        Ok(())
    }
}

// Two workers: jobs are created on one while `helm upgrade` blocks the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_in_real_pods_on_the_real_node() -> Result<()> {
    let env = TestEnv::get()?;
    let node = Node::of(env)?;
    let (operator_image, runner_image, app) = images()?;
    run_tool(
        Command::new(repo_root().join("tests/testenv/node.sh")).args([
            "load",
            &operator_image,
            &runner_image,
        ]),
    )?;
    // The upgrade's new tag: the same image under another name, as a release pipeline would
    // push it.
    let upgraded_tag = format!("{app}-upgraded");
    let upgraded = format!(
        "{}:{upgraded_tag}",
        operator_image.rsplit_once(':').expect("a tag").0
    );
    let _ = run_tool(node.ctr().args(["images", "rm", &upgraded]));
    run_tool(
        node.ctr()
            .args(["images", "tag", &operator_image, &upgraded]),
    )?;

    let ns = env.namespace("real").await?;
    on_the_real_node(env, &ns.name)?;
    run_tool(env.kubectl().args([
        "label",
        "namespace",
        &ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
    ]))?;
    run_tool(
        env.kubectl()
            .args(["create", "configmap", WEBHOOK_CLIENT_CA, "-n", &ns.name])
            .arg(format!(
                "--from-file=ca.crt={}",
                env.webhook_client_ca().display()
            )),
    )?;
    let release = Release {
        env,
        node,
        name: ns.name.clone(),
        full: format!("{}-framelane", ns.name),
        dir: tempfile::tempdir()?,
        ns,
    };
    // Host folders behind the volumes: the models readable, the outputs writable by the
    // runner's user.
    let models = release.dir.path().join("models");
    run_tool(Command::new("cp").arg("-r").arg(tiny_models()).arg(&models))?;
    run_tool(
        Command::new("chmod")
            .arg("-R")
            .arg("a+rX")
            .arg(release.dir.path()),
    )?;
    std::fs::create_dir(release.outputs())?;
    run_tool(
        Command::new("chown")
            .arg(format!("{NONROOT}:{NONROOT}"))
            .arg(release.outputs()),
    )?;
    let volumes: Api<PersistentVolume> = Api::all(release.ns.client.clone());
    for (which, mode, path) in [
        ("models", "ReadOnlyMany", &models),
        ("outputs", "ReadWriteMany", &release.outputs()),
    ] {
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": format!("{}-{which}", release.ns.name)},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": [mode], "storageClassName": "",
                "hostPath": {"path": path, "type": "Directory"},
                "claimRef": {"namespace": release.ns.name, "name": format!("{}-{which}", release.full)}},
        }))?;
        volumes.create(&PostParams::default(), &pv).await?;
    }
    let result = install_and_run(&release, &runner_image, &app, &upgraded_tag).await;
    if result.is_err() {
        let _ = release.helm("uninstall", &["--wait", "--timeout=120s"]);
    }
    for which in ["models", "outputs"] {
        let _ = volumes
            .delete(
                &format!("{}-{which}", release.ns.name),
                &DeleteParams::default(),
            )
            .await;
    }
    result
}

async fn install_and_run(
    release: &Release,
    runner_image: &str,
    app: &str,
    upgraded_tag: &str,
) -> Result<()> {
    let (ns, full, node) = (&release.ns, &release.full, &release.node);
    let runner_tag = format!("{app}-cpu");
    let installed = Instant::now();
    release.install_or_upgrade("install", &runner_tag, app)?;

    // Both operator pods on the real node, Ready through their probes, never restarted.
    let operators = release.operator_pods().await?;
    ensure!(operators.len() == 2, "{operators:?}");
    for pod in &operators {
        let spec = pod.spec.as_ref().context("pod spec")?;
        ensure!(
            spec.node_name.as_deref() == Some(&node.name),
            "operator pod on {:?}",
            spec.node_name
        );
        let container = &spec.containers[0];
        ensure!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
        let status = &pod.status.as_ref().context("pod status")?;
        let cs = &status.container_statuses.as_ref().context("statuses")?[0];
        ensure!(cs.ready && cs.restart_count == 0, "{cs:?}");
    }
    let names: Vec<String> = operators
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let leader = eventually(60, "an operator pod to lead", || async {
        Ok(release.leader().await?.filter(|l| names.contains(l)))
    })
    .await?;

    // The API server calls the webhook through the chart's Service: a job naming no model is
    // refused by the pods.
    let configuration = Api::<ValidatingWebhookConfiguration>::all(ns.client.clone())
        .get(full)
        .await?;
    let service = configuration.webhooks.unwrap_or_default()[0]
        .client_config
        .service
        .clone()
        .context("the webhook is called through its Service")?;
    ensure!(service.name == format!("{full}-webhook"), "{service:?}");
    let bad: VideoJob = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "probe"},
        "spec": {"model": "no-such-model", "prompt": "p"},
    }))?;
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(
        60,
        "the webhook in the pods to refuse a bad job",
        || async {
            let answer = ns.api::<VideoJob>().create(&dry, &bad).await;
            Ok(names_the_model(answer).then_some(()))
        },
    )
    .await?;

    // The CPU lane's runner pod on the node, and the first job through it.
    let lanes: Api<ModelLane> = Api::all(ns.client.clone());
    eventually(180, "the CPU lane's runner to be ready", || async {
        let lane = lanes.get(&release.lane()).await?;
        Ok((lane.status.map(|s| s.ready_runners) == Some(1)).then_some(()))
    })
    .await?;
    let runner = release.runner_pod().await?;
    ensure!(
        runner.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&node.name),
        "the runner pod runs on the real node"
    );
    release.create_job("first", false).await?;
    release.wait_succeeded(&["first".into()]).await?;
    release.check_output("first").await?;
    eprintln!(
        "real node: helm install to the first job Succeeded in {:.0} s",
        installed.elapsed().as_secs_f64()
    );

    // User 65532 on a read-only root, in the processes themselves.
    for (pod, container) in operators
        .iter()
        .map(|p| (p, "operator"))
        .chain([(&runner, "runner")])
    {
        let pid = node.pid(pod, container)?;
        let (uid, gid, read_only) = process_identity(pid)?;
        ensure!(
            uid == NONROOT && gid == NONROOT && read_only,
            "{container} of {:?}: uid {uid}, gid {gid}, read-only root {read_only}",
            pod.metadata.name
        );
    }
    let runner_name = runner.metadata.name.clone().context("named")?;
    let exec = |args: &[&str]| {
        ns.kubectl()
            .args(["exec", &runner_name, "-c", "runner", "--"])
            .args(args)
            .output()
    };
    let denied = exec(&["touch", "/probe"])?;
    ensure!(
        !denied.status.success()
            && String::from_utf8_lossy(&denied.stderr).contains("Read-only file system"),
        "writing the runner's root: {denied:?}"
    );
    ensure!(
        exec(&["touch", "/tmp/probe"])?.status.success(),
        "/tmp is writable"
    );

    forged_reviews_from_another_namespace(release, runner_image).await?;

    // The leader pod deleted with jobs queued: the other replica leads, every job finishes.
    let queued: Vec<String> = (1..=3).map(|i| format!("takeover-{i}")).collect();
    for name in &queued {
        release.create_job(name, false).await?;
    }
    let deleted = Instant::now();
    ns.api::<Pod>()
        .delete(&leader, &DeleteParams::default())
        .await?;
    let successor = eventually(90, "another operator pod to lead", || async {
        Ok(release.leader().await?.filter(|l| *l != leader))
    })
    .await?;
    eprintln!(
        "real node: {successor} leads {:.0} s after leader {leader} was deleted",
        deleted.elapsed().as_secs_f64()
    );
    release.create_job("after-takeover", false).await?;
    let mut expected = queued.clone();
    expected.push("after-takeover".into());
    release.wait_succeeded(&expected).await?;

    // The runner's container killed mid-job: the kubelet restarts it, the job runs again.
    release.create_job("killed", true).await?;
    let jobs = ns.api::<VideoJob>();
    eventually(120, "the long job to run", || async {
        let status = jobs.get("killed").await?.status.unwrap_or_default();
        Ok((status.phase == Some(JobPhase::Running)).then_some(()))
    })
    .await?;
    let runner = release.runner_pod().await?;
    let pid = node.pid(&runner, "runner")?;
    run_tool(Command::new("kill").args(["-KILL", &pid.to_string()]))?;
    let when_killed = jobs.get("killed").await?.status.unwrap_or_default();
    ensure!(
        when_killed.phase == Some(JobPhase::Running),
        "the job was to be running when its runner was killed: {when_killed:?}"
    );
    eventually(120, "the kubelet to restart the runner", || async {
        let pod = release.runner_pod().await?;
        let restarted = pod
            .status
            .and_then(|s| s.container_statuses)
            .is_some_and(|c| c[0].restart_count == 1 && c[0].ready);
        Ok(restarted.then_some(()))
    })
    .await?;
    release.wait_succeeded(&["killed".into()]).await?;
    let killed = jobs.get("killed").await?.status.unwrap_or_default();
    ensure!(
        killed.attempts == Some(2),
        "the killed job ran again: {killed:?}"
    );
    release.check_output("killed").await?;

    // An upgrade to another operator tag while jobs are created: every create is answered
    // (by whichever replica serves the webhook): created, or refused by the webhook with a 503
    // while the leader changes (then created again a moment later); never a failed call.
    // Every job created finishes.
    let stop = Arc::new(AtomicBool::new(false));
    let creating = tokio::spawn({
        let (jobs, model, stop) = (jobs.clone(), release.model(), stop.clone());
        async move {
            let (mut created, mut refused) = (Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let name = format!("upgrade-{}", created.len());
                let job: VideoJob = serde_json::from_value(json!({
                    "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
                    "metadata": {"name": name}, "spec": {"model": model, "prompt": "a wave", "seed": 7},
                }))?;
                match jobs.create(&PostParams::default(), &job).await {
                    Ok(_) => created.push(name),
                    Err(kube::Error::Api(s))
                        if s.code == 503
                            && s.message
                                .contains("\"videojobs.framelane.dev\" denied the request") =>
                    {
                        refused += 1
                    }
                    Err(e) => bail!("creating {name} during the upgrade: {e}"),
                }
                // Often enough that an upgrade of a few seconds sees several creates.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok((created, refused))
        }
    });
    let upgrade = tokio::task::block_in_place(|| {
        release.install_or_upgrade("upgrade", &runner_tag, upgraded_tag)
    });
    stop.store(true, Ordering::Relaxed);
    upgrade?;
    let (created, refused) = creating.await??;
    ensure!(
        created.len() >= 5,
        "only {} creates during the upgrade",
        created.len()
    );
    let deployment = ns
        .api::<Deployment>()
        .get(&format!("{full}-operator"))
        .await?;
    let image = deployment
        .spec
        .template
        .spec
        .map(|s| s.containers[0].image.clone().unwrap_or_default())
        .unwrap_or_default();
    ensure!(image.ends_with(upgraded_tag), "{image}");
    // `helm upgrade --wait` returns once the new pods are ready; the old ones may still be
    // terminating.
    eventually(120, "only upgraded operator pods to remain", || async {
        let pods = release.operator_pods().await?;
        let upgraded = pods.iter().all(|pod| {
            pod.spec.as_ref().is_some_and(|s| {
                s.containers[0]
                    .image
                    .as_deref()
                    .is_some_and(|i| i.ends_with(upgraded_tag))
            })
        });
        Ok((upgraded && pods.len() == 2).then_some(()))
    })
    .await?;
    release.wait_succeeded(&created).await?;
    eprintln!(
        "real node: {} jobs created during the operator upgrade, all Succeeded; {refused} \
         creates refused with 503 while the leader changed",
        created.len()
    );

    jobs.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    release.helm("uninstall", &["--wait", "--timeout=120s"])?;
    eventually(120, "the release's pods to be gone", || async {
        let pods = ns.api::<Pod>().list(&ListParams::default()).await?.items;
        Ok(pods.is_empty().then_some(()))
    })
    .await
}

/// From a pod in another namespace on the real node, more forged reviews than the lane's
/// depth to the webhook's Service: on the API server's paths without its client certificate
/// and on the leader path without a replica's signature. Each is refused (403), and none takes
/// a slot: a real create right after is admitted (had each taken its 15 s hold, the lane would
/// answer `queue_overloaded`). The requests leave from the pod's own network namespace and
/// address (curl from the host, run in that namespace), through kube-proxy's rules for the
/// Service, as a process in the pod would send them.
async fn forged_reviews_from_another_namespace(release: &Release, image: &str) -> Result<()> {
    let env = release.env;
    let other = env.namespace("attacker").await?;
    on_the_real_node(env, &other.name)?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "attacker"},
        "spec": {"containers": [{"name": "attacker", "image": image,
            "command": ["sleep", "3600"],
            "securityContext": {"allowPrivilegeEscalation": false, "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}],
            "terminationGracePeriodSeconds": 0},
    }))?;
    let pods = other.api::<Pod>();
    pods.create(&PostParams::default(), &pod).await?;
    let pod = eventually(120, "the other namespace's pod to run", || async {
        let pod = pods.get("attacker").await?;
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].state.as_ref().is_some_and(|s| s.running.is_some()));
        Ok(running.then_some(pod))
    })
    .await?;
    let pid = release.node.pid(&pod, "attacker")?;
    let service = release
        .ns
        .api::<Service>()
        .get(&format!("{}-webhook", release.full))
        .await?;
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the webhook's Service has a cluster IP")?;

    // One curl a review, all in one shell in the pod's network namespace.
    const PATHS: [&str; 3] = [
        "/validate-videojob",
        "/mutate-videojob",
        "/leader/validate-videojob",
    ];
    let dir = release.dir.path().join("forged");
    std::fs::create_dir(&dir)?;
    let mut script = String::new();
    for (p, path) in PATHS.iter().enumerate() {
        for i in 0..=MAX_DEPTH {
            let file = dir.join(format!("{p}-{i}.json"));
            let name = format!("forged-{p}-{i}");
            std::fs::write(
                &file,
                forged_review(&release.ns.name, &release.model(), &name),
            )?;
            script.push_str(&format!(
                "curl -sk -o /dev/null -w '%{{http_code}}\\n' -m 5 -H 'content-type: application/json' \
                 --data-binary @{} https://{ip}{path}\n",
                file.display()
            ));
        }
    }
    let sent = Instant::now();
    let answers = run_tool(Command::new("nsenter").args([
        "-t",
        &pid.to_string(),
        "-n",
        "sh",
        "-c",
        &script,
    ]))?;
    let seconds = sent.elapsed().as_secs_f64();
    let codes: Vec<&str> = answers.lines().collect();
    ensure!(
        codes.len() == PATHS.len() * (MAX_DEPTH + 1) && codes.iter().all(|c| *c == "403"),
        "forged reviews from another namespace's pod answered {codes:?}"
    );
    release.create_job("after-forged", false).await?;
    ensure!(
        seconds < 10.0,
        "the forged reviews took {seconds:.1} s, so their holds (15 s) might have run out \
         before the real create"
    );
    eprintln!(
        "real node: {} forged reviews from a pod in {} refused (403) in {seconds:.1} s; a real \
         create right after admitted",
        codes.len(),
        other.name
    );
    release.wait_succeeded(&["after-forged".into()]).await?;
    pods.delete("attacker", &DeleteParams::default()).await?;
    Ok(())
}
