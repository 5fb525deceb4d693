//! An API server outage in the middle of a run, on the real local control plane. Its own test
//! binary: stopping kube-apiserver would disrupt any test running beside it.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use framelane_api::videojob::JobPhase;
use framelane_testenv::TestEnv;
use kube::{Api, Client};
use support::{Behaviour, Fixture, OperatorProcess, Outage, SimRunner, eventually, phase};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Forwards TCP connections to `upstream` while open; closing it drops every connection and
/// refuses new ones, as a network partition would.
struct Gate {
    port: u16,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start(upstream: String) -> Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (open, opened) = watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut state = opened.clone();
                if !*state.borrow() {
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = state.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Gate { port, open, task })
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A runner cannot renew its heartbeat while the API server is down, and the operator cannot
/// see it: the job goes on once the API server is back, instead of being requeued as lost.
/// The runner's own connection comes back 8 s after the API server (its network, or its
/// client's backoff, slower than the operator's): within the lease duration the operator
/// gives runners after its view of them recovers. Judged by `renewTime` alone, the runner's
/// heartbeat looked a minute old at once and the job was requeued.
#[tokio::test]
async fn an_api_server_outage_does_not_requeue_running_jobs() -> Result<()> {
    let fx = Fixture::new("outage").await?;
    let model = fx.model("anisora", 90, None).await?;
    let lane = fx.lane("anisora", &[&model], serde_json::json!({})).await?;
    // The leader keeps leading through the outage (it gives up after 2/3 of its Lease), so
    // what is tested is how it judges runners after its own view of them was cut off.
    let op = OperatorProcess::start(&fx.ns, "op", &["--leader-lease-seconds", "300"])?;
    let mut config = TestEnv::get()?.config().await?;
    let upstream = config
        .cluster_url
        .authority()
        .context("the kubeconfig names the API server's address")?
        .to_string();
    let gate = Gate::start(upstream).await?;
    config.cluster_url = format!("https://127.0.0.1:{}", gate.port).parse()?;
    let gated = Client::try_from(config)?;
    let _runner = SimRunner::start(
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

    gate.set_open(false);
    let mut outage = Outage::begin("kube-apiserver").await?;
    tokio::time::sleep(Duration::from_secs(60)).await;
    outage.end().await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    gate.set_open(true);

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
    Ok(())
}
