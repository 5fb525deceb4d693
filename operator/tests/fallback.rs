//! Fallback on the real control plane: a lane that cannot run hands its jobs to its fallback
//! lane, with a cause from a real signal (manual switch, unschedulable pods, a ResourceQuota,
//! busy runners) and an episode measured from its start to its end, across leaders.

mod support;

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use framelane_api::{
    ModelLane, VideoJob,
    modellane::{FallbackCause, FallbackStatus},
    videojob::{JobPhase, LaneAssignment},
};
use k8s_openapi::api::core::v1::{Node, ResourceQuota};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::{
    Behaviour, Fixture, OperatorProcess, burst, events_about, eventually, merge, phase, sample,
};
use tokio::{sync::Semaphore, time::Instant};

/// A model, its Dedicated lane (falling back to the Shared lane) and the Shared lane.
struct Setup {
    fx: Fixture,
    model: String,
    lane: String,
    shared: String,
}

/// Operator flags of these tests: a short grace period for `capacity`.
const OPERATOR: &[&str] = &["--fallback-grace-seconds", "3"];

async fn setup(prefix: &str, dedicated: Value, shared: Value) -> Result<Setup> {
    let fx = Fixture::new(prefix).await?;
    let model = fx.model("anisora", 8, None).await?;
    let mut shared_spec =
        json!({"mode": "Shared", "queue": {"maxDepth": 25, "maxWaitSeconds": 300}});
    merge(&mut shared_spec, shared);
    let shared = fx.lane("shared", &[&model], shared_spec).await?;
    let mut spec = json!({"fallback": {"lane": shared}, "queue": {"maxWaitSeconds": 3}});
    merge(&mut spec, dedicated);
    let lane = fx.lane("anisora", &[&model], spec).await?;
    Ok(Setup {
        fx,
        model,
        lane,
        shared,
    })
}

impl Setup {
    fn lanes(&self) -> Api<ModelLane> {
        Api::all(self.fx.client.clone())
    }

    async fn patch_lane(&self, spec: Value) -> Result<()> {
        self.lanes()
            .patch(
                &self.lane,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    /// Has the Shared lane serve `models` only.
    async fn shared_serves(&self, models: &[&str]) -> Result<()> {
        self.lanes()
            .patch(
                &self.shared,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"models": models}})),
            )
            .await?;
        Ok(())
    }

    /// Checks, well past maxWaitSeconds (3 s), that job `name` still waits in its own lane.
    async fn still_queued_on_its_lane(&self, name: &str) -> Result<()> {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let job = self.fx.jobs.get(name).await?;
        assert_eq!(phase(&job), Some(JobPhase::Queued));
        assert_eq!(
            placement(&job),
            (
                Some(self.lane.clone()),
                Some(LaneAssignment::Dedicated),
                None,
                None
            )
        );
        Ok(())
    }

    async fn fallback(&self) -> Result<FallbackStatus> {
        Ok(self
            .fx
            .lane_status(&self.lane)
            .await?
            .fallback
            .unwrap_or_default())
    }

    /// Waits until the lane is in an episode of `cause`.
    async fn until_active(&self, cause: FallbackCause) -> Result<FallbackStatus> {
        eventually(
            30,
            &format!("lane {} in fallback ({cause:?})", self.lane),
            || async {
                let f = self.fallback().await?;
                Ok((f.active && f.cause == Some(cause)).then_some(f))
            },
        )
        .await
    }

    /// Waits until the lane's episode has ended.
    async fn until_ended(&self) -> Result<FallbackStatus> {
        eventually(
            60,
            &format!("lane {} out of fallback", self.lane),
            || async {
                let f = self.fallback().await?;
                Ok((!f.active && f.last_episode.is_some()).then_some(f))
            },
        )
        .await
    }

    /// The lane's `Fallback` condition: status, reason, message.
    async fn condition(&self) -> Result<(String, String, String)> {
        let c = self
            .fx
            .lane_status(&self.lane)
            .await?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Fallback")
            .context("a Fallback condition")?;
        Ok((c.status, c.reason, c.message))
    }

    /// The placement of a job that ran on the Shared lane for `cause`.
    fn on_shared(
        &self,
        cause: FallbackCause,
    ) -> (
        Option<String>,
        Option<LaneAssignment>,
        Option<FallbackCause>,
        Option<String>,
    ) {
        (
            Some(self.shared.clone()),
            Some(LaneAssignment::Fallback),
            Some(cause),
            Some(self.lane.clone()),
        )
    }

    /// Waits until job `name` reaches `want`.
    async fn until_phase(&self, name: &str, want: JobPhase, secs: u64) -> Result<VideoJob> {
        eventually(secs, &format!("job {name} {want:?}"), || async {
            let job = self.fx.jobs.get(name).await?;
            Ok((phase(&job) == Some(want)).then_some(job))
        })
        .await
    }

    /// The lane's Events as `(reason, note)`, once `count` of reason `reason` are there.
    async fn lane_events(&self, reason: &str, count: usize) -> Result<Vec<(String, String)>> {
        eventually(30, &format!("{count} {reason} Events"), || async {
            let events = events_about(&self.fx.client, "ModelLane", None, &self.lane).await?;
            let n = events.iter().filter(|(r, _)| r == reason).count();
            Ok((n >= count).then_some(events))
        })
        .await
    }
}

/// The lane, assignment, cause and origin a job's status shows.
fn placement(
    job: &VideoJob,
) -> (
    Option<String>,
    Option<LaneAssignment>,
    Option<FallbackCause>,
    Option<String>,
) {
    let s = job.status.clone().unwrap_or_default();
    (s.lane, s.lane_mode, s.fallback_cause, s.fallback_from)
}

fn fallback_series(name: &str, lane: &str, cause: &str) -> String {
    format!("framelane_fallback_{name}{{lane=\"{lane}\",cause=\"{cause}\"}}")
}

fn count(events: &[(String, String)], reason: &str) -> usize {
    events.iter().filter(|(r, _)| r == reason).count()
}

#[tokio::test]
async fn forcing_a_lane_sends_new_jobs_to_its_fallback_lane_until_released() -> Result<()> {
    let s = setup("fb-manual", json!({}), json!({})).await?;
    let op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, Behaviour::default());
    let shared_runner = s.fx.runner("shared-0", &s.shared, Behaviour::default());

    s.fx.create_job("before", &s.model).await?;
    let before = s.until_phase("before", JobPhase::Succeeded, 60).await?;
    assert_eq!(
        placement(&before),
        (
            Some(s.lane.clone()),
            Some(LaneAssignment::Dedicated),
            None,
            None
        )
    );

    s.patch_lane(json!({"fallback": {"force": true}})).await?;
    let forced_at = Instant::now();
    // At once: the switch counts before the lane's status says so.
    s.fx.create_job("during", &s.model).await?;
    let started = s.until_active(FallbackCause::Manual).await?;
    let during = s.until_phase("during", JobPhase::Succeeded, 60).await?;
    assert_eq!(placement(&during), s.on_shared(FallbackCause::Manual));
    assert!(
        shared_runner
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|(job, _)| job == "during"),
        "the Shared lane's runner ran it"
    );
    let (on, reason, message) = s.condition().await?;
    assert_eq!((on.as_str(), reason.as_str()), ("True", "Forced"));
    assert_eq!(
        message,
        format!(
            "new jobs go to lane {}: spec.fallback.force is true",
            s.shared
        )
    );
    let metrics = op.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            &fallback_series("activations_total", &s.lane, "manual")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &fallback_series("active", &s.lane, "manual")),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, &fallback_series("active", &s.lane, "capacity")),
        Some(0.0)
    );

    s.patch_lane(json!({"fallback": {"force": false}})).await?;
    let released_at = Instant::now();
    let ended = s.until_ended().await?;
    let episode = ended.last_episode.clone().context("the last episode")?;
    assert_eq!(episode.cause, FallbackCause::Manual);
    assert_eq!(Some(episode.start.clone()), started.since);
    let measured = released_at.duration_since(forced_at).as_secs_f64();
    ensure!(
        (episode.duration_seconds - measured).abs() <= 2.0,
        "recorded {} s, the test measured {measured} s",
        episode.duration_seconds
    );
    assert_eq!(
        episode.duration_seconds,
        episode.end.0.duration_since(episode.start.0).as_secs_f64()
    );
    s.fx.create_job("after", &s.model).await?;
    let after = s.until_phase("after", JobPhase::Succeeded, 60).await?;
    assert_eq!(
        placement(&after).1,
        Some(LaneAssignment::Dedicated),
        "after the episode new jobs go to the lane again"
    );

    let events = s.lane_events("FallbackEnded", 1).await?;
    assert_eq!(count(&events, "FallbackStarted"), 1, "{events:?}");
    assert_eq!(count(&events, "FallbackEnded"), 1, "{events:?}");
    let started_note = &events
        .iter()
        .find(|(r, _)| r == "FallbackStarted")
        .unwrap()
        .1;
    assert_eq!(
        started_note,
        &format!(
            "lane {} is in fallback (manual): spec.fallback.force is true; new jobs go to lane {}, queued ones after maxWaitSeconds",
            s.lane, s.shared
        )
    );
    let ended_note = &events.iter().find(|(r, _)| r == "FallbackEnded").unwrap().1;
    assert_eq!(
        ended_note,
        &format!(
            "lane {} left fallback (manual) after {:.1} s; new jobs go to it again",
            s.lane, episode.duration_seconds
        )
    );
    let (on, reason, _) = s.condition().await?;
    assert_eq!((on.as_str(), reason.as_str()), ("False", "Recovered"));
    let metrics = op.metrics().await?;
    assert_eq!(
        sample(&metrics, &fallback_series("active", &s.lane, "manual")),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &metrics,
            &fallback_series("duration_seconds_count", &s.lane, "manual")
        ),
        Some(1.0)
    );
    let sum = sample(
        &metrics,
        &fallback_series("duration_seconds_sum", &s.lane, "manual"),
    )
    .context("the duration sum")?;
    assert_eq!(
        sum,
        episode.duration_seconds,
        "{:?}",
        s.fx.lane_status(&s.lane).await?
    );
    let log = op.log_text();
    assert_eq!(log.matches("\"fallback started\"").count(), 1, "{log}");
    assert_eq!(log.matches("\"fallback ended\"").count(), 1, "{log}");
    Ok(())
}

#[tokio::test]
async fn removing_a_lanes_fallback_mid_episode_ends_it_and_its_gauge() -> Result<()> {
    let s = setup("fb-removed", json!({}), json!({})).await?;
    let op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    s.patch_lane(json!({"fallback": {"force": true}})).await?;
    s.until_active(FallbackCause::Manual).await?;
    let active = fallback_series("active", &s.lane, "manual");
    eventually(10, "the active gauge at 1", || async {
        Ok((sample(&op.metrics().await?, &active) == Some(1.0)).then_some(()))
    })
    .await?;
    s.patch_lane(json!({"fallback": null})).await?;
    s.until_ended().await?;
    eventually(10, "the active gauge back to 0", || async {
        Ok((sample(&op.metrics().await?, &active) == Some(0.0)).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_lane_whose_pods_cannot_be_scheduled_falls_back_until_a_node_appears() -> Result<()> {
    // No node has the lane's resource: its runner pod stays Unschedulable.
    let resource = "example.com/big-gpu";
    let s = setup("fb-capacity", json!({}), json!({})).await?;
    let _op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    // The lane's runner heartbeats but takes nothing: its job stays queued.
    let holds = Behaviour {
        permits: Some(Arc::new(Semaphore::new(0))),
        ..Default::default()
    };
    let _own = s.fx.runner("own-0", &s.lane, holds);
    let _shared = s.fx.runner("shared-0", &s.shared, Behaviour::default());
    s.fx.create_job("queued", &s.model).await?;
    s.until_phase("queued", JobPhase::Queued, 30).await?;

    s.patch_lane(json!({"runner": {"resources": {"requests": {"cpu": "100m", resource: "1"}, "limits": {resource: "1"}}}}))
        .await?;
    let unschedulable_at = Instant::now();
    let started = s.until_active(FallbackCause::Capacity).await?;
    let (on, reason, message) = s.condition().await?;
    assert_eq!((on.as_str(), reason.as_str()), ("True", "Unschedulable"));
    assert!(
        message.contains(&format!("Insufficient {resource}")),
        "{message}"
    );
    // A new job goes to the Shared lane at once; the queued one after maxWaitSeconds.
    s.fx.create_job("new", &s.model).await?;
    for name in ["new", "queued"] {
        let job = s.until_phase(name, JobPhase::Succeeded, 60).await?;
        assert_eq!(
            placement(&job),
            s.on_shared(FallbackCause::Capacity),
            "{name}"
        );
    }
    let moved = events_about(&s.fx.client, "VideoJob", Some(&s.fx.ns.name), "queued").await?;
    assert_eq!(count(&moved, "MovedToFallback"), 1, "{moved:?}");

    // A node with the resource appears: the pod is scheduled, the lane's runner is fresh.
    let node = format!("{}-big", s.fx.ns.name);
    let nodes: Api<Node> = Api::all(s.fx.client.clone());
    let node_object: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": node}},
        "status": {"capacity": {"cpu": "16", "memory": "64Gi", "pods": "110", resource: "1"},
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", resource: "1"}}
    }))?;
    nodes.create(&PostParams::default(), &node_object).await?;
    let available_at = Instant::now();
    let ended = s.until_ended().await;
    nodes.delete(&node, &DeleteParams::default()).await?;
    let episode = ended?.last_episode.context("the last episode")?;
    assert_eq!(episode.cause, FallbackCause::Capacity);
    assert_eq!(Some(episode.start), started.since);
    let measured = available_at.duration_since(unschedulable_at).as_secs_f64();
    ensure!(
        (episode.duration_seconds - measured).abs() <= 2.0,
        "recorded {} s, the test measured {measured} s",
        episode.duration_seconds
    );
    Ok(())
}

#[tokio::test]
async fn a_quota_that_refuses_runner_pods_is_a_quota_episode_until_raised() -> Result<()> {
    let s = setup(
        "fb-quota",
        json!({"runner": {"resources": {"requests": {"cpu": "200m"}}}}),
        json!({}),
    )
    .await?;
    // The Shared lane's pod (100m) fits; the lane's (200m) does not.
    let quotas: Api<ResourceQuota> = s.fx.ns.api();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "runners"},
        "spec": {"hard": {"requests.cpu": "150m"}}
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;
    eventually(30, "the quota's status", || async {
        let q = quotas.get("runners").await?;
        Ok(q.status.and_then(|s| s.hard).map(|_| ()))
    })
    .await?;
    let _op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, Behaviour::default());
    let _shared = s.fx.runner("shared-0", &s.shared, Behaviour::default());

    s.until_active(FallbackCause::Quota).await?;
    let (on, reason, message) = s.condition().await?;
    assert_eq!((on.as_str(), reason.as_str()), ("True", "QuotaExceeded"));
    assert!(
        message.contains("ResourceQuota runners allows requests.cpu 150m"),
        "{message}"
    );
    s.fx.create_job("during", &s.model).await?;
    let during = s.until_phase("during", JobPhase::Succeeded, 60).await?;
    assert_eq!(placement(&during), s.on_shared(FallbackCause::Quota));

    quotas
        .patch(
            "runners",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hard": {"requests.cpu": "2"}}})),
        )
        .await?;
    let ended = s.until_ended().await?;
    assert_eq!(
        ended.last_episode.map(|e| e.cause),
        Some(FallbackCause::Quota)
    );
    s.fx.create_job("after", &s.model).await?;
    let after = s.until_phase("after", JobPhase::Succeeded, 60).await?;
    assert_eq!(placement(&after).1, Some(LaneAssignment::Dedicated));
    Ok(())
}

/// A runner that takes one job and spends 10 s on it, then takes nothing more.
fn busy() -> Behaviour {
    Behaviour {
        steps: 40,
        step_time: Duration::from_millis(250),
        permits: Some(Arc::new(Semaphore::new(1))),
    }
}

#[tokio::test]
async fn a_job_behind_busy_runners_moves_to_a_free_shared_runner() -> Result<()> {
    let s = setup("fb-busy", json!({}), json!({})).await?;
    let op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, busy());
    let shared = s.fx.runner("shared-0", &s.shared, Behaviour::default());
    s.fx.create_job("long", &s.model).await?;
    s.until_phase("long", JobPhase::Running, 30).await?;
    s.fx.create_job("next", &s.model).await?;
    let next = s.until_phase("next", JobPhase::Succeeded, 30).await?;
    assert_eq!(placement(&next), s.on_shared(FallbackCause::Capacity));
    let status = next.status.clone().unwrap_or_default();
    let waited = status
        .started_at
        .context("started")?
        .0
        .duration_since(status.queued_at.context("queued")?.0);
    ensure!(
        waited.as_secs_f64() >= 3.0,
        "moved after only {waited:?}, before maxWaitSeconds"
    );
    assert!(
        shared
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|(job, _)| job == "next")
    );
    assert_eq!(
        phase(&s.fx.jobs.get("long").await?),
        Some(JobPhase::Running),
        "the busy runner still has its job"
    );
    let metrics = op.metrics().await?;
    let moved = format!(
        "framelane_fallback_jobs_moved_total{{lane=\"{}\",fallback_lane=\"{}\",cause=\"capacity\"}}",
        s.lane, s.shared
    );
    assert_eq!(sample(&metrics, &moved), Some(1.0), "{metrics}");
    assert!(
        !s.fallback().await?.active,
        "busy runners move jobs, not the lane"
    );
    Ok(())
}

#[tokio::test]
async fn a_job_behind_busy_runners_stays_queued_while_the_shared_runner_is_busy_too() -> Result<()>
{
    let s = setup("fb-both-busy", json!({}), json!({})).await?;
    let other = s.fx.model("phr00t", 4, Some(1.0)).await?;
    s.shared_serves(&[s.model.as_str(), other.as_str()]).await?;
    let _op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, busy());
    let _shared = s.fx.runner("shared-0", &s.shared, busy());
    s.fx.create_job("shared-long", &other).await?;
    s.until_phase("shared-long", JobPhase::Running, 30).await?;
    s.fx.create_job("long", &s.model).await?;
    s.until_phase("long", JobPhase::Running, 30).await?;
    s.fx.create_job("next", &s.model).await?;
    // Well past maxWaitSeconds (3 s), both lanes' runners still busy.
    s.still_queued_on_its_lane("next").await
}

#[tokio::test]
async fn a_job_never_moves_to_a_fallback_lane_that_does_not_serve_its_model() -> Result<()> {
    let s = setup("fb-not-served", json!({}), json!({})).await?;
    let other = s.fx.model("phr00t", 4, Some(1.0)).await?;
    s.shared_serves(&[other.as_str()]).await?;
    let _op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, busy());
    let _shared = s.fx.runner("shared-0", &s.shared, Behaviour::default());
    s.fx.create_job("long", &s.model).await?;
    s.until_phase("long", JobPhase::Running, 30).await?;
    s.fx.create_job("next", &s.model).await?;
    // Well past maxWaitSeconds (3 s), the Shared runner free: it would fail the job.
    s.still_queued_on_its_lane("next").await
}

#[tokio::test]
async fn a_fallback_lane_that_does_not_exist_starts_no_episode_and_says_so() -> Result<()> {
    let s = setup(
        "fb-typo",
        json!({"fallback": {"lane": "shraed"}}),
        json!({}),
    )
    .await?;
    let _op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    // No runner, well past the 3 s grace period: nothing would take its jobs, so no episode.
    let condition = eventually(30, "the Fallback condition", || async {
        let status = s.fx.lane_status(&s.lane).await?;
        Ok(status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Fallback" && c.reason == "FallbackLaneInvalid"))
    })
    .await?;
    assert_eq!(condition.status, "False");
    assert!(
        condition
            .message
            .contains("spec.fallback.lane: lane shraed does not exist"),
        "{}",
        condition.message
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!s.fallback().await?.active, "an episode started");
    let events = events_about(&s.fx.client, "ModelLane", None, &s.lane).await?;
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "FallbackLaneInvalid" && note == &condition.message),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|(reason, _)| reason == "FallbackStarted"),
        "{events:?}"
    );
    // Named right, the episode starts.
    s.patch_lane(json!({"fallback": {"lane": s.shared}}))
        .await?;
    s.until_active(FallbackCause::Capacity).await?;
    Ok(())
}

#[tokio::test]
async fn a_job_behind_busy_runners_waits_its_turn_when_the_shared_lane_has_no_runner() -> Result<()>
{
    let s = setup("fb-no-shared", json!({}), json!({})).await?;
    let _op = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, busy());
    s.fx.create_job("long", &s.model).await?;
    s.until_phase("long", JobPhase::Running, 30).await?;
    s.fx.create_job("next", &s.model).await?;
    // Well past maxWaitSeconds (3 s), nothing to move to: its own lane's runner will run it.
    s.still_queued_on_its_lane("next").await
}

#[tokio::test]
async fn a_full_fallback_lane_refuses_with_its_name_exactly_under_a_burst_on_two_replicas()
-> Result<()> {
    let s = setup(
        "fb-burst",
        json!({"fallback": {"force": true}}),
        json!({"queue": {"maxDepth": 5}}),
    )
    .await?;
    let (a, port_a) = s.fx.webhook_operator("a", 0, OPERATOR)?;
    a.until_leading().await?;
    let (b, port_b) = s.fx.webhook_operator("b", 0, OPERATOR)?;
    b.until_ready().await?;
    let front = support::RoundRobin::start(&[(&a, port_a), (&b, port_b)]).await?;
    s.fx.register_webhook(front.port).await?;
    s.fx.webhook_effective(&s.model).await?;
    s.until_active(FallbackCause::Manual).await?;

    let jobs = s.fx.jobs_without_retries().await?;
    let (admitted, refused) = burst(&jobs, &s.model, "burst", 60).await;
    assert_eq!((admitted, refused.len()), (5, 55));
    for status in &refused {
        assert_eq!(status.code, 503, "{status:?}");
        ensure!(
            status.message.contains(&format!(
                "queue_overloaded: lane {} holds 5 unfinished jobs and its maxDepth is 5",
                s.shared
            )),
            "{}",
            status.message
        );
    }
    let queued = eventually(30, "5 jobs queued on the Shared lane", || async {
        let jobs = s.fx.list_jobs().await?;
        let on_shared = jobs
            .iter()
            .filter(|j| placement(j).0.as_deref() == Some(s.shared.as_str()))
            .count();
        Ok((on_shared == 5).then_some(jobs))
    })
    .await?;
    assert_eq!(queued.len(), 5);
    eventually(30, "the Shared lane's queueDepth at 5", || async {
        Ok((s.fx.lane_status(&s.shared).await?.queue_depth == 5).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_episode_started_under_one_leader_ends_once_under_the_next() -> Result<()> {
    let s = setup("fb-leader", json!({}), json!({})).await?;
    let mut a = OperatorProcess::start(&s.fx.ns, "a", OPERATOR)?;
    a.until_leading().await?;
    let b = OperatorProcess::start(&s.fx.ns, "b", OPERATOR)?;
    let _own = s.fx.runner("own-0", &s.lane, Behaviour::default());
    let _shared = s.fx.runner("shared-0", &s.shared, Behaviour::default());

    s.patch_lane(json!({"fallback": {"force": true}})).await?;
    let forced_at = Instant::now();
    let started = s.until_active(FallbackCause::Manual).await?;
    a.kill();
    b.until_leading().await?;
    s.patch_lane(json!({"fallback": {"force": false}})).await?;
    let released_at = Instant::now();
    let episode = s
        .until_ended()
        .await?
        .last_episode
        .context("the last episode")?;
    assert_eq!(Some(episode.start.clone()), started.since);
    let measured = released_at.duration_since(forced_at).as_secs_f64();
    ensure!(
        (episode.duration_seconds - measured).abs() <= 2.0,
        "recorded {} s, the test measured {measured} s",
        episode.duration_seconds
    );
    let events = s.lane_events("FallbackEnded", 1).await?;
    assert_eq!(
        (
            count(&events, "FallbackStarted"),
            count(&events, "FallbackEnded")
        ),
        (1, 1),
        "{events:?}"
    );
    // The new leader read the episode from the lane's status: it counts its end, not a
    // second start.
    let metrics = b.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            &fallback_series("activations_total", &s.lane, "manual")
        ),
        None,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            &fallback_series("duration_seconds_count", &s.lane, "manual")
        ),
        Some(1.0)
    );
    assert_eq!(b.log_text().matches("\"fallback started\"").count(), 0);
    assert_eq!(a.log_text().matches("\"fallback started\"").count(), 1);
    Ok(())
}
