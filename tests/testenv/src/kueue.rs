//! Kueue, the peer the benchmarks compare Framelane with, on the same local control plane:
//! `tests/testenv/kueue.sh` builds it (cached outside the checkout) and starts its manager the
//! first time a process asks for it; [`KueueQueue`] stands up one ClusterQueue and LocalQueue
//! that stand for one lane.
//!
//! What "admitted" means here: Kueue reserves quota for a Job's Workload (its `QuotaReserved`
//! condition), the counterpart of Framelane taking a queue slot (`Queued`). The ClusterQueue
//! carries one AdmissionCheck that no controller ever answers, so a reserved Job stays
//! suspended and no pod runs: its quota is the count of reserved slots, like a lane's
//! `maxDepth`. Kueue has no bound on the jobs waiting for quota (a LocalQueue takes any
//! number; none is refused at create).

use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

use futures::TryStreamExt;
use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Namespace},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};

use crate::{Error, TestEnv, TestNamespace, eventually};

/// The label that opts a namespace into Kueue's Job webhooks (kueue.sh registers them for
/// such namespaces only, so the rest of the tests never call them).
pub const NAMESPACE_LABEL: &str = "framelane.dev/kueue";
/// The label that puts a Job into a LocalQueue.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// The resource each Job asks for one of, and the ClusterQueue has a quota of.
pub const SLOT: &str = "nvidia.com/gpu";
const FLAVOR: &str = "framelane-testenv";
const HOLD: &str = "framelane-testenv-hold";
const FIELD_MANAGER: &str = "framelane-testenv";

/// The running Kueue manager of this checkout.
#[derive(Debug)]
pub struct Kueue {
    /// Its process id (for its CPU time and memory).
    pub pid: u32,
}

static KUEUE: OnceLock<Result<Kueue, String>> = OnceLock::new();

impl TestEnv {
    /// Kueue on this control plane, built and started by `kueue.sh` on first use in this
    /// process (a running one is reused).
    pub fn kueue(&self) -> Result<&'static Kueue, Error> {
        KUEUE
            .get_or_init(|| {
                let script = self.root.join("tests/testenv/kueue.sh");
                let out = Command::new(&script)
                    .current_dir(&self.root)
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "{} exited with {} (its log: .testenv/logs/kueue.log):\n{}",
                        script.display(),
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let pid = std::fs::read_to_string(self.root.join(".testenv/kueue.pid"))
                    .map_err(|e| format!("reading .testenv/kueue.pid: {e}"))?;
                let pid = pid
                    .trim()
                    .parse()
                    .map_err(|e| format!(".testenv/kueue.pid: {e}"))?;
                Ok(Kueue { pid })
            })
            .as_ref()
            .map_err(|e| Error::Kueue(e.clone()))
    }
}

fn api(client: &Client, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", kind);
    let resource = ApiResource::from_gvk(&gvk);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

async fn apply(api: &Api<DynamicObject>, object: Value) -> Result<DynamicObject, Error> {
    let name = object["metadata"]["name"]
        .as_str()
        .expect("objects are applied by name")
        .to_string();
    let object: DynamicObject =
        serde_json::from_value(object).map_err(|e| Error::Wait(format!("{e}")))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(&object)).await?)
}

/// Whether `object` has the condition `type` with status True.
pub fn condition_true(object: &Value, type_: &str) -> bool {
    object["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
}

/// One ClusterQueue (named after the namespace) with a quota of `slots` [`SLOT`]s and one
/// LocalQueue `lane` in the namespace, which is opted into Kueue's Job webhooks. The
/// ClusterQueue is deleted when this is dropped.
pub struct KueueQueue {
    pub local_queue: String,
    cluster_queue: String,
    env: &'static TestEnv,
}

impl KueueQueue {
    pub async fn new(ns: &TestNamespace, slots: u32) -> Result<KueueQueue, Error> {
        let client = &ns.client;
        Api::<Namespace>::all(client.clone())
            .patch(
                &ns.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {NAMESPACE_LABEL: "enabled"}}})),
            )
            .await?;
        apply(
            &api(client, "ResourceFlavor", None),
            json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                "metadata": {"name": FLAVOR}, "spec": {}}),
        )
        .await?;
        // The check that holds every reserved Workload: no controller answers it, so it is
        // marked Active here, as its controller would.
        let checks = api(client, "AdmissionCheck", None);
        apply(
            &checks,
            json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "AdmissionCheck",
                "metadata": {"name": HOLD}, "spec": {"controllerName": "framelane.dev/hold"}}),
        )
        .await?;
        let now = serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
            .map_err(|e| Error::Wait(format!("{e}")))?;
        checks
            .patch_status(
                HOLD,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": [{"type": "Active",
                    "status": "True", "reason": "Active", "message": "held by framelane-testenv",
                    "lastTransitionTime": now}]}})),
            )
            .await?;
        let cluster_queue = ns.name.clone();
        let queues = api(client, "ClusterQueue", None);
        apply(
            &queues,
            json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
                "resourceGroups": [{"coveredResources": [SLOT], "flavors": [{"name": FLAVOR,
                    "resources": [{"name": SLOT, "nominalQuota": slots}]}]}],
                "admissionChecksStrategy": {"admissionChecks": [{"name": HOLD}]},
            }}),
        )
        .await?;
        let local = api(client, "LocalQueue", Some(&ns.name));
        let local_queue = "lane".to_string();
        apply(
            &local,
            json!({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                "metadata": {"name": local_queue, "namespace": ns.name},
                "spec": {"clusterQueue": cluster_queue}}),
        )
        .await?;
        let what = format!(
            "ClusterQueue {cluster_queue} and LocalQueue {local_queue} to be Active (is Kueue running? See .testenv/logs/kueue.log)"
        );
        eventually(60, &what, || async {
            let cq = queues.get(&cluster_queue).await?;
            let lq = local.get(&local_queue).await?;
            Ok(
                (condition_true(&cq.data, "Active") && condition_true(&lq.data, "Active"))
                    .then_some(()),
            )
        })
        .await
        .map_err(|e| Error::Wait(format!("{e:#}")))?;
        Ok(KueueQueue {
            local_queue,
            cluster_queue,
            env: ns.env,
        })
    }

    /// A suspended Job in this queue whose one pod asks for one [`SLOT`].
    pub fn job(&self, name: &str) -> Job {
        serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": {QUEUE_LABEL: self.local_queue}},
            "spec": {
                "suspend": true, "parallelism": 1, "completions": 1, "backoffLimit": 0,
                "template": {"spec": {"restartPolicy": "Never", "containers": [{
                    "name": "generate", "image": "framelane.dev/generate:none",
                    "resources": {"requests": {SLOT: "1"}, "limits": {SLOT: "1"}}}]}}
            }
        }))
        .expect("a Job")
    }
}

impl Drop for KueueQueue {
    fn drop(&mut self) {
        let _ = self
            .env
            .kubectl()
            .args([
                "delete",
                "clusterqueues.kueue.x-k8s.io",
                &self.cluster_queue,
                "--wait=false",
            ])
            .output();
    }
}

/// When a watch first saw each Job's Workload with `QuotaReserved`, by the Job's name.
pub type Reserved = Arc<Mutex<HashMap<String, Instant>>>;

/// A [`Reserved`] for the Workloads of `namespace`, kept current by a task (abort it when
/// done).
pub fn watch_reserved(client: &Client, namespace: &str) -> (Reserved, tokio::task::JoinHandle<()>) {
    let workloads = api(client, "Workload", Some(namespace));
    let reserved = Reserved::default();
    let seen = reserved.clone();
    let task = tokio::spawn(async move {
        let _ = watcher(workloads, watcher::Config::default())
            .applied_objects()
            .try_for_each(move |w: DynamicObject| {
                if condition_true(&w.data, "QuotaReserved")
                    && let Some(job) = w.owner_references().iter().find(|o| o.kind == "Job")
                {
                    seen.lock()
                        .unwrap()
                        .entry(job.name.clone())
                        .or_insert_with(Instant::now);
                }
                futures::future::ready(Ok(()))
            })
            .await;
    });
    (reserved, task)
}
