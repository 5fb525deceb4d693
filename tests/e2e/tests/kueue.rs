//! The peer `just bench` compares Framelane with (operator/benches/peers.rs) really works on
//! this control plane, so the comparison cannot silently measure a broken Kueue: Kueue, built
//! and started by tests/testenv/kueue.sh, reserves quota for a suspended Job in its
//! LocalQueue (the Job's Workload gets `QuotaReserved`) and holds a second Job back while
//! the ClusterQueue's one slot is taken, as it holds every Job beyond the quota in the
//! benchmark's queue.

use std::time::Duration;

use anyhow::Result;
use framelane_testenv::{
    TestEnv, eventually,
    kueue::{KueueQueue, condition_true, watch_reserved},
};
use k8s_openapi::api::batch::v1::Job;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams},
};

#[tokio::test]
async fn kueue_reserves_quota_for_a_job_and_holds_the_next_one_back() -> Result<()> {
    let env = TestEnv::get()?;
    env.kueue()?;
    let ns = env.namespace("kueue").await?;
    let queue = KueueQueue::new(&ns, 1).await?;
    let (reserved, watch) = watch_reserved(&ns.client, &ns.name);
    let jobs: Api<Job> = ns.api();

    jobs.create(&PostParams::default(), &queue.job("first"))
        .await?;
    eventually(
        60,
        "the first Job's Workload to get QuotaReserved",
        || async { Ok(reserved.lock().unwrap().contains_key("first").then_some(())) },
    )
    .await?;

    jobs.create(&PostParams::default(), &queue.job("second"))
        .await?;
    let workloads: Api<DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "kueue.x-k8s.io",
            "v1beta2",
            "Workload",
        )),
    );
    // Kueue made the second Job's Workload and found no quota left for it.
    let second = eventually(60, "a Workload for the second Job", || async {
        Ok(workloads
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|w| w.owner_references().iter().any(|o| o.name == "second")))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = workloads.get(&second.name_any()).await?;
    assert!(
        !condition_true(&second.data, "QuotaReserved"),
        "the second Job got quota beyond the ClusterQueue's one slot: {:?}",
        second.data["status"]
    );
    // The AdmissionCheck holds the reserved one: it stays suspended, so no pod runs.
    let first = jobs.get("first").await?;
    assert_eq!(
        first.spec.and_then(|s| s.suspend),
        Some(true),
        "a reserved Job must stay suspended behind the hold check"
    );
    watch.abort();
    Ok(())
}
