//! The controller on the real local control plane, with tests playing runners through the
//! runner contract: dedicated lanes, FIFO queues with exact positions and depth, lost
//! runners, leader failover, cancellation, lane pods, and queue-wait timeouts.

mod support;

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use framelane_api::{
    ModelLane, VideoJob, VideoModel,
    modellane::LanePhase,
    reasons::JobReason,
    videojob::JobPhase,
    wellknown::{ALLOC_CONF_DEFAULT, ALLOC_CONF_ENV, ANNOTATION_LOADED_MODEL, LABEL_LANE},
};
use framelane_contract::Runner;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    scheduling::v1::PriorityClass,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::{Behaviour, Fixture, OperatorProcess, count_phases, eventually, phase};
use tokio::sync::{Semaphore, watch};

async fn all_in_phase(fx: &Fixture, n: usize, want: JobPhase, secs: u64) -> Result<Vec<VideoJob>> {
    eventually(secs, &format!("{n} jobs {want:?}"), || async {
        let jobs = fx.list_jobs().await?;
        Ok((jobs.len() == n && jobs.iter().all(|j| phase(j) == Some(want))).then_some(jobs))
    })
    .await
    .with_context(|| "phases at timeout".to_string())
}

#[tokio::test]
async fn dedicated_lanes_keep_their_models_warm_and_to_themselves() -> Result<()> {
    let fx = Fixture::new("dedicated").await?;
    let anisora = fx.model("anisora", 8, None).await?;
    let phr00t = fx.model("phr00t", 4, Some(1.0)).await?;
    let anisora_lane = fx.lane("anisora", &[&anisora], json!({})).await?;
    let phr00t_lane = fx.lane("phr00t", &[&phr00t], json!({})).await?;
    let _op = fx.operator("op")?;
    let a = fx.runner("runner-anisora", &anisora_lane, Behaviour::default());
    let p = fx.runner("runner-phr00t", &phr00t_lane, Behaviour::default());

    for i in 0..4 {
        fx.create_job(&format!("consecutive-{i}"), &anisora).await?;
    }
    let jobs = all_in_phase(&fx, 4, JobPhase::Succeeded, 60).await?;
    for job in &jobs {
        let s = job.status.as_ref().unwrap();
        assert_eq!(s.lane.as_deref(), Some(anisora_lane.as_str()));
        assert_eq!(s.runner.as_deref(), Some("runner-anisora"));
    }
    assert_eq!(
        a.loads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "consecutive anisora jobs reload the model"
    );

    for i in 0..6 {
        let model = if i % 2 == 0 { &anisora } else { &phr00t };
        fx.create_job(&format!("alternating-{i}"), model).await?;
    }
    let jobs = all_in_phase(&fx, 10, JobPhase::Succeeded, 60).await?;
    for job in jobs
        .iter()
        .filter(|j| j.name_any().starts_with("alternating"))
    {
        let s = job.status.as_ref().unwrap();
        let (lane, runner) = if job.spec.model == anisora {
            (&anisora_lane, "runner-anisora")
        } else {
            (&phr00t_lane, "runner-phr00t")
        };
        assert_eq!(
            s.lane.as_ref(),
            Some(lane),
            "{} ran on the wrong lane",
            job.name_any()
        );
        assert_eq!(s.runner.as_deref(), Some(runner));
        assert_eq!(s.attempts, Some(1));
        let output = s.output.as_ref().context("output")?;
        assert_eq!(
            output.path,
            format!("{}/{}/video.mp4", fx.ns.name, job.name_any())
        );
    }
    assert_eq!(a.loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(p.loads.load(std::sync::atomic::Ordering::SeqCst), 1);

    // What a user sees.
    let out = fx
        .ns
        .kubectl()
        .args(["get", "vj", "alternating-1"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        [
            "alternating-1",
            phr00t.as_str(),
            "Succeeded",
            phr00t_lane.as_str(),
            "100"
        ],
        "{text}"
    );
    // Events are posted off the reconcile path: wait for the last of them.
    let describe = || async {
        let out = fx
            .ns
            .kubectl()
            .args(["describe", "vj", "alternating-1"])
            .output()?;
        Ok::<_, anyhow::Error>(String::from_utf8(out.stdout)?)
    };
    eventually(30, "the job's Completed Event", || async {
        Ok(describe().await?.contains("Completed").then_some(()))
    })
    .await?;
    let text = describe().await?;
    for expected in [
        "Admitted ".to_string(),
        format!("admitted to lane {phr00t_lane}"),
        "Started ".to_string(),
        format!("in lane {phr00t_lane}"),
        "Completed ".to_string(),
        "alternating-1/video.mp4".to_string(),
    ] {
        assert!(text.contains(&expected), "no {expected:?} in:\n{text}");
    }
    Ok(())
}

/// Checks, at a quiet moment, that each lane's queued jobs have positions 1..n in admission
/// order and that the lane's queueDepth counts its unfinished jobs.
async fn positions_settle(fx: &Fixture, lanes: &[String]) -> Result<()> {
    eventually(60, "positions and depth to settle", || async {
        let jobs = fx.list_jobs().await?;
        for lane in lanes {
            let mut queued: Vec<&VideoJob> = jobs
                .iter()
                .filter(|j| {
                    j.status.as_ref().and_then(|s| s.lane.as_ref()) == Some(lane)
                        && phase(j) == Some(JobPhase::Queued)
                })
                .collect();
            queued.sort_by_key(|j| framelane_core::claims::queue_key(j));
            let positions: Vec<Option<i32>> = queued
                .iter()
                .map(|j| j.status.as_ref().unwrap().queue_position)
                .collect();
            let want: Vec<Option<i32>> = (1..=queued.len() as i32).map(Some).collect();
            let unfinished = jobs
                .iter()
                .filter(|j| j.status.as_ref().and_then(|s| s.lane.as_ref()) == Some(lane))
                .filter(|j| matches!(phase(j), Some(JobPhase::Queued | JobPhase::Running)))
                .count() as i32;
            if positions != want || fx.lane_status(lane).await?.queue_depth != unfinished {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

#[tokio::test]
async fn a_hundred_jobs_run_once_each_in_fifo_order_with_exact_positions() -> Result<()> {
    let fx = Fixture::new("fifo").await?;
    let anisora = fx.model("anisora", 8, None).await?;
    let phr00t = fx.model("phr00t", 4, Some(1.0)).await?;
    let lanes = vec![
        fx.lane("anisora", &[&anisora], json!({})).await?,
        fx.lane("phr00t", &[&phr00t], json!({})).await?,
    ];
    let _op = fx.operator("op")?;
    let gates: Vec<Arc<Semaphore>> = (0..2).map(|_| Arc::new(Semaphore::new(0))).collect();
    let runners: Vec<_> = (0..4)
        .map(|i| {
            let behaviour = Behaviour {
                permits: Some(gates[i % 2].clone()),
                ..Default::default()
            };
            fx.runner(&format!("runner-{i}"), &lanes[i % 2], behaviour)
        })
        .collect();

    for i in 0..100 {
        fx.create_job(
            &format!("job-{i:03}"),
            if i % 2 == 0 { &anisora } else { &phr00t },
        )
        .await?;
    }
    all_in_phase(&fx, 100, JobPhase::Queued, 60).await?;
    positions_settle(&fx, &lanes).await?;

    for batch in 1..=5 {
        for gate in &gates {
            gate.add_permits(10);
        }
        eventually(60, &format!("batch {batch} done"), || async {
            let jobs = fx.list_jobs().await?;
            let done = jobs
                .iter()
                .filter(|j| phase(j) == Some(JobPhase::Succeeded))
                .count();
            let running = jobs
                .iter()
                .filter(|j| phase(j) == Some(JobPhase::Running))
                .count();
            Ok((done == batch * 20 && running == 0).then_some(()))
        })
        .await?;
        positions_settle(&fx, &lanes)
            .await
            .with_context(|| format!("after batch {batch}"))?;
    }

    let jobs = fx.list_jobs().await?;
    let mut runs: HashMap<String, usize> = HashMap::new();
    for runner in &runners {
        for (job, _) in runner.log.lock().unwrap().iter() {
            *runs.entry(job.clone()).or_default() += 1;
        }
    }
    ensure!(
        runs.len() == 100 && runs.values().all(|n| *n == 1),
        "not every job ran exactly once: {runs:?}"
    );
    for lane in &lanes {
        let mut in_lane: Vec<&VideoJob> = jobs
            .iter()
            .filter(|j| j.status.as_ref().unwrap().lane.as_ref() == Some(lane))
            .collect();
        assert_eq!(in_lane.len(), 50);
        in_lane.sort_by_key(|j| j.status.as_ref().unwrap().started_at.clone().unwrap().0);
        let by_start: Vec<String> = in_lane.iter().map(|j| j.name_any()).collect();
        in_lane.sort_by_key(|j| framelane_core::claims::queue_key(j));
        let by_queue: Vec<String> = in_lane.iter().map(|j| j.name_any()).collect();
        assert_eq!(
            by_start, by_queue,
            "lane {lane} did not start its jobs in FIFO order"
        );
        let mut by_creation = by_queue.clone();
        by_creation.sort();
        assert_eq!(
            by_queue, by_creation,
            "lane {lane} did not queue its jobs in the order they were created"
        );
    }
    assert!(
        jobs.iter()
            .all(|j| j.status.as_ref().unwrap().attempts == Some(1))
    );
    Ok(())
}

#[tokio::test]
async fn a_runner_killed_mid_job_loses_it_to_another_runner() -> Result<()> {
    let fx = Fixture::new("lost").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let slow = Behaviour {
        steps: 60,
        step_time: Duration::from_millis(500),
        permits: None,
    };
    let first = fx.runner("runner-first", &lane, slow);
    fx.create_job("survivor", &model).await?;
    eventually(30, "runner-first running the job", || async {
        let job = fx.jobs.get("survivor").await?;
        Ok(
            (job.status.as_ref().and_then(|s| s.runner.as_deref()) == Some("runner-first"))
                .then_some(()),
        )
    })
    .await?;
    first.kill();
    let _second = fx.runner("runner-second", &lane, Behaviour::default());
    let done = eventually(60, "the job to finish on runner-second", || async {
        let job = fx.jobs.get("survivor").await?;
        Ok((phase(&job) == Some(JobPhase::Succeeded)).then_some(job))
    })
    .await?;
    let status = done.status.unwrap();
    assert_eq!(status.runner.as_deref(), Some("runner-second"));
    assert_eq!(
        status.attempts,
        Some(2),
        "the lost run counts as an attempt"
    );
    let out = fx
        .ns
        .kubectl()
        .args(["describe", "vj", "survivor"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("RunnerLost")
            && text.contains("runner runner-first stopped sending heartbeats"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_mid_run_loses_no_job_and_runs_none_twice() -> Result<()> {
    let fx = Fixture::new("failover").await?;
    let anisora = fx.model("anisora", 8, None).await?;
    let phr00t = fx.model("phr00t", 4, Some(1.0)).await?;
    let lanes = [
        fx.lane("anisora", &[&anisora], json!({})).await?,
        fx.lane("phr00t", &[&phr00t], json!({})).await?,
    ];
    let mut ops = [fx.operator("op-a")?, fx.operator("op-b")?];
    let leases: Api<Lease> = fx.ns.api();
    let leader = eventually(30, "a leader", || async {
        let lease = leases.get_opt("framelane-operator").await?;
        Ok(lease.and_then(|l| l.spec.and_then(|s| s.holder_identity)))
    })
    .await?;
    let runners: Vec<_> = (0..4)
        .map(|i| fx.runner(&format!("runner-{i}"), &lanes[i % 2], Behaviour::default()))
        .collect();

    let create = |range: std::ops::Range<usize>| {
        let fx = &fx;
        let (anisora, phr00t) = (&anisora, &phr00t);
        async move {
            for chunk in range.collect::<Vec<_>>().chunks(10) {
                let creates = chunk.iter().map(|i| {
                    fx.create_job(
                        format!("job-{i:03}"),
                        if i % 2 == 0 { anisora } else { phr00t },
                    )
                });
                for r in futures::future::join_all(creates).await {
                    r?;
                }
            }
            anyhow::Ok(())
        }
    };
    create(0..100).await?;
    eventually(60, "a quarter of the jobs done", || async {
        Ok((fx
            .list_jobs()
            .await?
            .iter()
            .filter(|j| phase(j) == Some(JobPhase::Succeeded))
            .count()
            >= 50)
            .then_some(()))
    })
    .await?;
    let killed_at = tokio::time::Instant::now();
    let index = if leader == "op-a" { 0 } else { 1 };
    ops[index].kill();
    create(100..200).await?;
    let standby = if leader == "op-a" { "op-b" } else { "op-a" };
    eventually(20, "the standby to take over", || async {
        let lease = leases.get("framelane-operator").await?;
        Ok((lease.spec.and_then(|s| s.holder_identity).as_deref() == Some(standby)).then_some(()))
    })
    .await?;
    let takeover = killed_at.elapsed();
    ensure!(
        takeover < Duration::from_secs(15),
        "standby took {takeover:?} to take over"
    );

    let jobs = all_in_phase(&fx, 200, JobPhase::Succeeded, 180)
        .await
        .with_context(|| "after failover")?;
    let mut runs: HashMap<String, usize> = HashMap::new();
    for runner in &runners {
        for (job, _) in runner.log.lock().unwrap().iter() {
            *runs.entry(job.clone()).or_default() += 1;
        }
    }
    ensure!(
        runs.len() == 200 && runs.values().all(|n| *n == 1),
        "jobs lost or run twice: {} distinct",
        runs.len()
    );
    assert!(
        jobs.iter()
            .all(|j| j.status.as_ref().unwrap().attempts == Some(1)),
        "{:?}",
        count_phases(&jobs)
    );
    let survivor = &ops[1 - index];
    assert!(
        support::sample(&survivor.metrics().await?, "framelane_leader") == Some(1.0),
        "the standby does not report itself as leader"
    );
    Ok(())
}

#[tokio::test]
async fn deleting_queued_and_running_jobs_cancels_them_and_frees_their_slots() -> Result<()> {
    let fx = Fixture::new("cancel").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let op = fx.operator("op")?;
    let slow = Behaviour {
        steps: 100,
        step_time: Duration::from_millis(200),
        permits: None,
    };
    let runner = fx.runner("runner", &lane, slow);
    for name in ["first", "second", "third"] {
        fx.create_job(name, &model).await?;
    }
    // One job runs (the runner holds it, with the finalizer), two wait.
    let (running, mut queued) = eventually(30, "one job running, two queued, depth 3", || async {
        let jobs = fx.list_jobs().await?;
        let running: Vec<&VideoJob> = jobs
            .iter()
            .filter(|j| phase(j) == Some(JobPhase::Running) && !j.finalizers().is_empty())
            .collect();
        let mut queued: Vec<&VideoJob> = jobs
            .iter()
            .filter(|j| phase(j) == Some(JobPhase::Queued))
            .collect();
        queued.sort_by_key(|j| framelane_core::claims::queue_key(j));
        let depth = fx.lane_status(&lane).await?.queue_depth;
        Ok(
            (running.len() == 1 && queued.len() == 2 && depth == 3).then(|| {
                (
                    running[0].name_any(),
                    queued.iter().map(|j| j.name_any()).collect::<Vec<_>>(),
                )
            }),
        )
    })
    .await?;

    let last = queued.pop().expect("two queued");
    fx.jobs.delete(&last, &DeleteParams::default()).await?;
    eventually(10, "the queued job gone and its slot free", || async {
        let gone = fx.jobs.get_opt(&last).await?.is_none();
        Ok((gone && fx.lane_status(&lane).await?.queue_depth == 2).then_some(()))
    })
    .await?;
    // Gone at once (no finalizer), it is still told: an Event and the finished counter.
    let cancelled = "framelane_jobs_finished_total{phase=\"Failed\",reason=\"Cancelled\"}";
    eventually(10, "the queued job's Cancelled Event and count", || async {
        let events =
            support::events_about(&fx.client, "VideoJob", Some(&fx.ns.name), &last).await?;
        let told = events.iter().any(|(reason, note)| {
            reason == "Cancelled" && note == "deleted while queued; it left the queue"
        });
        let counted = support::sample(&op.metrics().await?, cancelled) == Some(1.0);
        Ok((told && counted).then_some(()))
    })
    .await?;

    fx.jobs.delete(&running, &DeleteParams::default()).await?;
    let next = queued.pop().expect("one left");
    eventually(
        20,
        "the running job stopped and gone, the next one running",
        || async {
            let gone = fx.jobs.get_opt(&running).await?.is_none();
            let next = fx.jobs.get(&next).await?;
            Ok((gone && phase(&next) == Some(JobPhase::Running)).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        runner.cancelled.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the runner did not stop the deleted job"
    );
    eventually(10, "depth 1", || async {
        Ok((fx.lane_status(&lane).await?.queue_depth == 1).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn lane_pods_carry_the_gpu_and_allocator_setting_and_go_with_the_lane() -> Result<()> {
    let fx = Fixture::new("pods").await?;
    // The runner pods' namespace enforces the `restricted` Pod Security Standard, and the
    // runners have their own ServiceAccount.
    Api::<Namespace>::all(fx.client.clone())
        .patch(
            &fx.ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"}}})),
        )
        .await?;
    let pods: Api<Pod> = fx.ns.api();
    let root: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "root"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}))?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match pods.create(&dry_run, &root).await {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("restricted") => {}
        other => anyhow::bail!("the namespace does not enforce restricted: {other:?}"),
    }
    let account: ServiceAccount = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}}),
    )?;
    fx.ns
        .api::<ServiceAccount>()
        .create(&PostParams::default(), &account)
        .await?;
    let model = fx.model("anisora", 8, None).await?;
    // A lane that asks for a GPU (its own runner spec) and one that overrides the allocator.
    let gpu_lane = fx
        .lane(
            "gpu",
            &[&model],
            json!({"runner": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}),
        )
        .await?;
    let override_lane = fx
        .lane("override", &[&model], json!({"runner": {"env": [{"name": ALLOC_CONF_ENV, "value": "backend:cudaMallocAsync"}]}}))
        .await?;
    let op = OperatorProcess::start(&fx.ns, "op", &["--runner-service-account", "runner"])?;
    let pod = eventually(30, "the GPU lane's pod Running", || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_LANE}={gpu_lane}")))
            .await?
            .items;
        Ok(list
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await?;
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let env: Vec<(String, Option<String>)> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    assert!(
        env.contains(&(ALLOC_CONF_ENV.into(), Some(ALLOC_CONF_DEFAULT.into()))),
        "{env:?}"
    );
    let limits = container.resources.clone().unwrap().limits.unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    // The chart's PodMonitor scrapes the container port named `metrics`.
    let ports: Vec<(Option<String>, i32)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.container_port))
        .collect();
    assert_eq!(ports, [(Some("metrics".to_string()), 8080)]);
    assert_eq!(pod.labels()["framelane.dev/model"], model);
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("runner"));
    let security = spec.security_context.clone().unwrap();
    assert_eq!(
        (
            security.run_as_non_root,
            security.run_as_user,
            security.run_as_group,
            security.fs_group
        ),
        (Some(true), Some(65532), Some(65532), Some(65532))
    );
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let restricted = container.security_context.clone().unwrap();
    assert_eq!(restricted.allow_privilege_escalation, Some(false));
    assert_eq!(restricted.read_only_root_filesystem, Some(true));
    assert_eq!(
        restricted.capabilities.unwrap().drop,
        Some(vec!["ALL".into()])
    );
    let tmp = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/tmp")
        .context("a /tmp mount")?;
    assert!(
        spec.volumes
            .iter()
            .flatten()
            .any(|v| v.name == tmp.name && v.empty_dir.is_some()),
        "{:?}",
        spec.volumes
    );
    let uid_from = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_UID")
        .and_then(|e| e.value_from.clone()?.field_ref)
        .context("POD_UID from the downward API")?;
    assert_eq!(uid_from.field_path, "metadata.uid");
    assert!(
        pod.spec
            .as_ref()
            .unwrap()
            .node_name
            .as_deref()
            .unwrap_or_default()
            .starts_with("gpu-node-")
    );

    // A runner pod that dies is replaced.
    let replacement = || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_LANE}={gpu_lane}")))
            .await?
            .items;
        Ok(list
            .into_iter()
            .find(|p| p.uid() != pod.uid() && p.metadata.deletion_timestamp.is_none()))
    };
    pods.delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
        .await?;
    let pod = eventually(30, "a replacement pod", replacement).await?;
    // So is one that fails without being deleted (evicted: it never runs again under
    // restartPolicy Always, and nothing else deletes it).
    eventually(30, "the replacement Running", || async {
        let p = pods.get(&pod.name_any()).await?;
        Ok((p.uid() == pod.uid()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .then_some(()))
    })
    .await?;
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}})),
    )
    .await?;
    eventually(30, "the evicted pod replaced", || async {
        let p = pods.get_opt(&pod.name_any()).await?;
        Ok(p.filter(|p| {
            p.uid() != pod.uid()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        }))
    })
    .await?;
    let events = support::events_about(&fx.client, "ModelLane", None, &gpu_lane).await?;
    assert!(
        events.iter().any(|(reason, note)| reason == "PodDeleted"
            && note.contains("Evicted: The node was low on resource: memory.")),
        "{events:?}"
    );
    // A model given new weights replaces the runners, which read it at start.
    let lane_pods = || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_LANE}={gpu_lane}")))
            .await?
            .items;
        anyhow::Ok(
            list.into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| p.name_any())
                .collect::<Vec<_>>(),
        )
    };
    let before = lane_pods().await?;
    Api::<VideoModel>::all(fx.client.clone())
        .patch(
            &model,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"weights": {"path": format!("{model}-v2")}}})),
        )
        .await?;
    eventually(
        30,
        "the runner pods replaced after the model changed",
        || async {
            let now = lane_pods().await?;
            Ok((!now.is_empty() && now.iter().all(|p| !before.contains(p))).then_some(()))
        },
    )
    .await?;
    // Each pod created has its own Event naming it, not a count on the first one's.
    let after = lane_pods().await?;
    eventually(30, "a PodCreated Event naming each pod", || async {
        let events = support::events_about(&fx.client, "ModelLane", None, &gpu_lane).await?;
        let created: Vec<String> = events
            .into_iter()
            .filter(|(reason, _)| reason == "PodCreated")
            .map(|(_, note)| note)
            .collect();
        Ok(before
            .iter()
            .chain(&after)
            .all(|pod| created.iter().any(|note| note.contains(pod.as_str())))
            .then_some(()))
    })
    .await?;

    let lanes: Api<ModelLane> = Api::all(fx.client.clone());
    let overridden = eventually(30, "the override condition", || async {
        let lane = lanes.get(&override_lane).await?;
        let cond = lane
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "AllocatorOverridden");
        Ok(cond.filter(|c| c.status == "True"))
    })
    .await?;
    assert!(
        overridden.message.contains("backend:cudaMallocAsync"),
        "{}",
        overridden.message
    );
    let out = fx
        .ns
        .env
        .kubectl()
        .args(["describe", "lane", &override_lane])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("Warning") && text.contains("AllocatorOverridden"),
        "{text}"
    );

    let ready = format!("framelane_lane_ready_runners{{lane=\"{gpu_lane}\"}}");
    eventually(10, "the lane's gauges", || async {
        Ok(support::sample(&op.metrics().await?, &ready).map(|_| ()))
    })
    .await?;
    lanes.delete(&gpu_lane, &DeleteParams::default()).await?;
    eventually(60, "the deleted lane's pods garbage-collected", || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_LANE}={gpu_lane}")))
            .await?
            .items;
        Ok(list.is_empty().then_some(()))
    })
    .await?;
    // Its gauges go with it: no alert keeps firing on a lane that is no more.
    eventually(10, "the deleted lane's gauges gone", || async {
        let metrics = op.metrics().await?;
        let left = metrics.lines().any(|l| {
            !l.starts_with('#') && l.contains(&format!("lane=\"{gpu_lane}\"")) && {
                let name = l.split('{').next().unwrap_or("");
                name.ends_with("_jobs") || name.ends_with("_runners") || name.ends_with("_active")
            }
        });
        Ok((!left).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_runner_heartbeat_is_owned_by_its_pod_and_goes_with_the_lane() -> Result<()> {
    let fx = Fixture::new("lease-owner").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let pods: Api<Pod> = fx.ns.api();
    let pod = eventually(30, "the lane's pod Running", || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_LANE}={lane}")))
            .await?
            .items;
        Ok(list
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")))
    })
    .await?;
    // The runner in that pod, as the runner binary starts with POD_UID set.
    let uid = pod.uid().context("a stored pod has a uid")?;
    let runner = Runner::start(
        fx.client.clone(),
        &fx.ns.name,
        &pod.name_any(),
        &lane,
        fx.jobs.clone(),
    )
    .owned_by_pod(uid.clone());
    runner.heartbeat(Some(&model)).await?;
    let leases: Api<Lease> = fx.ns.api();
    let lease = leases.get(&pod.name_any()).await?;
    let owners = lease.owner_references();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        (
            owners[0].api_version.as_str(),
            owners[0].kind.as_str(),
            owners[0].name.as_str(),
            owners[0].uid.as_str()
        ),
        ("v1", "Pod", pod.name_any().as_str(), uid.as_str())
    );
    // Renewing keeps the owner.
    runner.heartbeat(Some(&model)).await?;
    assert_eq!(
        leases.get(&pod.name_any()).await?.owner_references(),
        owners
    );
    // The loaded model it tells is the one loaded now: none after an unload.
    let loaded = |lease: Lease| lease.annotations().get(ANNOTATION_LOADED_MODEL).cloned();
    assert_eq!(
        loaded(leases.get(&pod.name_any()).await?),
        Some(model.clone())
    );
    runner.heartbeat(None).await?;
    assert_eq!(loaded(leases.get(&pod.name_any()).await?), None);
    fx.until_ready_runners(&lane, 1).await?;

    // Deleting the lane takes its pod, and the garbage collector the pod's heartbeat.
    Api::<ModelLane>::all(fx.client.clone())
        .delete(&lane, &DeleteParams::default())
        .await?;
    eventually(60, "the heartbeat Lease garbage-collected", || async {
        Ok(leases
            .get_opt(&pod.name_any())
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    ensure!(
        pods.get_opt(&pod.name_any()).await?.is_none(),
        "the Lease went before its pod"
    );
    Ok(())
}

#[tokio::test]
async fn queued_jobs_time_out_when_their_lane_has_no_runner() -> Result<()> {
    let fx = Fixture::new("timeout").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxWaitSeconds": 3}}),
        )
        .await?;
    // A lane that sets no maxDepth gets the operator's default.
    let other = fx.model("phr00t", 4, Some(1.0)).await?;
    let default_depth = fx
        .lane(
            "default-depth",
            &[&other],
            json!({"queue": {"maxDepth": null}}),
        )
        .await?;
    let op = OperatorProcess::start(&fx.ns, "op", &["--default-max-depth", "7"])?;
    fx.create_job("waiting", &model).await?;
    let failed = eventually(30, "QueueWaitTimeout", || async {
        let job = fx.jobs.get("waiting").await?;
        Ok((phase(&job) == Some(JobPhase::Failed)).then_some(job))
    })
    .await?;
    let status = failed.status.unwrap();
    assert_eq!(status.reason, Some(JobReason::QueueWaitTimeout));
    assert!(
        status
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("had no available runner for 3 s")
    );
    let waited = status
        .finished_at
        .unwrap()
        .0
        .duration_since(status.queued_at.unwrap().0);
    ensure!(
        waited.as_secs_f64() >= 3.0,
        "timed out after only {waited:?}"
    );
    eventually(
        10,
        "the timed-out job's slot freed on an Unavailable lane",
        || async {
            let lane_status = fx.lane_status(&lane).await?;
            Ok(
                (lane_status.phase == Some(LanePhase::Unavailable) && lane_status.queue_depth == 0)
                    .then_some(()),
            )
        },
    )
    .await?;
    let metrics = op.metrics().await?;
    // Each lane's effective queue limit: its own maxDepth, else the default.
    let max_depth = |lane: &str| format!("framelane_queue_max_depth_jobs{{lane=\"{lane}\"}}");
    assert_eq!(
        support::sample(&metrics, &max_depth(&lane)),
        Some(500.0),
        "{metrics}"
    );
    let metrics = eventually(10, "the default lane's max depth", || async {
        let metrics = op.metrics().await?;
        Ok(support::sample(&metrics, &max_depth(&default_depth)).map(|_| metrics))
    })
    .await?;
    assert_eq!(
        support::sample(&metrics, &max_depth(&default_depth)),
        Some(7.0),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "framelane_queue_timeout_drops_total{{lane=\"{lane}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "framelane_jobs_finished_total{phase=\"Failed\",reason=\"QueueWaitTimeout\"} 1"
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_deleted_lanes_queued_jobs_fail_lane_not_found_at_once() -> Result<()> {
    let fx = Fixture::new("lane-gone").await?;
    let (anisora, phr00t) = (
        fx.model("anisora", 8, None).await?,
        fx.model("phr00t", 4, Some(1.0)).await?,
    );
    // No runners, and a wait far longer than the test: only the deletion can end it.
    let gone = fx.lane("gone", &[&anisora], json!({})).await?;
    let handed = fx.lane("handed", &[&phr00t], json!({})).await?;
    let _op = OperatorProcess::start(&fx.ns, "op", &[])?;
    fx.create_job("orphan", &anisora).await?;
    fx.create_job("kept", &phr00t).await?;
    all_in_phase(&fx, 2, JobPhase::Queued, 30).await?;
    let lanes: Api<ModelLane> = Api::all(fx.client.clone());
    // One lane leaves this operator's lane selector for another operator's: its job is that
    // operator's to run, and stays queued here.
    lanes
        .patch(
            &handed,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {support::INSTANCE_LABEL: "another"}}})),
        )
        .await?;
    lanes.delete(&gone, &DeleteParams::default()).await?;
    let failed = eventually(15, "the deleted lane's job failed", || async {
        let job = fx.jobs.get("orphan").await?;
        Ok((phase(&job) == Some(JobPhase::Failed)).then_some(job))
    })
    .await?;
    let status = failed.status.unwrap();
    assert_eq!(status.reason, Some(JobReason::LaneNotFound));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains(&format!("lane {gone} was deleted")),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = fx.jobs.get("kept").await?;
    assert_eq!(phase(&kept), Some(JobPhase::Queued));
    lanes.delete(&handed, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_lane_that_loses_its_runner_gives_queued_jobs_max_wait_from_then() -> Result<()> {
    let fx = Fixture::new("grace").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxWaitSeconds": 5}}),
        )
        .await?;
    let _op = fx.operator("op")?;
    // A runner that heartbeats but takes no job, so the job waits behind it.
    let holds = Behaviour {
        permits: Some(Arc::new(Semaphore::new(0))),
        ..Default::default()
    };
    let runner = fx.runner("runner-old", &lane, holds);
    fx.until_ready_runners(&lane, 1).await?;
    fx.create_job("patient", &model).await?;
    eventually(30, "the job queued", || async {
        let job = fx.jobs.get("patient").await?;
        Ok((phase(&job) == Some(JobPhase::Queued)).then_some(()))
    })
    .await?;
    // It waits longer than maxWaitSeconds while the lane has a runner: no timeout.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let job = fx.jobs.get("patient").await?;
    ensure!(
        phase(&job) == Some(JobPhase::Queued),
        "timed out with a live runner: {:?}",
        job.status
    );

    // The runner stops, and its Lease goes as the garbage collector takes it with its pod
    // (a new runner image, a deleted pod). No Lease is left to say when it was last fresh.
    runner.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leases: Api<Lease> = fx.ns.api();
    let gone = jiff::Timestamp::now();
    leases
        .delete(&runner.name, &DeleteParams::default())
        .await?;
    // The lane records when it lost its last runner.
    let available = eventually(10, "the lane to record its outage", || async {
        let status = fx.lane_status(&lane).await?;
        Ok(status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Available" && c.status == "False"))
    })
    .await?;
    ensure!(
        available.last_transition_time.0 >= gone
            && available.last_transition_time.0 <= gone + jiff::SignedDuration::from_secs(3),
        "the outage is dated {}, the runner went away at {gone}",
        available.last_transition_time.0
    );
    // Make the operator look at the job now: it has been queued for longer than
    // maxWaitSeconds, but the lane went down only a moment ago, so it keeps waiting.
    fx.jobs
        .patch(
            "patient",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = fx.jobs.get("patient").await?;
    ensure!(
        phase(&job) == Some(JobPhase::Queued),
        "failed as soon as the runner went away: {:?}",
        job.status
    );

    // It fails once maxWaitSeconds have passed since the runner went away, and not much later.
    let failed = eventually(30, "QueueWaitTimeout", || async {
        let job = fx.jobs.get("patient").await?;
        Ok((phase(&job) == Some(JobPhase::Failed)).then_some(job))
    })
    .await?;
    let status = failed.status.context("status")?;
    assert_eq!(status.reason, Some(JobReason::QueueWaitTimeout));
    let after = status
        .finished_at
        .context("finishedAt")?
        .0
        .duration_since(gone);
    ensure!(
        after >= jiff::SignedDuration::from_secs(5) && after < jiff::SignedDuration::from_secs(10),
        "failed {after:?} after the runner went away (maxWaitSeconds 5)"
    );
    Ok(())
}

#[tokio::test]
async fn a_job_no_webhook_checked_fails_invalid_parameters_and_is_never_claimed() -> Result<()> {
    let fx = Fixture::new("invalid").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let runner = fx.runner("runner-0", &lane, Behaviour::default());
    // No webhook covers this namespace (as with webhook.enabled=false or failurePolicy Ignore).
    let wrong: VideoJob = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob", "metadata": {"name": "wrong"},
        "spec": {"model": model, "prompt": "a cat", "steps": 20, "width": 2048}
    }))?;
    fx.jobs.create(&PostParams::default(), &wrong).await?;
    fx.create_job("right", &model).await?;
    let failed = eventually(30, "the wrong job to fail", || async {
        let job = fx.jobs.get("wrong").await?;
        Ok((phase(&job) == Some(JobPhase::Failed)).then_some(job))
    })
    .await?;
    let status = failed.status.unwrap();
    assert_eq!(status.reason, Some(JobReason::InvalidParameters));
    assert_eq!(
        status.message.as_deref(),
        Some(
            format!(
                "VideoJob \"wrong\" does not fit model \"{model}\": spec.steps: must be 8 for model {model}, got 20: \
                 remove spec.steps or set it to 8; spec.width: must be at most 1280 for model {model} (its maxWidth), got 2048: \
                 lower it or leave it out for the default"
            )
            .as_str()
        )
    );
    assert_eq!(status.lane, None, "never admitted to a lane");
    eventually(30, "the right job to succeed", || async {
        Ok((phase(&fx.jobs.get("right").await?) == Some(JobPhase::Succeeded)).then_some(()))
    })
    .await?;
    let ran: Vec<String> = runner
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|(j, _)| j.clone())
        .collect();
    assert_eq!(ran, ["right"], "the runner never saw the wrong job");
    Ok(())
}

#[tokio::test]
async fn a_refused_final_write_is_retried_until_the_job_succeeds() -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let fx = Fixture::new("final-write").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    // For 10 s, the API server refuses every status update that makes a job of this
    // namespace Succeeded, as an outage or a misbehaving policy would.
    let name = fx.scoped("refuse-succeeded");
    let labels = json!({support::INSTANCE_LABEL: fx.ns.name});
    let policies = Api::<ValidatingAdmissionPolicy>::all(fx.client.clone());
    let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(fx.client.clone());
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": [{"apiGroups": ["framelane.dev"],
                        "apiVersions": ["*"], "operations": ["UPDATE"], "resources": ["videojobs/status"]}]},
                    "validations": [{
                        "expression": "!has(object.status) || !has(object.status.phase) || object.status.phase != 'Succeeded'",
                        "message": "the test refuses Succeeded for now"}]
                }
            }))?,
        )
        .await?;
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"policyName": name, "validationActions": ["Deny"],
                    "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": fx.ns.name}}}}
            }))?,
        )
        .await?;
    // The policy is in force once a dry-run Succeeded write of a probe job is refused.
    let probe = fx.create_job("probe", &model).await?;
    eventually(20, "the policy in force", || async {
        let mut succeeded = probe.clone();
        succeeded.status = Some(framelane_api::VideoJobStatus {
            phase: Some(JobPhase::Succeeded),
            ..Default::default()
        });
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let refused = fx
            .jobs
            .replace_status("probe", &dry_run, &succeeded)
            .await
            .is_err();
        Ok(refused.then_some(()))
    })
    .await?;
    let in_force = tokio::time::Instant::now();
    fx.jobs.delete("probe", &DeleteParams::default()).await?;

    let _op = fx.operator("op")?;
    let runner = fx.runner("runner", &lane, Behaviour::default());
    fx.create_job("refused", &model).await?;
    eventually(30, "the job's last step written", || async {
        let job = fx.jobs.get("refused").await?;
        let percent = job.status.as_ref().and_then(|s| s.progress.as_ref());
        Ok(percent.is_some_and(|p| p.percent == 100).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let job = fx.jobs.get("refused").await?;
    ensure!(
        phase(&job) == Some(JobPhase::Running),
        "the policy did not refuse the runner's Succeeded write: {:?}",
        job.status
    );
    tokio::time::sleep_until(in_force + Duration::from_secs(10)).await;
    bindings.delete(&name, &DeleteParams::default()).await?;
    policies.delete(&name, &DeleteParams::default()).await?;

    let job = eventually(60, "the job Succeeded", || async {
        let job = fx.jobs.get("refused").await?;
        Ok((phase(&job) == Some(JobPhase::Succeeded)).then_some(job))
    })
    .await?;
    let status = job.status.unwrap_or_default();
    assert_eq!(status.reason, Some(JobReason::Completed));
    assert_eq!(status.attempts, Some(1), "the job ran once");
    assert_eq!(
        runner.log.lock().unwrap().len(),
        1,
        "the runner ran one job"
    );
    Ok(())
}

#[tokio::test]
async fn a_hung_job_fails_deadline_exceeded_and_frees_its_slot() -> Result<()> {
    let fx = Fixture::new("deadline").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxDepth": 1, "jobDeadlineSeconds": 3}}),
        )
        .await?;
    let _op = fx.operator("op")?;
    // Heartbeating all along, but each step takes longer than the lane's deadline.
    let hangs = Behaviour {
        steps: 2,
        step_time: Duration::from_secs(6),
        permits: None,
    };
    let runner = fx.runner("runner", &lane, hangs);
    fx.create_job("hung", &model).await?;
    let failed = eventually(30, "the hung job Failed", || async {
        let job = fx.jobs.get("hung").await?;
        ensure!(
            phase(&job) != Some(JobPhase::Succeeded),
            "the job outlived its deadline and succeeded"
        );
        Ok((phase(&job) == Some(JobPhase::Failed)).then_some(job))
    })
    .await?;
    let status = failed.status.clone().unwrap_or_default();
    assert_eq!(status.reason, Some(JobReason::DeadlineExceeded));
    let message = status.message.unwrap_or_default();
    assert!(message.contains("ran 3 s on runner runner"), "{message}");

    // The lane holds one job: the next one is admitted only because the slot was freed. Its
    // own deadline outlasts the lane's.
    let next = support::job(
        "next",
        json!({"model": model, "prompt": "next", "frames": 17, "width": 256, "height": 256,
            "deadlineSeconds": 60}),
    );
    fx.jobs.create(&PostParams::default(), &next).await?;
    let next = eventually(40, "the next job Succeeded", || async {
        let job = fx.jobs.get("next").await?;
        ensure!(
            phase(&job) != Some(JobPhase::Failed),
            "the next job failed: {:?}",
            job.status
        );
        Ok((phase(&job) == Some(JobPhase::Succeeded)).then_some(job))
    })
    .await?;
    assert_eq!(
        next.status.and_then(|s| s.runner),
        Some("runner".to_string())
    );
    // The runner stopped the hung job at its next step and left its status as the operator
    // wrote it.
    assert_eq!(fx.jobs.get("hung").await?.status, failed.status);
    let ran: Vec<String> = runner
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|(j, _)| j.clone())
        .collect();
    assert_eq!(ran, ["hung", "next"]);
    eventually(10, "depth 0", || async {
        Ok((fx.lane_status(&lane).await?.queue_depth == 0).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_queued_at_at_the_end_of_time_does_not_stop_admissions() -> Result<()> {
    let fx = Fixture::new("poison").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    // Written with the admin's credentials before an operator admits it: the CRD lets
    // queuedAt be set once, up to the year 9000 (later times it refuses: the operator could
    // not read them). The old admission clock followed it and admitted new jobs after it.
    let last = "8999-12-31T23:59:59.999999Z";
    fx.create_job("poison", &model).await?;
    let status = json!({"status": {"phase": "Queued", "lane": lane, "queuedAt": last}});
    fx.jobs
        .patch_status("poison", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let mut op = fx.operator("op")?;
    op.until_leading().await?;
    for name in ["after-1", "after-2"] {
        fx.create_job(name, &model).await?;
    }
    let year_3000: jiff::Timestamp = "3000-01-01T00:00:00Z".parse()?;
    eventually(30, "the new jobs admitted at today's time", || async {
        let jobs = fx.list_jobs().await?;
        let admitted = jobs
            .iter()
            .filter(|j| j.name_any().starts_with("after-"))
            .filter_map(|j| j.status.as_ref()?.queued_at.as_ref())
            .filter(|t| t.0 < year_3000)
            .count();
        Ok((admitted == 2).then_some(()))
    })
    .await?;
    ensure!(
        op.child.try_wait()?.is_none(),
        "the operator exited:\n{}",
        op.log_text()
    );
    let poison = fx.jobs.get("poison").await?;
    let kept = poison.status.and_then(|s| s.queued_at).map(|t| t.0);
    assert_eq!(
        kept,
        Some(last.parse()?),
        "the job keeps its place at the back"
    );
    Ok(())
}

/// Runner pods go to the GPU node pool their lane names: its label (`nodeSelector`), its
/// taint (`tolerations`), and a PriorityClass. Without the toleration they stay Pending.
#[tokio::test]
async fn runner_pods_go_to_the_tainted_node_pool_their_lane_names() -> Result<()> {
    let fx = Fixture::new("pool").await?;
    let pool = fx.ns.name.clone();
    const POOL: &str = "framelane.dev/test-pool";
    let nodes: Api<Node> = Api::all(fx.client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": pool, "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": pool, POOL: pool}},
        "spec": {"taints": [{"key": POOL, "value": pool, "effect": "NoSchedule"}]},
        "status": {"capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"},
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "1"}}
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let classes: Api<PriorityClass> = Api::all(fx.client.clone());
    let class: PriorityClass = serde_json::from_value(json!({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
        "metadata": {"name": pool}, "value": 1000
    }))?;
    classes.create(&PostParams::default(), &class).await?;
    let result = async {
        let model = fx.model("anisora", 8, None).await?;
        let lane = fx
            .lane(
                "pool",
                &[&model],
                json!({"runner": {"resources": {"limits": {"nvidia.com/gpu": 1}},
                    "nodeSelector": {POOL: pool}, "priorityClassName": pool}}),
            )
            .await?;
        let _op = fx.operator("op")?;
        let pods: Api<Pod> = fx.ns.api();
        let lane_pods = ListParams::default().labels(&format!("{LABEL_LANE}={lane}"));
        eventually(30, "the pod refused by the pool's taint", || async {
            let list = pods.list(&lane_pods).await?.items;
            Ok(list.into_iter().find(|p| {
                let conditions = p.status.as_ref().and_then(|s| s.conditions.clone());
                conditions.into_iter().flatten().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.reason.as_deref() == Some("Unschedulable")
                        && c.message
                            .as_deref()
                            .is_some_and(|m| m.contains("untolerated taint"))
                })
            }))
        })
        .await?;
        Api::<ModelLane>::all(fx.client.clone())
            .patch(
                &lane,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"runner": {"tolerations": [
                    {"key": POOL, "operator": "Equal", "value": pool, "effect": "NoSchedule"}]}}})),
            )
            .await?;
        let pod = eventually(60, "a new pod Running on the pool's node", || async {
            let list = pods.list(&lane_pods).await?.items;
            Ok(list.into_iter().find(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(pool.as_str())
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            }))
        })
        .await?;
        let spec = pod.spec.context("a pod spec")?;
        ensure!(spec.priority == Some(1000), "{:?}", spec.priority);
        ensure!(spec.priority_class_name.as_deref() == Some(pool.as_str()));
        anyhow::Ok(())
    }
    .await;
    nodes.delete(&pool, &DeleteParams::default()).await?;
    classes.delete(&pool, &DeleteParams::default()).await?;
    result
}

/// A stopping runner's hand-back is told in the job's Events (runners post none).
#[tokio::test]
async fn a_job_given_back_by_a_stopping_runner_says_so_in_its_events() -> Result<()> {
    let fx = Fixture::new("handback").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx.lane("anisora", &[&model], json!({})).await?;
    let _op = fx.operator("op")?;
    let (_loaded, loaded_rx) = watch::channel(None::<String>);
    let runner = Runner::start(
        fx.client.clone(),
        &fx.ns.name,
        "runner-0",
        &lane,
        fx.jobs.clone(),
    );
    let _heartbeat = runner.keep_alive(loaded_rx);
    fx.create_job("back", &model).await?;
    let claimed = eventually(60, "the runner to claim the job", || async {
        Ok(runner.claim_next().await?)
    })
    .await?;
    claimed.hand_back().await?;
    let note = eventually(30, "a Requeued Event", || async {
        let events =
            support::events_about(&fx.client, "VideoJob", Some(&fx.ns.name), "back").await?;
        Ok(events
            .into_iter()
            .find(|(reason, _)| reason == "Requeued")
            .map(|(_, note)| note))
    })
    .await?;
    assert!(note.contains("runner runner-0 is stopping"), "{note}");
    Ok(())
}
