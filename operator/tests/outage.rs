//! An API server outage in the middle of a run, on the real local control plane. Its own test
//! binary: stopping kube-apiserver would disrupt any test running beside it.

mod support;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Result, ensure};
use framelane_api::videojob::JobPhase;
use support::{Behaviour, Fixture, OperatorProcess, eventually, phase};

/// Stops this checkout's kube-apiserver (tests/testenv/apiserver.sh); starts it again when
/// ended or dropped, so a failing test leaves the control plane up for the next one.
struct Outage {
    stopped: bool,
}

impl Outage {
    fn begin() -> Result<Outage> {
        apiserver("stop")?;
        Ok(Outage { stopped: true })
    }

    fn end(&mut self) -> Result<()> {
        self.stopped = false;
        apiserver("start")
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.stopped {
            let _ = apiserver("start");
        }
    }
}

fn apiserver(action: &str) -> Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/testenv/apiserver.sh");
    let status = Command::new(script).arg(action).status()?;
    ensure!(
        status.success(),
        "tests/testenv/apiserver.sh {action}: {status}"
    );
    Ok(())
}

/// A runner cannot renew its heartbeat while the API server is down, and the operator cannot
/// see it: the job goes on once the API server is back, instead of being requeued as lost.
#[tokio::test]
async fn an_api_server_outage_does_not_requeue_running_jobs() -> Result<()> {
    let fx = Fixture::new("outage").await?;
    let model = fx.model("anisora", 90, None).await?;
    let lane = fx.lane("anisora", &[&model], serde_json::json!({})).await?;
    // The leader keeps leading through the outage (it gives up after 2/3 of its Lease), so
    // what is tested is how it judges runners after its own view of them was cut off.
    let op = OperatorProcess::start(&fx.ns, "op", &["--leader-lease-seconds", "300"])?;
    let _runner = fx.runner(
        "runner",
        &lane,
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

    let mut outage = Outage::begin()?;
    tokio::time::sleep(Duration::from_secs(60)).await;
    outage.end()?;

    let job = eventually(120, "the job to finish", || async {
        let job = fx.jobs.get("long").await?;
        Ok(matches!(phase(&job), Some(JobPhase::Succeeded | JobPhase::Failed)).then_some(job))
    })
    .await?;
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
    Ok(())
}
