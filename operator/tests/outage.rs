//! An API server outage in the middle of a run, on the real local control plane. Its own test
//! binary: stopping kube-apiserver would disrupt any test running beside it.

mod support;

use std::time::Duration;

use anyhow::Result;
use framelane_api::videojob::JobPhase;
use framelane_testenv::{TestEnv, stall::StallProxy};
use kube::{Api, Client, ResourceExt, api::DeleteParams};
use serde_json::json;
use support::{Behaviour, Fixture, OperatorProcess, Outage, SimRunner, eventually, phase, sample};

/// A runner cannot renew its heartbeat while the API server is down, and the operator cannot
/// see it: the job goes on once the API server is back, instead of being requeued as lost.
/// The runner's own connection comes back 8 s after the API server (its network, or its
/// client's backoff, slower than the operator's): within the lease duration the operator
/// gives runners after its view of them recovers. Judged by `renewTime` alone, the runner's
/// heartbeat looked a minute old at once and the job was requeued.
///
/// The restarted API server no longer holds the resourceVersions the operator's and the
/// runner's watches resume from: they expire (410 Gone) and list again. Two queued jobs are
/// deleted while the operator is still cut off, so it never sees their deletions as events:
/// the lane's count must still drop to what is really there.
#[tokio::test]
async fn an_api_server_outage_requeues_no_running_job_and_expired_watches_list_again() -> Result<()>
{
    let fx = Fixture::new("outage").await?;
    let model = fx.model("anisora", 90, None).await?;
    let lane = fx
        .lane("anisora", &[&model], json!({"queue": {"maxDepth": 3}}))
        .await?;
    // The operator and the runner each reach the API server through a proxy the test cuts.
    let name = format!("kubeconfig-{}-operator", fx.ns.name);
    let (op_gate, op_kubeconfig) = StallProxy::start(&fx.ns.env.kubeconfig, &name)?;
    let op_kubeconfig = op_kubeconfig.display().to_string();
    // The leader keeps leading through the outage (it gives up after 2/3 of its Lease), so
    // what is tested is how it judges runners after its own view of them was cut off.
    let op = OperatorProcess::start(
        &fx.ns,
        "op",
        &[
            "--kubeconfig",
            &op_kubeconfig,
            "--leader-lease-seconds",
            "300",
        ],
    )?;
    let name = format!("kubeconfig-{}-runner", fx.ns.name);
    let (gate, _) = StallProxy::start(&fx.ns.env.kubeconfig, &name)?;
    let mut config = TestEnv::get()?.config().await?;
    config.cluster_url = format!("https://127.0.0.1:{}", gate.port).parse()?;
    let gated = Client::try_from(config)?;
    let runner = SimRunner::start(
        gated.clone(),
        &fx.ns.name,
        "runner",
        &lane,
        Api::namespaced(gated, &fx.ns.name),
        Behaviour {
            steps: 90,
            step_time: Duration::from_secs(1),
            permits: None,
        },
    );
    fx.create_job("long", &model).await?;
    eventually(60, "the job to be Running past step 3", || async {
        let job = fx.jobs.get("long").await?;
        let step = job
            .status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .map_or(0, |p| p.step);
        Ok((phase(&job) == Some(JobPhase::Running) && step >= 3).then_some(()))
    })
    .await?;
    for name in QUEUED {
        fx.create_job(name, &model).await?;
    }
    eventually(30, "the lane to count 3 jobs", || async {
        Ok((fx.lane_status(&lane).await?.queue_depth == 3).then_some(()))
    })
    .await?;

    op_gate.cut();
    gate.cut();
    let mut outage = Outage::begin("kube-apiserver").await?;
    tokio::time::sleep(Duration::from_secs(60)).await;
    outage.end().await?;
    for name in QUEUED {
        fx.jobs.delete(name, &DeleteParams::default()).await?;
    }
    op_gate.restore();
    tokio::time::sleep(Duration::from_secs(8)).await;
    gate.restore();

    let finished = eventually(120, "the job to finish", || async {
        let job = fx.jobs.get("long").await?;
        Ok(matches!(phase(&job), Some(JobPhase::Succeeded | JobPhase::Failed)).then_some(job))
    })
    .await;
    let job = match finished {
        Ok(job) => job,
        Err(e) => {
            let status = fx.jobs.get("long").await?.status;
            let log = op.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            anyhow::bail!(
                "{e}; the job's status: {status:?}\noperator log, newest first:\n{}",
                tail.join("\n")
            );
        }
    };
    let status = job.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(JobPhase::Succeeded), "{status:?}");
    assert_eq!(status.attempts, Some(1), "{status:?}");
    let log = op.log_text();
    assert!(!log.contains("job requeued"), "operator log:\n{log}");
    let events = fx
        .ns
        .kubectl()
        .args([
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=long",
        ])
        .args(["-o", "custom-columns=REASON:.reason"])
        .output()?;
    let reasons = String::from_utf8(events.stdout)?;
    for refused in ["RunnerLost", "QueueWaitTimeout"] {
        assert!(
            !reasons.contains(refused),
            "{refused} in the job's Events:\n{reasons}"
        );
    }

    // Both watches expired and were listed again, and an admin sees it.
    for kind in ["VideoJob", "Lease"] {
        let series = format!("framelane_watch_errors_total{{kind=\"{kind}\",cause=\"expired\"}}");
        eventually(60, &series, || async {
            Ok(sample(&op.metrics().await?, &series)
                .is_some_and(|n| n >= 1.0)
                .then_some(()))
        })
        .await?;
    }
    eventually(60, "the runner's watch to expire", || async {
        Ok((runner.watch_expiries() >= 1).then_some(()))
    })
    .await?;
    // The lane counts what is there: the deleted jobs' slots are free, so three new jobs
    // are all admitted (with the two still counted, two of them would fail QueueOverloaded).
    eventually(120, "the lane to count no job", || async {
        Ok((fx.lane_status(&lane).await?.queue_depth == 0).then_some(()))
    })
    .await?;
    for name in AFTER {
        fx.create_job(name, &model).await?;
    }
    eventually(30, "the new jobs to be admitted", || async {
        let jobs = fx.list_jobs().await?;
        let admitted = jobs
            .iter()
            .filter(|j| AFTER.contains(&j.name_any().as_str()))
            .filter(|j| matches!(phase(j), Some(JobPhase::Queued | JobPhase::Running)))
            .count();
        let failed: Vec<_> = jobs
            .iter()
            .filter(|j| phase(j) == Some(JobPhase::Failed))
            .map(|j| (j.name_any(), j.status.clone()))
            .collect();
        anyhow::ensure!(failed.is_empty(), "failed: {failed:?}");
        Ok((admitted == AFTER.len()).then_some(()))
    })
    .await?;
    Ok(())
}

const QUEUED: [&str; 2] = ["queued-0", "queued-1"];
const AFTER: [&str; 3] = ["after-0", "after-1", "after-2"];
