//! One object this version cannot read does not stop the operator: a VideoJob whose status a
//! newer Framelane wrote (a phase this version does not know, after a rollback) is left out
//! and counted, and every other job is still admitted, by a running operator and by one
//! that starts while the object is stored (with a typed watch, that operator's first list
//! failed on the job and it never admitted another: the test timed out on `after-restart`).
//!
//! This binary changes the VideoJob CRD for a moment (to store such an object), so it holds
//! this one test: cargo runs test binaries one after another.

mod support;

use anyhow::{Context, Result, ensure};
use framelane_api::{VideoJob, videojob::JobPhase};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSON,
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::{Fixture, eventually, phase, sample};

const CRD: &str = "videojobs.framelane.dev";

#[tokio::test]
async fn a_job_this_version_cannot_read_stops_no_admission() -> Result<()> {
    let fx = Fixture::new("unreadable").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(fx.client.clone());
    let original = crds.get(CRD).await?;
    // A later Framelane's CRD: one more phase.
    let mut newer = original.clone();
    let schema = newer.spec.versions[0]
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .context("the CRD has a schema")?;
    let status = schema
        .properties
        .as_mut()
        .and_then(|p| p.get_mut("status"))
        .and_then(|s| s.properties.as_mut())
        .and_then(|p| p.get_mut("phase"))
        .context("the CRD has status.phase")?;
    status
        .enum_
        .as_mut()
        .context("status.phase is an enum")?
        .push(JSON(json!("Paused")));
    crds.replace(CRD, &PostParams::default(), &newer).await?;
    let outcome = with_a_paused_job(&fx).await;
    // Put the CRD back whatever happened (the paused job is gone first).
    let _ = fx.jobs.delete("paused", &DeleteParams::default()).await;
    let mut current = crds.get(CRD).await?;
    current.spec = original.spec;
    crds.replace(CRD, &PostParams::default(), &current).await?;
    outcome
}

async fn with_a_paused_job(fx: &Fixture) -> Result<()> {
    let model = fx.model("anisora", 8, None).await?;
    fx.lane("anisora", &[&model], json!({})).await?;
    let mut op = fx.operator("op")?;
    op.until_leading().await?;
    let queued = |name: &'static str| async move {
        eventually(30, &format!("job {name} Queued"), || async {
            let job = fx.jobs.get(name).await?;
            Ok((phase(&job) == Some(JobPhase::Queued)).then_some(()))
        })
        .await
    };
    fx.create_job("before", &model).await?;
    queued("before").await?;

    fx.create_job("paused", &model).await?;
    let paused = json!({"status": {"phase": "Paused"}});
    // Untyped: the typed client could not read the job the API server returns.
    let untyped: Api<DynamicObject> = Api::namespaced_with(
        fx.client.clone(),
        &fx.ns.name,
        &ApiResource::erase::<VideoJob>(&()),
    );
    untyped
        .patch_status("paused", &PatchParams::default(), &Patch::Merge(&paused))
        .await
        .context("writing phase Paused as a newer version would")?;

    // The running operator: its watch sees the change.
    fx.create_job("while-running", &model).await?;
    queued("while-running").await?;
    // A new operator: its first list holds the paused job.
    op.kill();
    let op = fx.operator("op-2")?;
    op.until_leading().await?;
    fx.create_job("after-restart", &model).await?;
    queued("after-restart").await?;
    let metrics = op.metrics().await?;
    let left_out = sample(
        &metrics,
        "framelane_unreadable_objects_total{kind=\"VideoJob\"}",
    );
    ensure!(
        left_out.is_some_and(|n| n >= 1.0),
        "the new operator did not count the paused job as unreadable: {left_out:?}"
    );
    ensure!(
        op.log_text()
            .contains("left out an object this operator cannot read"),
        "no log line names the unreadable job:\n{}",
        op.log_text()
    );
    Ok(())
}
