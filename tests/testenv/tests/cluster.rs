//! The local control plane behaves like a cluster: the scheduler binds GPU pods to the fake
//! GPU nodes and kwok runs them, GPU capacity and ResourceQuota refuse pods the way Framelane's
//! fallback expects, and kube-controller-manager garbage-collects owned objects.

use anyhow::{Context, Result, bail, ensure};
use framelane_testenv::{TestEnv, eventually};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Node, Pod, ResourceQuota},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

fn gpu_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "gpu-test"}},
        "spec": {"containers": [{"name": "runner", "image": "framelane-runner:test",
            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
    }))?)
}

#[tokio::test]
async fn two_fake_gpu_nodes_are_ready() -> Result<()> {
    let env = TestEnv::get()?;
    let nodes: Api<Node> = Api::all(env.client().await?);
    let gpu_nodes: Vec<Node> = nodes
        .list(&ListParams::default().labels("nvidia.com/gpu.present=true"))
        .await?
        .items;
    ensure!(
        gpu_nodes.len() == 2,
        "expected 2 fake GPU nodes, found {}",
        gpu_nodes.len()
    );
    for node in gpu_nodes {
        let status = node.status.clone().context("node status")?;
        let gpus = status
            .allocatable
            .unwrap_or_default()
            .get("nvidia.com/gpu")
            .cloned();
        ensure!(
            gpus.map(|q| q.0) == Some("1".into()),
            "{} does not offer nvidia.com/gpu: 1",
            node.name_any()
        );
        let ready = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ensure!(ready, "{} is not Ready", node.name_any());
    }
    Ok(())
}

/// The capacity signal for fallback: with one GPU per node, the third GPU pod cannot be
/// scheduled. This test holds both GPUs while it runs and frees them at the end.
#[tokio::test]
async fn gpu_pods_run_on_fake_nodes_until_gpus_run_out() -> Result<()> {
    let env = TestEnv::get()?;
    // A GPU pod left by an interrupted earlier run would hold a GPU and change the outcome.
    let everywhere: Api<Pod> = Api::all(env.client().await?);
    let leftovers = ListParams::default().labels("app=gpu-test");
    for pod in everywhere.list(&leftovers).await?.items {
        let api: Api<Pod> =
            Api::namespaced(env.client().await?, &pod.namespace().unwrap_or_default());
        api.delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
            .await?;
    }
    eventually(60, "leftover GPU pods gone", || async {
        Ok(everywhere
            .list(&leftovers)
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let ns = env.namespace("gpu").await?;
    let pods: Api<Pod> = ns.api();
    for name in ["gpu-a", "gpu-b"] {
        pods.create(&PostParams::default(), &gpu_pod(name)?).await?;
    }
    for name in ["gpu-a", "gpu-b"] {
        eventually(60, &format!("{name} Running and Ready"), || async {
            let pod = pods.get(name).await?;
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok((status.phase.as_deref() == Some("Running") && ready).then_some(()))
        })
        .await?;
    }
    let a = pods.get("gpu-a").await?.spec.and_then(|s| s.node_name);
    let b = pods.get("gpu-b").await?.spec.and_then(|s| s.node_name);
    ensure!(
        a.is_some() && a != b,
        "each GPU pod must get its own GPU node: {a:?} {b:?}"
    );

    pods.create(&PostParams::default(), &gpu_pod("gpu-c")?)
        .await?;
    let message = eventually(60, "gpu-c Unschedulable", || async {
        let pod = pods.get("gpu-c").await?;
        let status = pod.status.unwrap_or_default();
        let cond = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled");
        Ok(cond
            .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
            .map(|c| (status.phase, c.message.unwrap_or_default())))
    })
    .await?;
    ensure!(
        message.0.as_deref() == Some("Pending"),
        "gpu-c should stay Pending, is {:?}",
        message.0
    );
    ensure!(
        message.1.contains("Insufficient nvidia.com/gpu"),
        "unexpected scheduler message: {}",
        message.1
    );

    pods.delete_collection(
        &DeleteParams::default().grace_period(0),
        &ListParams::default(),
    )
    .await?;
    eventually(60, "GPU pods gone", || async {
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    Ok(())
}

/// The quota signal for fallback: a ResourceQuota without GPUs refuses the pod at creation.
#[tokio::test]
async fn resource_quota_refuses_gpu_pods() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("quota").await?;
    let quotas: Api<ResourceQuota> = ns.api();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-gpus"},
        "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;
    // The quota controller must fill in status.hard before admission enforces the quota.
    eventually(30, "quota status", || async {
        Ok(quotas
            .get("no-gpus")
            .await?
            .status
            .and_then(|s| s.hard)
            .map(|_| ()))
    })
    .await?;
    let pods: Api<Pod> = ns.api();
    match pods
        .create(&PostParams::default(), &gpu_pod("refused")?)
        .await
    {
        Ok(_) => bail!("a GPU pod was created despite a quota of 0 GPUs"),
        Err(kube::Error::Api(s)) => {
            ensure!(
                s.code == 403,
                "expected 403 Forbidden, got {}: {}",
                s.code,
                s.message
            );
            ensure!(
                s.message.contains("exceeded quota: no-gpus"),
                "unexpected message: {}",
                s.message
            );
            ensure!(
                s.message.contains("requests.nvidia.com/gpu"),
                "message does not name the resource: {}",
                s.message
            );
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Deleting an owner removes what it owns: the mechanism that removes a ModelLane's runner
/// pods with the lane.
#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_pods() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("gc").await?;
    let sets: Api<ReplicaSet> = ns.api();
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "owner"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "owned"}},
            "template": {"metadata": {"labels": {"app": "owned"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
    }))?;
    sets.create(&PostParams::default(), &rs).await?;
    let pods: Api<Pod> = ns.api();
    let owned = ListParams::default().labels("app=owned");
    eventually(60, "2 owned pods", || async {
        let items = pods.list(&owned).await?.items;
        let all_owned = items
            .iter()
            .all(|p| p.owner_references().iter().any(|o| o.name == "owner"));
        Ok((items.len() == 2 && all_owned).then_some(()))
    })
    .await?;
    sets.delete("owner", &DeleteParams::background()).await?;
    eventually(60, "owned pods garbage-collected", || async {
        Ok(pods.list(&owned).await?.items.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
