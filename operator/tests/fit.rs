//! The fit check at admission on the real local control plane: runners report their GPU
//! memory in their heartbeat Lease (`framelane.dev/memory`), and the webhook refuses a job
//! whose estimated peak does not fit its lane's runners with a 422 naming the limit and the
//! largest size that fits.

mod support;

use anyhow::{Result, ensure};
use framelane_api::{
    VideoJob,
    modellane::{MemoryMode, VaeTiling},
    videojob::JobPhase,
    wellknown::{ANNOTATION_MEMORY, LABEL_LANE, LABEL_RUNNER},
};
use framelane_core::memory::{ANNOTATION_VERSION, ModelProfile, RunnerMemory, usable_bytes};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
};
use serde_json::json;
use support::{Fixture, OperatorProcess, eventually, job, phase};

fn sized(name: &str, model: &str, width: i32, height: i32, frames: i32) -> VideoJob {
    job(
        name,
        json!({"model": model, "prompt": "a cat", "width": width, "height": height, "frames": frames}),
    )
}

/// An A14B model on a resident lane, behind a webhook operator.
async fn resident_lane(prefix: &str) -> Result<(Fixture, String, String, OperatorProcess)> {
    let fx = Fixture::new(prefix).await?;
    let model = fx.model("a14b", 4, None).await?;
    let lane = fx
        .lane(
            "a14b",
            &[&model],
            json!({"runner": {"memory": {"mode": "resident"}}}),
        )
        .await?;
    let (operator, port) = fx.webhook_operator("a", 0, &[])?;
    fx.register_webhook(port).await?;
    fx.webhook_effective(&model).await?;
    Ok((fx, model, lane, operator))
}

/// A heartbeat Lease of `lane` made by hand, its memory report `memory`, renewed at
/// `renewed` for `seconds`.
async fn heartbeat(
    fx: &Fixture,
    name: &str,
    lane: &str,
    memory: String,
    renewed: jiff::Timestamp,
    seconds: i32,
) -> Result<()> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [
                    (LABEL_LANE.to_owned(), lane.to_owned()),
                    (LABEL_RUNNER.to_owned(), "true".to_owned()),
                ]
                .into(),
            ),
            annotations: Some([(ANNOTATION_MEMORY.to_owned(), memory)].into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.into()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }),
    };
    Api::<Lease>::namespaced(fx.client.clone(), &fx.ns.name)
        .create(&PostParams::default(), &lease)
        .await?;
    Ok(())
}

async fn until_queued(fx: &Fixture, name: &str) -> Result<()> {
    eventually(30, "the job to be Queued", || async {
        Ok((phase(&fx.jobs.get(name).await?) == Some(JobPhase::Queued)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn a_job_too_large_for_the_lanes_gpu_is_refused_with_the_limit_and_what_fits() -> Result<()> {
    let (fx, model, lane, _operator) = resident_lane("fit-refuse").await?;

    // Before any runner reported, the job is admitted: its runner checks it.
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("early", &model, 1280, 720, 81),
        )
        .await?;
    until_queued(&fx, "early").await?;

    let _runner = fx.memory_runner(
        "runner-0",
        &lane,
        &model,
        MemoryMode::Resident,
        VaeTiling::Off,
    );
    fx.until_ready_runners(&lane, 1).await?;
    let refused = match fx
        .jobs
        .create(
            &PostParams::default(),
            &sized("large", &model, 1280, 720, 81),
        )
        .await
    {
        Err(kube::Error::Api(status)) => status,
        other => anyhow::bail!("1280x720x81 was not refused: {other:?}"),
    };
    assert_eq!((refused.code, refused.reason.as_str()), (422, "Invalid"));
    let message = &refused.message;
    for part in [
        "to decode 1280x720x81 in memory mode resident",
        &format!("lane {lane}'s runners have 75.5 GiB usable"),
        "the largest that fit: ",
        "(spec.width: ",
    ] {
        ensure!(message.contains(part), "{part:?} is not in {message:?}");
    }
    let causes = &refused.details.as_ref().expect("details").causes;
    assert_eq!(causes.len(), 1, "{causes:?}");
    assert_eq!(causes[0].field, "spec.width");
    ensure!(
        fx.jobs.get_opt("large").await?.is_none(),
        "the job is not created"
    );

    // The size the refusal offers is admitted and queued.
    let offered = message
        .split("the largest that fit: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("a size WxHxF");
    let [w, h, f]: [i32; 3] = offered
        .split('x')
        .map(|n| n.parse().expect("a number"))
        .collect::<Vec<_>>()
        .try_into()
        .expect("three numbers");
    assert!(w < 1280 && h < 720 && f == 81, "{offered}");
    fx.jobs
        .create(&PostParams::default(), &sized("offered", &model, w, h, f))
        .await?;
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("default", &model, 832, 480, 81),
        )
        .await?;
    until_queued(&fx, "offered").await?;
    until_queued(&fx, "default").await?;
    Ok(())
}

#[tokio::test]
async fn a_lane_that_tiles_when_needed_admits_what_only_fits_tiled() -> Result<()> {
    let (fx, model, lane, _operator) = resident_lane("fit-tiles").await?;
    // All resident on 80 GiB, 1280x720x81 decodes only in tiles: an `auto` runner (the
    // default) tiles that job and admits it.
    let _auto = fx.memory_runner(
        "runner-0",
        &lane,
        &model,
        MemoryMode::Resident,
        VaeTiling::Auto,
    );
    fx.until_ready_runners(&lane, 1).await?;
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("auto", &model, 1280, 720, 81),
        )
        .await?;
    until_queued(&fx, "auto").await?;
    // With an `off` runner beside it (either may claim the job), it is refused.
    let _off = fx.memory_runner(
        "runner-1",
        &lane,
        &model,
        MemoryMode::Resident,
        VaeTiling::Off,
    );
    fx.until_ready_runners(&lane, 2).await?;
    let refused = fx
        .jobs
        .create(&PostParams::default(), &sized("off", &model, 1280, 720, 81))
        .await
        .err();
    ensure!(
        matches!(&refused, Some(kube::Error::Api(s)) if s.code == 422
            && s.message.contains("to decode 1280x720x81 in memory mode resident;")),
        "an untiled runner refuses 1280x720x81: {refused:?}"
    );
    Ok(())
}

#[tokio::test]
async fn model_offload_admits_what_the_same_gpu_refuses_resident() -> Result<()> {
    let fx = Fixture::new("fit-modes").await?;
    // The same model twice, each with its lane: one resident, one offloading.
    let resident_model = fx.model("a14b-resident", 4, None).await?;
    let offload_model = fx.model("a14b-offload", 4, None).await?;
    let resident = fx
        .lane(
            "resident",
            &[&resident_model],
            json!({"runner": {"memory": {"mode": "resident"}}}),
        )
        .await?;
    let offload = fx
        .lane(
            "offload",
            &[&offload_model],
            json!({"runner": {"memory": {"mode": "modelOffload"}}}),
        )
        .await?;
    let (_operator, port) = fx.webhook_operator("a", 0, &[])?;
    fx.register_webhook(port).await?;
    fx.webhook_effective(&resident_model).await?;
    let _resident = fx.memory_runner(
        "resident-0",
        &resident,
        &resident_model,
        MemoryMode::Resident,
        VaeTiling::Off,
    );
    let _offload = fx.memory_runner(
        "offload-0",
        &offload,
        &offload_model,
        MemoryMode::ModelOffload,
        VaeTiling::Off,
    );
    fx.until_ready_runners(&resident, 1).await?;
    fx.until_ready_runners(&offload, 1).await?;

    let status = fx
        .jobs
        .create(
            &PostParams::default(),
            &sized("resident", &resident_model, 1280, 720, 81),
        )
        .await
        .err();
    ensure!(
        matches!(&status, Some(kube::Error::Api(s)) if s.code == 422 && s.message.contains("memory mode resident")),
        "resident refuses 1280x720x81: {status:?}"
    );
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("offload", &offload_model, 1280, 720, 81),
        )
        .await?;
    until_queued(&fx, "offload").await?;
    assert_eq!(
        fx.jobs.get("offload").await?.status.and_then(|s| s.lane),
        Some(offload)
    );
    Ok(())
}

#[tokio::test]
async fn a_job_moves_only_to_a_fallback_lane_whose_runners_fit_it() -> Result<()> {
    let fx = Fixture::new("fit-fallback").await?;
    let model = fx.model("a14b", 4, None).await?;
    // The fallback lane's runner: 80 GiB, resident, the VAE untiled (1280x720x81 does not
    // fit, 832x480x81 does). The job's own lane has no runner.
    let shared = fx
        .lane(
            "shared",
            &[&model],
            json!({"mode": "Shared", "runner": {"memory": {"mode": "resident", "vaeTiling": "off"}}}),
        )
        .await?;
    let own = fx
        .lane(
            "a14b",
            &[&model],
            json!({"fallback": {"lane": shared}, "queue": {"maxWaitSeconds": 2}}),
        )
        .await?;
    let _runner = fx.memory_runner(
        "shared-0",
        &shared,
        &model,
        MemoryMode::Resident,
        VaeTiling::Off,
    );
    let _operator = OperatorProcess::start(&fx.ns, "op", &[])?;
    fx.until_ready_runners(&shared, 1).await?;
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("large", &model, 1280, 720, 81),
        )
        .await?;
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("default", &model, 832, 480, 81),
        )
        .await?;
    let large = eventually(30, "the large job to time out", || async {
        let job = fx.jobs.get("large").await?;
        Ok((phase(&job) == Some(JobPhase::Failed)).then_some(job))
    })
    .await?;
    let status = large.status.unwrap();
    assert_eq!(status.lane.as_deref(), Some(own.as_str()), "it never moved");
    let message = status.message.unwrap_or_default();
    for part in [
        &format!("its fallback lane {shared} cannot run it ("),
        "to decode 1280x720x81 in memory mode resident",
    ] {
        ensure!(message.contains(part), "{part:?} is not in {message:?}");
    }
    eventually(30, "the default job moved to the fallback lane", || async {
        let job = fx.jobs.get("default").await?;
        let status = job.status.unwrap_or_default();
        Ok((status.lane.as_deref() == Some(shared.as_str())).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_stale_heartbeat_refuses_nothing() -> Result<()> {
    let (fx, model, lane, _operator) = resident_lane("fit-stale").await?;
    // A runner on a 24 GiB GPU that stopped an hour ago, started by hand: nothing deleted
    // its Lease.
    const GIB: u64 = 1 << 30;
    let small = RunnerMemory {
        v: ANNOTATION_VERSION,
        device_bytes: 24 * GIB,
        budget_bytes: usable_bytes(24 * GIB),
        mode: MemoryMode::Resident,
        vae_tiling: VaeTiling::Off,
        models: [(model.clone(), ModelProfile::wan22_a14b_i2v())].into(),
    };
    let an_hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    heartbeat(&fx, "gone-0", &lane, small.to_annotation(), an_hour_ago, 15).await?;
    // A live runner on an 80 GiB GPU: once the lane counts it, the operator has read both
    // Leases (one watch, in order).
    let _runner = fx.memory_runner(
        "runner-0",
        &lane,
        &model,
        MemoryMode::Resident,
        VaeTiling::Off,
    );
    fx.until_ready_runners(&lane, 1).await?;
    // 832x480x81 fits 80 GiB resident, not 24 GiB: only the live runner counts.
    fx.jobs
        .create(
            &PostParams::default(),
            &sized("default", &model, 832, 480, 81),
        )
        .await?;
    until_queued(&fx, "default").await?;
    Ok(())
}

#[tokio::test]
async fn a_malformed_memory_annotation_does_not_break_admission() -> Result<()> {
    let fx = Fixture::new("fit-malformed").await?;
    let model = fx.model("a14b", 4, None).await?;
    let lane = fx.lane("a14b", &[&model], json!({})).await?;
    let (operator, port) = fx.webhook_operator("a", 0, &[])?;
    fx.register_webhook(port).await?;
    fx.webhook_effective(&model).await?;
    // A heartbeat Lease with an unreadable report, fresh, so the lane counts it as a runner
    // once the operator has read it.
    let unreadable = "{\"v\": 1, ".to_owned();
    heartbeat(
        &fx,
        "broken-0",
        &lane,
        unreadable,
        jiff::Timestamp::now(),
        3600,
    )
    .await?;
    fx.until_ready_runners(&lane, 1).await?;
    let created = fx
        .jobs
        .create(
            &PostParams::default(),
            &sized("large", &model, 1280, 720, 81),
        )
        .await?;
    assert_eq!(created.name_any(), "large");
    until_queued(&fx, "large").await?;
    ensure!(
        operator
            .log_text()
            .contains("ignoring the runner's unreadable framelane.dev/memory annotation"),
        "the operator says why it ignored the report"
    );
    Ok(())
}
