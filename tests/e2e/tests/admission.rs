//! Start images and modes at admission, through the API server calling the operator's webhook
//! over TLS, on the default install's models (examples/videomodels.yaml: anisora offers i2v,
//! phr00t t2v): a `spec.image` that leaves the model volume, another URL scheme or a host the
//! cluster does not allow is refused with 422 naming `spec.image`; a mode the model does not
//! offer, or one the API does not know, with 422 naming `spec.mode`; a path in the volume and
//! a URL of an allowed host are admitted.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use framelane_api::{ModelLane, VideoJob, VideoModel};
use framelane_testenv::{TestEnv, eventually};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, PostParams},
};
use serde::Deserialize;
use serde_json::{Value, json};

const INSTANCE_LABEL: &str = "framelane.dev/test-instance";
const ALLOWED_HOST: &str = "images.example.com";

/// The spec of the default install's VideoModel `name`.
fn default_model(name: &str) -> Result<Value> {
    let yaml = include_str!("../../../examples/videomodels.yaml");
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let model = Value::deserialize(doc)?;
        if model["metadata"]["name"] == name {
            return Ok(model["spec"].clone());
        }
    }
    bail!("examples/videomodels.yaml has no model {name}")
}

/// What a dry-run create of a job with `spec` (any JSON, values the API does not know
/// included) came to: admitted, or the refusal's code and its causes as (field, message).
async fn create(
    jobs: &Api<DynamicObject>,
    spec: Value,
) -> Result<Option<(u16, Vec<(String, String)>)>> {
    let job: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoJob",
        "metadata": {"name": "probe"}, "spec": spec,
    }))?;
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match jobs.create(&dry_run, &job).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) => {
            let causes = status
                .details
                .iter()
                .flat_map(|d| d.causes.iter())
                .map(|c| (c.field.clone(), c.message.clone()))
                .collect();
            Ok(Some((status.code, causes)))
        }
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_modes_a_model_cannot_run_are_refused_with_422() -> Result<()> {
    let env = TestEnv::get()?;
    let ns = env.namespace("admission-image").await?;
    let labels = json!({INSTANCE_LABEL: ns.name});
    let mut names = Vec::new();
    for default in ["anisora", "phr00t"] {
        let name = format!("{}-{default}", ns.name);
        let model: VideoModel = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "VideoModel",
            "metadata": {"name": name, "labels": labels}, "spec": default_model(default)?
        }))?;
        Api::<VideoModel>::all(ns.client.clone())
            .create(&PostParams::default(), &model)
            .await?;
        let lane: ModelLane = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": name, "labels": labels},
            "spec": {"mode": "Dedicated", "models": [name], "runner": {"modelVolume": {"emptyDir": {}},
                "outputVolume": {"emptyDir": {}}, "resources": {"requests": {"cpu": "100m"}}}}
        }))?;
        Api::<ModelLane>::all(ns.client.clone())
            .create(&PostParams::default(), &lane)
            .await?;
        names.push(name);
    }
    let (anisora, phr00t) = (names[0].clone(), names[1].clone());

    let port = framelane_testenv::free_port()?;
    let configuration = format!("framelane-{}", ns.name);
    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let selector = format!("{INSTANCE_LABEL}={}", ns.name);
    let webhook_addr = format!("127.0.0.1:{port}");
    let config = framelane_operator::config::Config::parse_from([
        "framelane-operator",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        &ns.name,
        "--watch-namespace",
        &ns.name,
        "--lane-selector",
        &selector,
        "--metrics-addr",
        "127.0.0.1:0",
        "--identity",
        "admission-e2e",
        "--webhook-addr",
        &webhook_addr,
        "--webhook-configuration",
        &configuration,
        "--image-url-hosts",
        ALLOWED_HOST,
    ]);
    let operator = tokio::spawn(framelane_operator::run::run(config));

    // The webhook for this namespace only; the operator fills in its caBundle.
    let webhook: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": configuration, "labels": labels},
        "webhooks": [{
            "name": "videojobs.framelane.dev", "admissionReviewVersions": ["v1"],
            "sideEffects": "None", "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://{webhook_addr}/validate-videojob")},
            "rules": [{"apiGroups": ["framelane.dev"], "apiVersions": ["v1alpha1"],
                "operations": ["CREATE"], "resources": ["videojobs"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
        }]
    }))?;
    let webhooks = Api::<ValidatingWebhookConfiguration>::all(ns.client.clone());
    webhooks.create(&PostParams::default(), &webhook).await?;

    // kube-rs retries refusals it takes for transient; these must be seen as they are.
    let kubeconfig_file = kube::config::Kubeconfig::read_from(&env.kubeconfig)?;
    let mut client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig_file, &Default::default()).await?;
    client_config.default_retry = false;
    let jobs: Api<DynamicObject> = Api::namespaced_with(
        Client::try_from(client_config)?,
        &ns.name,
        &ApiResource::erase::<VideoJob>(&()),
    );
    let i2v = |model: &str, image: &str| json!({"model": model, "mode": "i2v", "image": image, "prompt": "a cat surfing at dusk"});
    eventually(90, "the webhook to answer over TLS", || async {
        let wrong_steps = json!({"model": anisora, "mode": "i2v", "image": "inputs/cat.png",
            "prompt": "probe", "steps": 999});
        Ok(match create(&jobs, wrong_steps).await {
            Ok(Some((422, causes))) if causes.iter().any(|(f, _)| f == "spec.steps") => Some(()),
            _ => None,
        })
    })
    .await
    .context("the webhook never answered")?;

    let refused = |field: &'static str, contains: String| {
        move |outcome: Option<(u16, Vec<(String, String)>)>| -> Result<()> {
            let Some((code, causes)) = outcome else {
                bail!("admitted, expected a 422 on {field} saying {contains:?}")
            };
            anyhow::ensure!(
                code == 422
                    && causes
                        .iter()
                        .any(|(f, m)| f == field && m.contains(&contains)),
                "expected 422 on {field} saying {contains:?}, got {code}: {causes:?}"
            );
            Ok(())
        }
    };
    let cases = [
        (
            i2v(&anisora, "file:///etc/passwd"),
            "spec.image",
            "scheme file: is not allowed".to_owned(),
        ),
        (
            i2v(&anisora, "/etc/passwd"),
            "spec.image",
            "not the absolute path /etc/passwd".to_owned(),
        ),
        (
            i2v(&anisora, "inputs/../../secrets/token"),
            "spec.image",
            "must not leave the model volume".to_owned(),
        ),
        (
            i2v(&anisora, "http://169.254.169.254/latest/meta-data"),
            "spec.image",
            format!(
                "host 169.254.169.254 is not one this cluster allows images from ([{ALLOWED_HOST}])"
            ),
        ),
        (
            i2v(
                &anisora,
                &format!("https://{ALLOWED_HOST}@evil.example/cat.png"),
            ),
            "spec.image",
            "must not carry credentials".to_owned(),
        ),
        (
            json!({"model": anisora, "prompt": "a cat", "image": "inputs/cat.png"}),
            "spec.image",
            "is used only when mode is i2v".to_owned(),
        ),
        (
            i2v(&phr00t, "inputs/cat.png"),
            "spec.mode",
            format!("model {phr00t} does not offer i2v: set spec.mode to one of [t2v]"),
        ),
        (
            json!({"model": anisora, "prompt": "a cat"}),
            "spec.mode",
            format!("model {anisora} does not offer t2v: set spec.mode to one of [i2v]"),
        ),
        (
            json!({"model": anisora, "mode": "first_last_frame", "image": "inputs/cat.png",
                "prompt": "a cat"}),
            "spec.mode",
            "supported values: \"t2v\", \"i2v\"".to_owned(),
        ),
        (
            json!({"model": anisora, "mode": "i2v", "prompt": "a cat"}),
            "spec.image",
            "spec.image is required when mode is i2v".to_owned(),
        ),
    ];
    for (spec, field, contains) in cases {
        let label = spec.to_string();
        refused(field, contains)(create(&jobs, spec).await?).context(label)?;
    }
    for image in [
        "inputs/cat.png".to_owned(),
        format!("https://{ALLOWED_HOST}/cat.png"),
        format!("HTTPS://{}:8443/cat.png", ALLOWED_HOST.to_uppercase()),
    ] {
        let outcome = create(&jobs, i2v(&anisora, &image)).await?;
        anyhow::ensure!(outcome.is_none(), "{image} was refused: {outcome:?}");
    }

    operator.abort();
    webhooks
        .delete(&configuration, &DeleteParams::default())
        .await?;
    let _ = env
        .kubectl()
        .args([
            "delete",
            "modellanes,videomodels",
            "-l",
            &selector,
            "--wait=false",
        ])
        .output();
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
