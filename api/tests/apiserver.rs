//! The API types as the real kube-apiserver of the local control plane serves them: the CRDs
//! install, valid objects round-trip, every schema rule rejects bad input with a message
//! naming the field, a VideoJob's spec cannot change, and kubectl shows the printer columns
//! and the field documentation.

use std::{fs, path::Path, process::Output, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use framelane_api::{ModelLane, VideoJob, VideoModel};
use framelane_testenv::TestEnv;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// Objects from `examples/`, so the samples a user applies are proven valid too.
fn example(file: &str, name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(file);
    let text = fs::read_to_string(&path).expect("example file exists");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(doc).unwrap()).unwrap()
        })
        .find(|obj| obj["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{} has no object named {name}", path.display()))
}

use serde::Deserialize as _;

/// A name no other test run uses, for cluster-scoped objects.
/// The label that keeps a tests' lane from the operator of `just up` (its lane selector leaves
/// these out), so it creates no runner pods for it and writes no status over the test's.
fn tests_own(name: &str) -> std::collections::BTreeMap<String, String> {
    [("framelane.dev/test-instance".to_string(), name.to_string())].into()
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn dynamic<K: Resource<DynamicType = ()>>(
    client: kube::Client,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<K>(&());
    match ns {
        Some(ns) => Api::namespaced_with(client, ns, &ar),
        None => Api::all_with(client, &ar),
    }
}

/// Creates `obj` and expects the API server to refuse it as Invalid (422) with a cause on
/// `field` whose message contains `hint`.
async fn expect_invalid(
    api: &Api<DynamicObject>,
    obj: Value,
    field: &str,
    hint: &str,
) -> Result<()> {
    let obj: DynamicObject = serde_json::from_value(obj)?;
    let status = match api.create(&PostParams::default(), &obj).await {
        Ok(_) => bail!("the API server accepted an object that breaks `{field}` ({hint})"),
        Err(kube::Error::Api(status)) => status,
        Err(e) => return Err(e.into()),
    };
    ensure!(
        status.code == 422,
        "expected 422 for `{field}`, got {}: {}",
        status.code,
        status.message
    );
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.clone())
        .unwrap_or_default();
    ensure!(
        causes
            .iter()
            .any(|c| c.field == field && c.message.contains(hint)),
        "no cause on `{field}` mentioning {hint:?}; the API server said: {}",
        status.message
    );
    ensure!(
        status.message.contains(field),
        "message does not name `{field}`: {}",
        status.message
    );
    Ok(())
}

fn with(mut obj: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    let target = obj
        .pointer_mut(parent)
        .expect("parent exists in the example");
    match value {
        Value::Null => {
            target.as_object_mut().unwrap().remove(key);
        }
        v => target[key] = v,
    }
    obj
}

fn stdout(out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test]
async fn crds_install_and_become_established() -> Result<()> {
    let env = TestEnv::get()?;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client().await?);
    for (_, crd) in framelane_api::crds::all() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("framelane-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        let mut established = false;
        for _ in 0..60 {
            let got = crds.get(&name).await?;
            let conditions = got.status.and_then(|s| s.conditions).unwrap_or_default();
            if conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
            {
                established = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        ensure!(established, "CRD {name} never became Established");
    }
    Ok(())
}

#[tokio::test]
async fn valid_objects_of_each_kind_round_trip() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("roundtrip").await?;
    let client = env.client().await?;

    let mut model: VideoModel = serde_json::from_value(example("videomodels.yaml", "phr00t"))?;
    model.metadata.name = Some(unique("phr00t"));
    let models: Api<VideoModel> = Api::all(client.clone());
    let created = models.create(&PostParams::default(), &model).await?;
    assert_eq!(
        created.spec, model.spec,
        "VideoModel spec changed on the way through the API server"
    );
    assert_eq!(created.spec.fixed_parameters.cfg, Some(1.0));

    let mut lane: ModelLane = serde_json::from_value(example("modellanes.yaml", "anisora"))?;
    lane.metadata.name = Some(unique("anisora"));
    lane.metadata.labels = Some(tests_own(lane.metadata.name.as_deref().unwrap_or_default()));
    let lanes: Api<ModelLane> = Api::all(client.clone());
    let created = lanes.create(&PostParams::default(), &lane).await?;
    assert_eq!(
        created.spec, lane.spec,
        "ModelLane spec changed on the way through the API server"
    );

    let job: VideoJob = serde_json::from_value(example("videojob.yaml", "cat-on-beach"))?;
    let jobs: Api<VideoJob> = ns.api();
    let created = jobs.create(&PostParams::default(), &job).await?;
    assert_eq!(
        created.spec, job.spec,
        "VideoJob spec changed on the way through the API server"
    );
    assert!(
        created.status.is_none(),
        "a new VideoJob has no status until the operator writes one"
    );

    // Status is a subresource: written through /status, ignored on the main resource.
    let status = json!({"status": {"phase": "Queued", "lane": "anisora", "queuePosition": 1,
        "progress": {"stage": "Denoising", "step": 3, "totalSteps": 8, "percent": 41}}});
    let patched = jobs
        .patch_status(
            "cat-on-beach",
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    let got = patched.status.context("status after /status patch")?;
    assert_eq!(got.queue_position, Some(1));
    assert_eq!(got.progress.map(|p| p.percent), Some(41));
    let ignored = json!({"status": {"phase": "Failed"}});
    let after = jobs
        .patch(
            "cat-on-beach",
            &PatchParams::default(),
            &Patch::Merge(&ignored),
        )
        .await?;
    assert_eq!(
        after.status.and_then(|s| s.phase),
        Some(framelane_api::videojob::JobPhase::Queued),
        "writing status through the main resource must not change it"
    );

    models
        .delete(&model.name_any(), &Default::default())
        .await?;
    lanes.delete(&lane.name_any(), &Default::default()).await?;
    Ok(())
}

#[tokio::test]
async fn videojob_schema_rules_reject_bad_input_naming_the_field() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("jobschema").await?;
    let api = dynamic::<VideoJob>(env.client().await?, Some(&ns.name));
    let good = with(
        example("videojob.yaml", "cat-on-beach"),
        "/metadata/namespace",
        json!(ns.name),
    );
    let long = |n: usize| json!("x".repeat(n));
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "/spec/width",
            json!(128),
            "spec.width",
            "greater than or equal to 256",
        ),
        ("/spec/width", json!(840), "spec.width", "multiple of 16"),
        (
            "/spec/height",
            json!(8192),
            "spec.height",
            "less than or equal to 4096",
        ),
        ("/spec/height", json!(488), "spec.height", "multiple of 16"),
        ("/spec/frames", json!(80), "spec.frames", "4k+1"),
        (
            "/spec/frames",
            json!(0),
            "spec.frames",
            "greater than or equal to 1",
        ),
        (
            "/spec/prompt",
            json!(""),
            "spec.prompt",
            "at least 1 chars long",
        ),
        (
            "/spec/prompt",
            json!("  \t "),
            "spec.prompt",
            "non-whitespace",
        ),
        (
            "/spec/prompt",
            long(2001),
            "spec.prompt",
            "may not be more than 2000",
        ),
        (
            "/spec/negativePrompt",
            long(1001),
            "spec.negativePrompt",
            "may not be more than 1000",
        ),
        (
            "/spec/seed",
            json!(-2),
            "spec.seed",
            "greater than or equal to -1",
        ),
        (
            "/spec/seed",
            json!(4294967296_i64),
            "spec.seed",
            "less than or equal to 4294967295",
        ),
        (
            "/spec/steps",
            json!(0),
            "spec.steps",
            "greater than or equal to 1",
        ),
        (
            "/spec/cfg",
            json!(-1.0),
            "spec.cfg",
            "greater than or equal to 0",
        ),
        (
            "/spec/fps",
            json!(0),
            "spec.fps",
            "greater than or equal to 1",
        ),
        (
            "/spec/mode",
            json!("v2v"),
            "spec.mode",
            "supported values: \"t2v\", \"i2v\"",
        ),
        (
            "/spec/image",
            Value::Null,
            "spec.image",
            "spec.image is required when mode is i2v",
        ),
        ("/spec/model", Value::Null, "spec.model", "Required value"),
        (
            "/spec/ttlSecondsAfterFinished",
            json!(-1),
            "spec.ttlSecondsAfterFinished",
            "greater than or equal to 0",
        ),
    ];
    for (i, (pointer, value, field, hint)) in cases.into_iter().enumerate() {
        let bad = with(
            with(good.clone(), "/metadata/name", json!(format!("bad-{i}"))),
            pointer,
            value,
        );
        expect_invalid(&api, bad, field, hint)
            .await
            .with_context(|| format!("case {pointer}"))?;
    }
    // The i2v rule is satisfied by an image, and -1 means a random seed.
    let ok = with(
        with(good.clone(), "/spec/mode", json!("i2v")),
        "/spec/image",
        json!("inputs/cat.png"),
    );
    api.create(
        &PostParams::default(),
        &serde_json::from_value(with(ok, "/spec/seed", json!(-1)))?,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn modellane_schema_rules_reject_bad_input_naming_the_field() -> Result<()> {
    let env = TestEnv::get()?;
    let api = dynamic::<ModelLane>(env.client().await?, None);
    let name = unique("lane");
    let good = with(
        with(
            example("modellanes.yaml", "anisora"),
            "/metadata/name",
            json!(name),
        ),
        "/metadata/labels",
        json!(tests_own(&name)),
    );
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "/spec/mode",
            json!("Exclusive"),
            "spec.mode",
            "supported values: \"Dedicated\", \"Shared\"",
        ),
        (
            "/spec/models",
            json!(["anisora", "phr00t"]),
            "spec",
            "a Dedicated lane serves exactly one model",
        ),
        (
            "/spec/models",
            json!([]),
            "spec.models",
            "should have at least 1 items",
        ),
        (
            "/spec/replicas",
            json!(0),
            "spec.replicas",
            "greater than or equal to 1",
        ),
        (
            "/spec/queue/maxDepth",
            json!(0),
            "spec.queue.maxDepth",
            "greater than or equal to 1",
        ),
        (
            "/spec/queue/maxWaitSeconds",
            json!(0),
            "spec.queue.maxWaitSeconds",
            "greater than or equal to 1",
        ),
        (
            "/spec/runner/modelVolume",
            json!({"persistentVolumeClaim": {"claimName": "models"}, "hostPath": {"path": "/models"}}),
            "spec.runner.modelVolume",
            "set exactly one of persistentVolumeClaim, hostPath, nfs or emptyDir",
        ),
        (
            "/spec/fallback/lane",
            json!(name),
            "<nil>",
            "spec.fallback.lane must name another lane",
        ),
        (
            "/metadata/name",
            json!(format!("{name}-{}", "x".repeat(63 - name.len()))),
            "<nil>",
            "metadata.name must be at most 63 characters",
        ),
    ];
    for (pointer, value, field, hint) in cases {
        expect_invalid(&api, with(good.clone(), pointer, value), field, hint)
            .await
            .with_context(|| format!("case {pointer}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn videomodel_schema_rules_reject_bad_input_naming_the_field() -> Result<()> {
    let env = TestEnv::get()?;
    let api = dynamic::<VideoModel>(env.client().await?, None);
    let good = with(
        example("videomodels.yaml", "anisora"),
        "/metadata/name",
        json!(unique("model")),
    );
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "/spec/fixedParameters/steps",
            json!(0),
            "spec.fixedParameters.steps",
            "greater than or equal to 1",
        ),
        (
            "/spec/defaults/width",
            json!(500),
            "spec.defaults.width",
            "multiple of 16",
        ),
        (
            "/spec/defaults/frames",
            json!(80),
            "spec.defaults.frames",
            "4k+1",
        ),
        (
            "/spec/limits/maxFrames",
            json!(49),
            "spec.defaults.frames",
            "must be at most limits.maxFrames: every job that leaves frames out would be refused",
        ),
        (
            "/spec/limits",
            json!({"maxWidth": 640, "maxHeight": 640, "maxFrames": 161}),
            "spec.defaults.width",
            "must be at most limits.maxWidth",
        ),
        (
            "/spec/defaults/height",
            json!(1296),
            "spec.defaults.height",
            "must be at most limits.maxHeight",
        ),
        (
            "/spec/weights/path",
            json!("../etc"),
            "spec.weights.path",
            "relative path inside the model volume",
        ),
        (
            "/spec/weights",
            json!({"format": "comfyui", "file": "phr00t/aio.safetensors"}),
            "spec.weights",
            "format comfyui takes tokenizer and one of file or files",
        ),
        (
            "/spec/weights",
            json!({"format": "comfyui", "files": {"transformer": ["/abs.safetensors"],
                "textEncoder": "t.safetensors", "vae": "v.safetensors"}, "tokenizer": "tok"}),
            "spec.weights.files.transformer",
            "relative paths inside the model volume",
        ),
        (
            "/spec/sampling",
            json!({"solver": "unipc", "schedule": "beta", "shift": 5.0}),
            "spec.sampling",
            "unipc runs on its own shifted flow schedule",
        ),
        (
            "/spec/modes",
            json!([]),
            "spec.modes",
            "should have at least 1 items",
        ),
        (
            "/spec/modes",
            json!(["t2v", "t2v"]),
            "spec.modes[1]",
            "Duplicate value",
        ),
        (
            "/spec/modes",
            json!(["x2v"]),
            "spec.modes[0]",
            "supported values: \"t2v\", \"i2v\"",
        ),
    ];
    for (pointer, value, field, hint) in cases {
        expect_invalid(&api, with(good.clone(), pointer, value), field, hint)
            .await
            .with_context(|| format!("case {pointer}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn videojob_spec_is_immutable_but_labels_are_not() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("immutable").await?;
    let jobs: Api<VideoJob> = ns.api();
    let job: VideoJob = serde_json::from_value(example("videojob.yaml", "cat-on-beach"))?;
    jobs.create(&PostParams::default(), &job).await?;

    let change = json!({"spec": {"prompt": "a dog surfing at dawn"}});
    match jobs
        .patch(
            "cat-on-beach",
            &PatchParams::default(),
            &Patch::Merge(&change),
        )
        .await
    {
        Ok(_) => bail!("the API server let a VideoJob's spec change"),
        Err(kube::Error::Api(s)) => {
            ensure!(s.code == 422, "expected 422, got {}: {}", s.code, s.message);
            ensure!(
                s.message.contains("spec: Invalid value")
                    && s.message.contains("spec is immutable"),
                "unclear refusal: {}",
                s.message
            );
        }
        Err(e) => return Err(e.into()),
    }
    let labels = json!({"metadata": {"labels": {"team": "a"}}});
    let after = jobs
        .patch(
            "cat-on-beach",
            &PatchParams::default(),
            &Patch::Merge(&labels),
        )
        .await?;
    assert_eq!(after.spec.prompt, "a cat surfing at dusk");
    assert_eq!(after.labels().get("team").map(String::as_str), Some("a"));
    Ok(())
}

#[tokio::test]
async fn kubectl_shows_printer_columns_short_names_and_docs() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("kubectl").await?;
    let jobs: Api<VideoJob> = ns.api();
    let job: VideoJob = serde_json::from_value(example("videojob.yaml", "cat-on-beach"))?;
    jobs.create(&PostParams::default(), &job).await?;
    let status = json!({"status": {"phase": "Running", "lane": "anisora",
        "progress": {"stage": "Denoising", "step": 3, "totalSteps": 8, "percent": 41}}});
    jobs.patch_status(
        "cat-on-beach",
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;

    let out = stdout(ns.kubectl().args(["get", "videojobs"]).output()?)?;
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "MODEL", "PHASE", "LANE", "PROGRESS", "AGE"],
        "{out}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["cat-on-beach", "anisora", "Running", "anisora", "41"],
        "{out}"
    );
    let short = stdout(ns.kubectl().args(["get", "vj", "-o", "name"]).output()?)?;
    assert_eq!(short.trim(), "videojob.framelane.dev/cat-on-beach");
    let category = stdout(
        ns.kubectl()
            .args(["get", "framelane", "-o", "name"])
            .output()?,
    )?;
    assert!(
        category.contains("videojob.framelane.dev/cat-on-beach"),
        "{category}"
    );

    let lanes: Api<ModelLane> = Api::all(env.client().await?);
    let mut lane: ModelLane = serde_json::from_value(example("modellanes.yaml", "anisora"))?;
    let name = unique("cols");
    lane.metadata.name = Some(name.clone());
    lane.metadata.labels = Some(tests_own(&name));
    lanes.create(&PostParams::default(), &lane).await?;
    let status = json!({"status": {"phase": "Ready", "readyRunners": 1, "queueDepth": 3,
        "fallback": {"active": true, "cause": "capacity"}}});
    lanes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let out = stdout(env.kubectl().args(["get", "lane", &name]).output()?)?;
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "MODE", "MODELS", "PHASE", "READY", "QUEUE", "FALLBACK", "AGE"
        ],
        "{out}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..7],
        [
            name.as_str(),
            "Dedicated",
            "[\"anisora\"]",
            "Ready",
            "1",
            "3",
            "capacity"
        ],
        "{out}"
    );
    lanes.delete(&name, &Default::default()).await?;

    let explain = stdout(
        env.kubectl()
            .args(["explain", "videojob.spec.steps"])
            .output()?,
    )?;
    assert!(explain.contains("FIELD: steps <integer>"), "{explain}");
    assert!(
        explain.contains("Fixed by the model (anisora: 8, phr00t: 4)"),
        "{explain}"
    );
    let explain = stdout(
        env.kubectl()
            .args(["explain", "modellane.spec.fallback.force"])
            .output()?,
    )?;
    assert!(explain.contains("The manual switch"), "{explain}");
    Ok(())
}

/// A job named `name` for a model no lane serves (so no operator touches it), with `status`
/// written through the status subresource by the admin.
async fn job_with_status(jobs: &Api<VideoJob>, name: &str, status: Value) -> Result<VideoJob> {
    let job: VideoJob = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": name},
        "spec": {"model": "served-by-no-lane", "prompt": "a cat by the sea"},
    }))?;
    jobs.create(&PostParams::default(), &job).await?;
    Ok(write_status(jobs, name, status).await?)
}

/// Replaces the job's whole status, as the operator and the runners do.
async fn write_status(
    jobs: &Api<VideoJob>,
    name: &str,
    status: Value,
) -> Result<VideoJob, kube::Error> {
    let mut job = jobs.get(name).await?;
    job.status = serde_json::from_value(status).map_err(kube::Error::SerdeError)?;
    jobs.replace_status(name, &PostParams::default(), &job)
        .await
}

/// Expects a status write refused as Invalid (422) on `field` with `message`.
fn expect_refused(
    written: Result<VideoJob, kube::Error>,
    field: &str,
    message: &str,
) -> Result<()> {
    framelane_testenv::expect_refused(written, 422, &format!("{field}: Invalid value: {message}"))
}

const QUEUED_AT: &str = "2030-01-02T03:04:05.678901Z";
const FINAL: &str =
    "the job is Succeeded or Failed, and a finished job's status never changes again";
const FORWARD: &str = "status.phase only moves forward (Queued, Running, then Succeeded or Failed; from Running back to Queued only when the operator requeues a lost runner's job) and is never removed";
const QUEUED_AT_FIXED: &str =
    "status.queuedAt is the job's place in its lane's queue: once set it never changes";

#[tokio::test]
async fn a_finished_jobs_status_never_changes_again() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("final").await?;
    let jobs: Api<VideoJob> = ns.api();
    let output = json!({"path": "ns/done/video.mp4", "sizeBytes": 1000, "sha256": "ab",
        "frames": 17, "fps": 16, "width": 256, "height": 256});
    let succeeded = json!({"phase": "Succeeded", "lane": "anisora", "queuedAt": QUEUED_AT,
        "runner": "anisora-0a1b2c-0", "output": output});
    job_with_status(&jobs, "done", succeeded.clone()).await?;
    let mut forged = succeeded.clone();
    forged["output"]["path"] = json!("ns/other/video.mp4");
    expect_refused(write_status(&jobs, "done", forged).await, "status", FINAL)?;
    let mut failed = succeeded.clone();
    failed["phase"] = json!("Failed");
    expect_refused(write_status(&jobs, "done", failed).await, "status", FINAL)?;

    let failed = json!({"phase": "Failed", "lane": "anisora", "queuedAt": QUEUED_AT,
        "reason": "QueueWaitTimeout", "message": "waited too long"});
    job_with_status(&jobs, "gave-up", failed.clone()).await?;
    let mut retold = failed.clone();
    retold["message"] = json!("all is well");
    expect_refused(
        write_status(&jobs, "gave-up", retold).await,
        "status",
        FINAL,
    )?;
    // Writing the same status again changes nothing, and is no change.
    write_status(&jobs, "gave-up", failed).await?;
    Ok(())
}

#[tokio::test]
async fn a_jobs_phase_only_moves_forward_and_is_never_removed() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("forward").await?;
    let jobs: Api<VideoJob> = ns.api();
    let queued =
        json!({"phase": "Queued", "lane": "anisora", "queuedAt": QUEUED_AT, "queuePosition": 1});
    job_with_status(&jobs, "journey", queued.clone()).await?;
    let mut no_phase = queued.clone();
    no_phase.as_object_mut().unwrap().remove("phase");
    expect_refused(
        write_status(&jobs, "journey", no_phase).await,
        "status.phase",
        FORWARD,
    )?;
    expect_refused(
        write_status(&jobs, "journey", Value::Null).await,
        "status",
        "status cannot be removed once the job has a phase",
    )?;

    // Claimed, then requeued by the operator (Running back to Queued), claimed again.
    let running = json!({"phase": "Running", "lane": "anisora", "queuedAt": QUEUED_AT,
        "runner": "anisora-0a1b2c-0", "attempts": 1});
    write_status(&jobs, "journey", running.clone()).await?;
    write_status(&jobs, "journey", queued.clone()).await?;
    write_status(&jobs, "journey", running.clone()).await?;
    expect_refused(
        write_status(&jobs, "journey", Value::Null).await,
        "status",
        "status cannot be removed once the job has a phase",
    )?;
    let mut done = running.clone();
    done["phase"] = json!("Succeeded");
    write_status(&jobs, "journey", done).await?;
    // Succeeded back to Running or Queued (the finished status is final, too).
    for revived in [running, queued] {
        let refused = write_status(&jobs, "journey", revived).await;
        expect_refused(refused, "status.phase", FORWARD)?;
    }
    Ok(())
}

#[tokio::test]
async fn queued_at_is_never_rewritten_and_a_fallback_move_keeps_it() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("queuedat").await?;
    let jobs: Api<VideoJob> = ns.api();
    let queued =
        json!({"phase": "Queued", "lane": "anisora", "queuedAt": QUEUED_AT, "queuePosition": 3});
    job_with_status(&jobs, "placed", queued.clone()).await?;
    for (rewritten, what) in [
        (json!("9999-01-01T00:00:00.000000Z"), "the year 9999"),
        (
            json!("2030-01-02T03:04:05.678900Z"),
            "a microsecond earlier",
        ),
        (Value::Null, "removed"),
    ] {
        let mut status = queued.clone();
        match rewritten {
            Value::Null => {
                status.as_object_mut().unwrap().remove("queuedAt");
            }
            at => status["queuedAt"] = at,
        }
        expect_refused(
            write_status(&jobs, "placed", status).await,
            "status.queuedAt",
            QUEUED_AT_FIXED,
        )
        .with_context(|| format!("queuedAt {what}"))?;
    }
    // Moved to the fallback lane: another lane and position, the same place in time.
    let moved = json!({"phase": "Queued", "lane": "shared", "laneMode": "Fallback",
        "fallbackFrom": "anisora", "fallbackCause": "capacity",
        "queuedAt": QUEUED_AT, "queuePosition": 1});
    let written = write_status(&jobs, "placed", moved).await?;
    let status = written.status.context("a status")?;
    assert_eq!(status.lane.as_deref(), Some("shared"));
    assert_eq!(
        status.queued_at.map(|t| t.0.to_string()),
        Some(QUEUED_AT.to_string())
    );
    Ok(())
}

/// Merges `status` into the job's status, as raw JSON: a typed status cannot even hold a time
/// past the operator's last instant.
async fn patch_status(
    jobs: &Api<VideoJob>,
    name: &str,
    status: Value,
) -> Result<VideoJob, kube::Error> {
    let patch = Patch::Merge(json!({ "status": status }));
    jobs.patch_status(name, &PatchParams::default(), &patch)
        .await
}

/// Expects a status write refused as Invalid (422) on `field`, which holds `value`, with
/// `message` (a rule on a single field echoes its value).
fn expect_refused_value(
    written: Result<VideoJob, kube::Error>,
    field: &str,
    value: &str,
    message: &str,
) -> Result<()> {
    let expected = format!("{field}: Invalid value: \"{value}\": {message}");
    framelane_testenv::expect_refused(written, 422, &expected)
}

/// The API server takes times up to 9999-12-31T23:59:59Z, but the operator's time type ends
/// late on 9999-12-30: one such job would stall every typed list and watch of VideoJobs.
#[tokio::test]
async fn status_times_the_operator_cannot_read_are_refused() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("farfuture").await?;
    let jobs: Api<VideoJob> = ns.api();
    let last = "9999-12-31T23:59:59Z";
    let job: VideoJob = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": "someday"},
        "spec": {"model": "served-by-no-lane", "prompt": "a cat by the sea"},
    }))?;
    jobs.create(&PostParams::default(), &job).await?;
    let queued = json!({"phase": "Queued", "lane": "anisora", "queuedAt": last});
    expect_refused_value(
        patch_status(&jobs, "someday", queued).await,
        "status.queuedAt",
        last,
        "status.queuedAt must be before the year 9000",
    )?;
    let queued = json!({"phase": "Queued", "lane": "anisora", "queuedAt": QUEUED_AT});
    patch_status(&jobs, "someday", queued).await?;
    for field in ["startedAt", "finishedAt"] {
        let running = json!({"phase": "Running", "runner": "anisora-0a1b2c-0", field: last});
        expect_refused_value(
            patch_status(&jobs, "someday", running).await,
            &format!("status.{field}"),
            last,
            &format!("status.{field} must be before the year 9000"),
        )?;
    }
    let conditions = json!({"conditions": [{"type": "Admitted", "status": "True",
        "reason": "Admitted", "message": "", "lastTransitionTime": last}]});
    expect_refused(
        patch_status(&jobs, "someday", conditions).await,
        "status.conditions",
        "status.conditions[].lastTransitionTime must be before the year 9000",
    )?;
    // The last second of the year 8999 is still a time the operator reads.
    let running = json!({"phase": "Running", "runner": "anisora-0a1b2c-0",
        "startedAt": "8999-12-31T23:59:59Z"});
    patch_status(&jobs, "someday", running).await?;
    Ok(())
}
