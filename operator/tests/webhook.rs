//! The admission webhook on the real local control plane: the API server calls the operator
//! over TLS, with the CA the operator generated and published.

mod support;

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result, ensure};
use framelane_api::VideoJob;
use framelane_operator::webhook::certs::{self, Material, Policy};
use futures::future::join_all;
use k8s_openapi::api::{
    admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Secret,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::{Value, json};
use support::{Fixture, RoundRobin, burst, eventually, job, sample};

/// A test's models (anisora-like: 8 steps, t2v and i2v; phr00t-like: 4 steps, cfg 1.0, t2v
/// only) and a Dedicated lane for each, with no runner.
struct Setup {
    fx: Fixture,
    anisora: String,
    phr00t: String,
    lane: String,
}

async fn setup(prefix: &str, max_depth: i32) -> Result<Setup> {
    let fx = Fixture::new(prefix).await?;
    let anisora = fx
        .model_with("anisora", 8, None, json!({"modes": ["t2v", "i2v"]}))
        .await?;
    let phr00t = fx.model("phr00t", 4, Some(1.0)).await?;
    let queue = json!({"queue": {"maxDepth": max_depth, "maxWaitSeconds": 3600}});
    let lane = fx.lane("anisora", &[&anisora], queue.clone()).await?;
    fx.lane("phr00t", &[&phr00t], queue).await?;
    Ok(Setup {
        fx,
        anisora,
        phr00t,
        lane,
    })
}

/// The Status a refused create returns.
async fn refusal(jobs: &Api<VideoJob>, job: &VideoJob) -> Result<Box<kube::core::Status>> {
    match jobs.create(&PostParams::default(), job).await {
        Err(kube::Error::Api(status)) => Ok(status),
        Ok(_) => anyhow::bail!("{} was admitted", job.name_any()),
        Err(e) => anyhow::bail!("{} failed without a Status: {e}", job.name_any()),
    }
}

fn cause_fields(status: &kube::core::Status) -> Vec<String> {
    status
        .details
        .iter()
        .flat_map(|d| d.causes.iter())
        .map(|c| c.field.clone())
        .collect()
}

#[tokio::test]
async fn a_job_that_leaves_parameters_out_is_stored_with_its_models_values() -> Result<()> {
    let s = setup("wh-defaults", 25).await?;
    let (_operator, port) = s.fx.webhook_operator("a", 0, &[])?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.phr00t).await?;
    let stored =
        s.fx.jobs
            .create(
                &PostParams::default(),
                &job("bare", json!({"model": s.phr00t, "prompt": "a cat"})),
            )
            .await?;
    let spec = &stored.spec;
    assert_eq!(
        (
            spec.steps,
            spec.cfg,
            spec.width,
            spec.height,
            spec.frames,
            spec.fps
        ),
        (Some(4), Some(1.0), Some(832), Some(480), Some(81), Some(16)),
        "the fixture model's fixed parameters and defaults"
    );
    let own =
        s.fx.jobs
            .create(
                &PostParams::default(),
                &job(
                    "own",
                    json!({"model": s.anisora, "prompt": "a cat", "width": 256, "frames": 17}),
                ),
            )
            .await?;
    assert_eq!(
        (
            own.spec.steps,
            own.spec.cfg,
            own.spec.width,
            own.spec.frames
        ),
        (Some(8), Some(1.0), Some(256), Some(17)),
        "what the job sets stays; a model without a fixed cfg gives no guidance, stored"
    );
    Ok(())
}

/// The API server sends a create to the mutating webhook only when the job leaves something
/// out (its matchCondition): a job that sets every field is created while the mutating
/// webhook cannot be reached, one that leaves out a single field is not.
#[tokio::test]
async fn a_job_that_sets_every_field_is_not_sent_to_the_mutating_webhook() -> Result<()> {
    let s = setup("wh-match", 25).await?;
    let (_operator, port) = s.fx.webhook_operator("a", 0, &[])?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.phr00t).await?;
    s.fx.unreachable_mutating_webhook().await?;
    let every = json!({"model": s.phr00t, "prompt": "a cat", "steps": 4, "cfg": 1.0,
        "width": 256, "height": 256, "frames": 17, "fps": 8});
    let mut without_fps = every.clone();
    without_fps.as_object_mut().unwrap().remove("fps");
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let jobs = s.fx.jobs_without_retries().await?;
    eventually(
        30,
        "the API server to call the unreachable mutating webhook",
        || async {
            Ok(
                match jobs
                    .create(&dry_run, &job("no-fps", without_fps.clone()))
                    .await
                {
                    Err(kube::Error::Api(e))
                        if e.message.contains("defaults.videojobs.framelane.dev") =>
                    {
                        Some(())
                    }
                    _ => None,
                },
            )
        },
    )
    .await?;
    let stored = jobs
        .create(&PostParams::default(), &job("every", every))
        .await
        .context("a job that sets every field must not need the mutating webhook")?;
    assert_eq!(
        (stored.spec.steps, stored.spec.width, stored.spec.fps),
        (Some(4), Some(256), Some(8))
    );
    Ok(())
}

#[tokio::test]
async fn wrong_parameters_are_refused_with_every_field_and_its_fix() -> Result<()> {
    let Setup {
        fx,
        anisora,
        phr00t,
        ..
    } = setup("wh-params", 25).await?;
    let (operator, port) = fx.webhook_operator("a", 0, &[])?;
    fx.register_webhook(port).await?;
    fx.webhook_effective(&anisora).await?;

    let steps = refusal(
        &fx.jobs,
        &job(
            "steps",
            json!({"model": anisora, "prompt": "a cat", "steps": 20}),
        ),
    )
    .await?;
    assert_eq!((steps.code, steps.reason.as_str()), (422, "Invalid"));
    assert_eq!(cause_fields(&steps), ["spec.steps"]);
    let message = &steps.details.as_ref().unwrap().causes[0].message;
    assert_eq!(
        message,
        &format!("must be 8 for model {anisora}, got 20: remove spec.steps or set it to 8")
    );

    let cfg = refusal(
        &fx.jobs,
        &job(
            "cfg",
            json!({"model": phr00t, "prompt": "a cat", "cfg": 3.5}),
        ),
    )
    .await?;
    assert_eq!(
        (cfg.code, cause_fields(&cfg)),
        (422, vec!["spec.cfg".into()])
    );
    assert!(cfg.message.contains("must be 1.0"), "{}", cfg.message);

    let many = refusal(
        &fx.jobs,
        &job(
            "many",
            json!({"model": phr00t, "prompt": "a cat", "mode": "i2v", "image": "cat.png",
                "steps": 6, "cfg": 2.0, "width": 2048, "frames": 321}),
        ),
    )
    .await?;
    assert_eq!(
        cause_fields(&many),
        [
            "spec.mode",
            "spec.steps",
            "spec.cfg",
            "spec.width",
            "spec.frames"
        ]
    );

    let unknown = refusal(
        &fx.jobs,
        &job("unknown", json!({"model": "wan-2-9", "prompt": "a cat"})),
    )
    .await?;
    assert_eq!(cause_fields(&unknown), ["spec.model"]);
    assert!(unknown.message.contains(&anisora), "lists the models");

    // Left out, steps and cfg take the fixed values; the fixed values themselves pass.
    for (name, spec) in [
        ("plain", json!({"model": anisora, "prompt": "a cat"})),
        (
            "fixed",
            json!({"model": phr00t, "prompt": "a cat", "steps": 4, "cfg": 1.0}),
        ),
    ] {
        fx.jobs
            .create(&PostParams::default(), &job(name, spec))
            .await?;
    }
    let stored: BTreeSet<String> = fx.list_jobs().await?.iter().map(|j| j.name_any()).collect();
    assert_eq!(stored, BTreeSet::from(["fixed".into(), "plain".into()]));

    // What a user sees from kubectl.
    let manifest = json!({"apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": "kubectl-steps", "namespace": fx.ns.name},
        "spec": {"model": anisora, "prompt": "a cat", "steps": 20}});
    let out = kubectl_apply(&fx, &manifest)?;
    ensure!(!out.status.success(), "kubectl apply succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.steps: must be 8") && stderr.contains("set it to 8"),
        "{stderr}"
    );

    // Four refusals above, kubectl's, and the probes of webhook_effective.
    let metrics = operator.metrics().await?;
    let refused = sample(
        &metrics,
        r#"framelane_admission_decisions_total{lane="",result="denied",reason="invalid_parameters"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= 6.0, "{metrics}");
    Ok(())
}

fn kubectl_apply(fx: &Fixture, manifest: &Value) -> Result<std::process::Output> {
    use std::io::Write;
    let mut child = fx
        .ns
        .env
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(manifest.to_string().as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// `n` concurrent creates; returns how many were admitted, and the refusals. A create the
/// API server throttles (429, before admission: the tests share one control plane) is sent
/// again, as client-go would.
/// How many refusals of each kind: (code, reason, the message's first words).
fn summary(refused: &[Box<kube::core::Status>]) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for s in refused {
        let words: String = s.message.chars().take(100).collect();
        *kinds
            .entry(format!("{} {} {words}", s.code, s.reason))
            .or_default() += 1;
    }
    kinds
}

fn assert_overloaded(refused: &[Box<kube::core::Status>], lane: &str) {
    for status in refused {
        assert_eq!(
            (status.code, status.reason.as_str()),
            (503, "ServiceUnavailable"),
            "{status:?}"
        );
        assert!(
            status.message.contains(&format!(
                "queue_overloaded: lane {lane} holds 25 unfinished jobs and its maxDepth is 25"
            )) && status.message.contains("maxWaitSeconds 3600"),
            "{}",
            status.message
        );
    }
}

async fn delete_all(fx: &Fixture) -> Result<()> {
    fx.jobs
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    eventually(60, "every job to be gone", || async {
        Ok(fx.list_jobs().await?.is_empty().then_some(()))
    })
    .await
}

/// Five bursts of 200 creates against a lane with maxDepth 25: exactly 25 in each.
async fn bursts_admit_exactly_max_depth(s: &Setup, rounds: usize) -> Result<()> {
    let jobs = s.fx.jobs_without_retries().await?;
    for round in 0..rounds {
        let (admitted, refused) = burst(&jobs, &s.anisora, &format!("r{round}"), 200).await;
        assert_eq!(
            (admitted, refused.len()),
            (25, 175),
            "round {round}: {:?}",
            summary(&refused)
        );
        assert_overloaded(&refused, &s.lane);
        assert_eq!(s.fx.list_jobs().await?.len(), 25, "round {round}");
        // The next round starts once the leader has seen the deletions: an empty list from
        // the API server can come before the leader's watch delivers the last of them.
        lane_depth(s, 25).await?;
        delete_all(&s.fx).await?;
        lane_depth(s, 0).await?;
    }
    Ok(())
}

/// Operator flags that leave a lane's status unrefreshed unless something changes.
const NO_RESYNC: &[&str] = &["--lane-resync-seconds", "3600"];

/// Waits until the lane's status (the leader's queue index) counts `depth` jobs. The burst
/// tests' operators refresh a lane's status only hourly when nothing changed
/// ([`NO_RESYNC`]): the depth shows here because each admission and deletion refreshes it.
async fn lane_depth(s: &Setup, depth: i32) -> Result<()> {
    eventually(
        60,
        &format!("lane {} at queueDepth {depth}", s.lane),
        || async {
            let now = s.fx.lane_status(&s.lane).await?.queue_depth;
            Ok((now == depth).then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn a_burst_fills_a_lane_exactly_and_freed_slots_are_taken_at_once() -> Result<()> {
    let s = setup("wh-burst", 25).await?;
    let (operator, port) = s.fx.webhook_operator("a", 0, NO_RESYNC)?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.anisora).await?;
    bursts_admit_exactly_max_depth(&s, 5).await?;

    let no_retries = s.fx.jobs_without_retries().await?;
    let (admitted, refused) = burst(&no_retries, &s.anisora, "full", 200).await;
    assert_eq!(admitted, 25, "{:?}", summary(&refused));
    // Free 5 slots: two jobs fail, three are deleted.
    let jobs = s.fx.list_jobs().await?;
    for job in &jobs[..2] {
        let status = json!({"status": {"phase": "Failed", "reason": "Cancelled", "message": "freed by the test"}});
        s.fx.jobs
            .patch_status(
                &job.name_any(),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(status),
            )
            .await?;
    }
    for job in &jobs[2..5] {
        s.fx.jobs
            .delete(&job.name_any(), &DeleteParams::default())
            .await?;
    }
    eventually(30, "the lane to count 20 unfinished jobs", || async {
        let depth = s.fx.lane_status(&s.lane).await?.queue_depth;
        Ok((depth == 20).then_some(()))
    })
    .await?;
    let (admitted, refused) = burst(&no_retries, &s.anisora, "after", 200).await;
    assert_eq!(
        (admitted, refused.len()),
        (5, 195),
        "{:?}",
        summary(&refused)
    );
    assert_overloaded(&refused, &s.lane);

    let metrics = operator.metrics().await?;
    let line = format!(
        r#"framelane_admission_decisions_total{{lane="{}",result="denied",reason="queue_overloaded"}} {}"#,
        s.lane,
        175 * 5 + 175 + 195
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    assert!(metrics.contains("framelane_webhook_duration_seconds_bucket"));
    Ok(())
}

#[tokio::test]
async fn a_duplicate_create_is_answered_409_and_takes_no_slot() -> Result<()> {
    let s = setup("wh-dup", 2).await?;
    let (_operator, port) = s.fx.webhook_operator("a", 0, NO_RESYNC)?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.anisora).await?;
    let jobs = s.fx.jobs_without_retries().await?;
    let new = |name: &str| job(name, json!({"model": s.anisora, "prompt": "a fox"}));
    let exists = |status: &kube::core::Status| {
        (status.code, status.reason.as_str()) == (409, "AlreadyExists")
    };
    jobs.create(&PostParams::default(), &new("a")).await?;
    lane_depth(&s, 1).await?;
    let again = refusal(&jobs, &new("a")).await?;
    ensure!(exists(&again), "a duplicate create: {again:?}");
    // The duplicate held no slot: the lane's second one is still free.
    jobs.create(&PostParams::default(), &new("b")).await?;
    lane_depth(&s, 2).await?;
    // On the full lane a duplicate still learns that its job exists, a new job that the
    // lane is full.
    let again = refusal(&jobs, &new("a")).await?;
    ensure!(
        exists(&again),
        "a duplicate create on a full lane: {again:?}"
    );
    let full = refusal(&jobs, &new("c")).await?;
    ensure!(full.code == 503, "a create on a full lane: {full:?}");
    Ok(())
}

#[tokio::test]
async fn two_replicas_behind_one_address_admit_exactly_max_depth() -> Result<()> {
    let s = setup("wh-replicas", 25).await?;
    let (a, port_a) = s.fx.webhook_operator("a", 0, NO_RESYNC)?;
    a.until_leading().await?;
    let (b, port_b) = s.fx.webhook_operator("b", 0, NO_RESYNC)?;
    b.until_ready().await?;
    let service = RoundRobin::start(&[(&b, port_b), (&a, port_a)]).await?;
    s.fx.register_webhook(service.port).await?;
    s.fx.webhook_effective(&s.anisora).await?;
    bursts_admit_exactly_max_depth(&s, 2).await?;

    // The API server speaks HTTP/2 to the webhook and may send everything over the one
    // connection the round robin gave to either replica. Send it all to the standby now:
    // it answers every review by handing the depth decision to the leader.
    let served =
        |metrics: &str| sample(metrics, "framelane_webhook_duration_seconds_count").unwrap_or(0.0);
    let before = served(&b.metrics().await?);
    s.fx.point_webhook(port_b).await?;
    s.fx.webhook_effective(&s.anisora).await?;
    bursts_admit_exactly_max_depth(&s, 3).await?;
    let standby = b.metrics().await?;
    assert_eq!(sample(&standby, "framelane_leader"), Some(0.0), "{standby}");
    let answered = served(&standby) - before;
    assert!(
        answered >= 500.0,
        "the standby answered only {answered} of the 600 creates"
    );
    drop((a, b));
    Ok(())
}

#[tokio::test]
async fn a_namespace_gets_its_share_of_a_lane_and_others_still_get_in() -> Result<()> {
    let fx = Fixture::new("wh-share").await?;
    let model = fx.model("anisora", 8, None).await?;
    let lane = fx
        .lane(
            "anisora",
            &[&model],
            json!({"queue": {"maxDepth": 20, "maxPerNamespace": 5, "maxWaitSeconds": 3600}}),
        )
        .await?;
    let other = framelane_testenv::TestEnv::get()?
        .namespace("wh-share-other")
        .await?;
    let (a, port_a) = fx.webhook_operator_watching_all("a", 0, NO_RESYNC)?;
    a.until_leading().await?;
    let (b, port_b) = fx.webhook_operator_watching_all("b", 0, NO_RESYNC)?;
    b.until_ready().await?;
    let service = RoundRobin::start(&[(&b, port_b), (&a, port_a)]).await?;
    let both = json!({"namespaceSelector": {"matchLabels": null, "matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [fx.ns.name, other.name]}]}});
    fx.register_webhook_with(service.port, both).await?;
    fx.webhook_effective(&model).await?;

    let mine = fx.jobs_without_retries().await?;
    let (admitted, refused) = burst(&mine, &model, "mine", 40).await;
    assert_eq!(
        (admitted, refused.len()),
        (5, 35),
        "{:?}",
        summary(&refused)
    );
    for status in &refused {
        assert_eq!(status.code, 503);
        assert!(
            status.message.contains(&format!(
                "queue_overloaded: namespace {} holds 5 unfinished jobs of lane {lane}, its share (maxPerNamespace 5)",
                fx.ns.name
            )),
            "{}",
            status.message
        );
    }
    let theirs = Api::<VideoJob>::namespaced(mine.clone().into_client(), &other.name);
    let (admitted, refused) = burst(&theirs, &model, "theirs", 40).await;
    assert_eq!(
        (admitted, refused.len()),
        (5, 35),
        "another namespace gets its own share: {:?}",
        summary(&refused)
    );
    eventually(60, "the lane at queueDepth 10", || async {
        Ok((fx.lane_status(&lane).await?.queue_depth == 10).then_some(()))
    })
    .await?;
    let metrics = a.metrics().await?;
    let refusals = format!(
        r#"framelane_admission_decisions_total{{lane="{lane}",result="denied",reason="namespace_share"}}"#
    );
    assert_eq!(sample(&metrics, &refusals), Some(70.0), "{metrics}");
    drop(b);
    Ok(())
}

#[tokio::test]
async fn with_the_webhook_down_creates_fail_clearly_and_nothing_stored_changes() -> Result<()> {
    let s = setup("wh-down", 25).await?;
    let (mut operator, port) = s.fx.webhook_operator("a", 0, &[])?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.anisora).await?;
    for name in ["kept-1", "kept-2"] {
        s.fx.jobs
            .create(
                &PostParams::default(),
                &job(name, json!({"model": s.anisora, "prompt": "kept"})),
            )
            .await?;
    }
    // Let the (leaderless from now on) jobs settle, then take the webhook away.
    eventually(30, "both jobs to be Queued", || async {
        let jobs = s.fx.list_jobs().await?;
        Ok(jobs
            .iter()
            .all(|j| support::phase(j) == Some(framelane_api::videojob::JobPhase::Queued))
            .then_some(()))
    })
    .await?;
    let before: Vec<(String, String)> =
        s.fx.list_jobs()
            .await?
            .iter()
            .map(|j| (j.name_any(), j.resource_version().unwrap_or_default()))
            .collect();
    operator.kill();

    let refused =
        s.fx.jobs
            .create(
                &PostParams::default(),
                &job("while-down", json!({"model": s.anisora, "prompt": "x"})),
            )
            .await;
    let Err(kube::Error::Api(status)) = refused else {
        anyhow::bail!("a create succeeded with the webhook down: {refused:?}");
    };
    // The mutating webhook (defaults) is called first and fails first.
    assert!(
        status
            .message
            .contains("failed calling webhook \"defaults.videojobs.framelane.dev\""),
        "{}",
        status.message
    );
    let after: Vec<(String, String)> =
        s.fx.list_jobs()
            .await?
            .iter()
            .map(|j| (j.name_any(), j.resource_version().unwrap_or_default()))
            .collect();
    assert_eq!(before, after, "stored jobs are untouched");

    let (_operator, _) = s.fx.webhook_operator("b", port, &[])?;
    eventually(60, "creates to succeed again", || async {
        let job = job("after-restart", json!({"model": s.anisora, "prompt": "x"}));
        Ok(s.fx.jobs.create(&PostParams::default(), &job).await.ok())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_empty_secret_made_by_the_chart_is_filled_and_serves_the_webhook() -> Result<()> {
    let s = setup("wh-empty-secret", 25).await?;
    // What `helm install` creates, so that `helm uninstall` removes it: an Opaque Secret
    // without data.
    let secrets: Api<Secret> = Api::namespaced(s.fx.client.clone(), &s.fx.ns.name);
    let empty: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "framelane-webhook-tls", "labels": {"app.kubernetes.io/managed-by": "Helm"}},
        "type": "Opaque"}))?;
    let created = secrets.create(&PostParams::default(), &empty).await?;
    // Two replicas start at once: one fills the Secret, the other reads what it wrote.
    // (100-second certificates: the leader checks the Secret every 10 s.)
    let short = ["--webhook-cert-seconds", "100"];
    let (_a, port) = s.fx.webhook_operator("a", 0, &short)?;
    let (_b, _) = s.fx.webhook_operator("b", 0, &short)?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.anisora).await?;

    let filled = secrets.get("framelane-webhook-tls").await?;
    assert_eq!(filled.type_.as_deref(), Some("Opaque"), "the type stays");
    assert_eq!(
        filled.uid(),
        created.uid(),
        "the chart's Secret, not a new one"
    );
    assert_eq!(
        filled
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("Helm")
    );
    let data = filled.data.unwrap_or_default();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
    let configuration = Api::<ValidatingWebhookConfiguration>::all(s.fx.client.clone())
        .get(&s.fx.webhook_configuration())
        .await?;
    assert_eq!(
        configuration.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .as_ref(),
        Some(&data["ca.crt"]),
        "the API server trusts the CA the operator wrote into the chart's Secret"
    );
    let refused = refusal(
        &s.fx.jobs,
        &job(
            "steps",
            json!({"model": s.anisora, "prompt": "a cat", "steps": 20}),
        ),
    )
    .await?;
    assert_eq!(refused.code, 422);

    // An admin deletes the Secret to force new certificates: the leader makes it again under
    // a new CA, publishes that CA, and both replicas serve the new certificate.
    secrets
        .delete("framelane-webhook-tls", &DeleteParams::default())
        .await?;
    let remade = eventually(60, "the webhook Secret to be made again", || async {
        let Some(secret) = secrets.get_opt("framelane-webhook-tls").await? else {
            return Ok(None);
        };
        let data = secret.data.unwrap_or_default();
        Ok(data.contains_key("tls.key").then_some(data))
    })
    .await?;
    assert_ne!(remade["ca.crt"], data["ca.crt"], "a new CA");
    let configurations = Api::<ValidatingWebhookConfiguration>::all(s.fx.client.clone());
    eventually(30, "the new CA in caBundle", || async {
        let configuration = configurations.get(&s.fx.webhook_configuration()).await?;
        let bundle = configuration.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone();
        Ok((bundle.as_ref() == Some(&remade["ca.crt"])).then_some(()))
    })
    .await?;
    eventually(
        30,
        "a wrong job refused over the new certificate",
        || async {
            let wrong = job(
                "steps-again",
                json!({"model": s.anisora, "prompt": "a cat", "steps": 20}),
            );
            Ok(
                match s.fx.jobs.create(&PostParams::default(), &wrong).await {
                    Err(kube::Error::Api(status)) if status.code == 422 => Some(()),
                    _ => None,
                },
            )
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn certificates_rotate_during_a_stream_of_creates_without_a_failed_request() -> Result<()> {
    let s = setup("wh-rotate", 25).await?;
    // Serving certificates live 6 s (renewed every ~4 s), the CA 24 s (renewed every ~16 s).
    let (_operator, port) = s.fx.webhook_operator(
        "a",
        0,
        &["--webhook-cert-seconds", "6", "--webhook-ca-seconds", "24"],
    )?;
    s.fx.register_webhook(port).await?;
    s.fx.webhook_effective(&s.anisora).await?;

    let secrets: Api<Secret> = Api::namespaced(s.fx.client.clone(), &s.fx.ns.name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let watch = async {
        let (mut certs, mut cas) = (BTreeSet::new(), BTreeSet::new());
        while tokio::time::Instant::now() < deadline {
            let secret = secrets.get("framelane-webhook-tls").await?;
            let data = secret.data.unwrap_or_default();
            let text = |k: &str| String::from_utf8_lossy(&data[k].0).to_string();
            certs.insert(text("tls.crt"));
            let current_ca = text("ca.crt");
            cas.insert(
                current_ca
                    .split("-----END")
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::Ok((certs, cas))
    };
    let no_retries = s.fx.jobs_without_retries().await?;
    let stream = create_until(&no_retries, &s.anisora, "rotation", deadline);
    let (watched, total) = tokio::join!(watch, stream);
    let (certs, cas) = watched?;
    let total = total?;
    assert!(total > 100, "only {total} creates in 40 s");
    assert!(
        certs.len() >= 5,
        "{} serving certificates in 40 s",
        certs.len()
    );
    assert!(cas.len() >= 2, "{} CAs in 40 s", cas.len());
    println!(
        "{total} creates, none failed, across {} serving certificates and {} CAs",
        certs.len(),
        cas.len()
    );
    Ok(())
}

/// The certificate the webhook on `port` presents (DER), verified against `ca` for
/// 127.0.0.1, as the API server verifies it.
async fn served_certificate(port: u16, ca: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    Ok(chain.first().context("no certificate presented")?.to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// The Secret as cert-manager writes it: type kubernetes.io/tls, the serving pair and (when
/// its issuer has one) the CA; never a CA key.
fn cert_manager_secret(keys: &[(&str, &str)]) -> Result<Secret> {
    let data: serde_json::Map<String, Value> = keys
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    Ok(serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "framelane-webhook-tls",
            "annotations": {"cert-manager.io/certificate-name": "framelane-webhook"}},
        "type": "kubernetes.io/tls", "stringData": data}),
    )?)
}

#[tokio::test]
async fn certificates_from_cert_manager_are_served_and_reloaded_without_a_failed_request()
-> Result<()> {
    let s = setup("wh-external", 25).await?;
    let ns = s.fx.ns.name.clone();
    let secrets: Api<Secret> = Api::namespaced(s.fx.client.clone(), &ns);
    let day = Duration::from_secs(86_400);
    let policy = Policy::for_service("framelane-webhook", &ns, day * 365, day);
    let now = jiff::Timestamp::now().as_second();
    let issued = Material::generate(&policy, now)?;

    // Before cert-manager has issued anything: not ready, and the log says what is missing.
    let (operator, port) =
        s.fx.webhook_operator("a", 0, &["--webhook-certificates", "external"])?;
    operator
        .until_logged(&format!(
            "the webhook Secret {ns}/framelane-webhook-tls does not exist; the webhook is not ready until it has ca.crt, tls.crt and tls.key"
        ))
        .await?;
    ensure!(!operator.ready().await?, "ready without a certificate");
    // A Secret without ca.crt is not enough: the forwarder to the leader trusts ca.crt.
    secrets
        .create(
            &PostParams::default(),
            &cert_manager_secret(&[("tls.crt", &issued.cert), ("tls.key", &issued.key)])?,
        )
        .await?;
    operator
        .until_logged(&format!(
            "the webhook Secret {ns}/framelane-webhook-tls is unusable: it lacks ca.crt"
        ))
        .await?;
    ensure!(!operator.ready().await?, "ready without ca.crt");

    // cert-manager completes the Secret; its cainjector sets the caBundle.
    let full = |m: &Material| {
        cert_manager_secret(&[
            ("ca.crt", &m.ca_bundle),
            ("tls.crt", &m.cert),
            ("tls.key", &m.key),
        ])
    };
    let mut secret = secrets.get("framelane-webhook-tls").await?;
    secret.string_data = full(&issued)?.string_data;
    secrets
        .replace("framelane-webhook-tls", &PostParams::default(), &secret)
        .await?;
    s.fx.register_webhook(port).await?;
    s.fx.set_ca_bundle(&issued.ca_bundle).await?;
    operator.until_ready().await?;
    s.fx.webhook_effective(&s.anisora).await?;
    let refused = refusal(
        &s.fx.jobs,
        &job(
            "steps",
            json!({"model": s.anisora, "prompt": "a cat", "steps": 20}),
        ),
    )
    .await?;
    assert_eq!(refused.code, 422);
    s.fx.jobs
        .create(
            &PostParams::default(),
            &job("admitted", json!({"model": s.anisora, "prompt": "a cat"})),
        )
        .await?;
    let serving_expiry = |metrics: String| {
        sample(
            &metrics,
            r#"framelane_webhook_certificate_expiry_timestamp_seconds{certificate="serving"}"#,
        )
    };
    assert_eq!(
        serving_expiry(operator.metrics().await?),
        Some(issued.serving()?.not_after as f64)
    );
    assert_eq!(
        served_certificate(port, &issued.ca_bundle).await?,
        der(&issued.cert)
    );

    // cert-manager renews the serving certificate under the same CA while creates go on (a
    // Certificate whose duration grew from one day to four: due at once).
    let longer = Policy {
        cert_validity: day * 4,
        ..policy.clone()
    };
    let (renewed, what) = issued
        .rotate(&longer, jiff::Timestamp::now().as_second(), true)?
        .context("a renewal is due with less than a third of the life left")?;
    assert_eq!(what, certs::Rotation::Certificate);
    let no_retries = s.fx.jobs_without_retries().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    let stream = create_until(&no_retries, &s.anisora, "renewal", deadline);
    let renew = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut secret = secrets.get("framelane-webhook-tls").await?;
        secret.data = None;
        secret.string_data = full(&renewed)?.string_data;
        secrets
            .replace("framelane-webhook-tls", &PostParams::default(), &secret)
            .await?;
        let expected = renewed.serving()?.not_after as f64;
        eventually(10, "the renewed certificate to be loaded", || async {
            Ok((serving_expiry(operator.metrics().await?) == Some(expected)).then_some(()))
        })
        .await
    };
    let (renewed_in_time, total) = tokio::join!(renew, stream);
    renewed_in_time?;
    let total = total?;
    assert!(total > 20, "only {total} creates in 12 s");
    assert_ne!(renewed.serving()?.not_after, issued.serving()?.not_after);
    assert_eq!(
        served_certificate(port, &issued.ca_bundle).await?,
        der(&renewed.cert),
        "new handshakes get the renewed certificate"
    );

    // The operator wrote neither the Secret nor the caBundle.
    let data = secrets
        .get("framelane-webhook-tls")
        .await?
        .data
        .unwrap_or_default();
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    assert_eq!(data["tls.crt"].0, renewed.cert.as_bytes());
    let configuration = Api::<ValidatingWebhookConfiguration>::all(s.fx.client.clone())
        .get(&s.fx.webhook_configuration())
        .await?;
    assert_eq!(
        configuration.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice()),
        Some(issued.ca_bundle.as_bytes())
    );
    assert!(
        !operator
            .log_text()
            .contains("published the webhook CA bundle"),
        "{}",
        operator.log_text()
    );
    Ok(())
}

/// Four workers creating (server-side dry run, no retries) jobs of `model` until `deadline`:
/// how many creates succeeded, or the first that failed.
async fn create_until(
    jobs: &Api<VideoJob>,
    model: &str,
    prompt: &str,
    deadline: tokio::time::Instant,
) -> Result<usize> {
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let workers = (0..4).map(|worker| {
        let dry_run = &dry_run;
        async move {
            let mut done = 0;
            while tokio::time::Instant::now() < deadline {
                let job = job(
                    &format!("w{worker}-{done}"),
                    json!({"model": model, "prompt": prompt}),
                );
                jobs.create(dry_run, &job)
                    .await
                    .map_err(|e| anyhow::anyhow!("create {done} of worker {worker}: {e}"))?;
                done += 1;
            }
            anyhow::Ok(done)
        }
    });
    let mut total = 0;
    for created in join_all(workers).await {
        total += created?;
    }
    Ok(total)
}
