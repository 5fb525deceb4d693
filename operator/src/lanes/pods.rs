//! The runner pods a lane should have, built from plain data (no client), so the shape of
//! a runner pod is tested without a cluster.

use std::{collections::BTreeMap, sync::Arc};

use framelane_api::{
    ModelLane, VideoModel,
    modellane::{LaneMode, LaneVolume, RunnerTemplate},
    wellknown::{ALLOC_CONF_DEFAULT, ALLOC_CONF_ENV, LABEL_LANE, LABEL_MODEL, SHARED_MODEL_LABEL},
};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
        LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod,
        PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
        VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use kube::{Resource, ResourceExt};

use crate::config::Config;

/// Where a runner finds model packages.
pub const MODELS_MOUNT: &str = "/models";
/// Where a runner writes videos.
pub const OUTPUTS_MOUNT: &str = "/outputs";
/// A writable emptyDir for temporary files (libtorch, openh264): the root filesystem is
/// read-only.
pub const TMP_MOUNT: &str = "/tmp";
/// The user, group and fsGroup runner pods run as (not root: the `restricted` Pod Security
/// Standard), the `nonroot` user of distroless images.
pub const RUNNER_UID: i64 = 65532;
/// The port of the runner's `/metrics`, `/healthz` and `/readyz` (its default
/// `--metrics-addr`), declared under the name the chart's PodMonitor scrapes.
pub const METRICS_PORT: i32 = 8080;
pub const METRICS_PORT_NAME: &str = "metrics";

/// The label value that names a lane's model on its pods.
pub fn model_label(lane: &ModelLane) -> String {
    match lane.spec.mode {
        LaneMode::Dedicated => lane.spec.models.first().cloned().unwrap_or_default(),
        LaneMode::Shared => SHARED_MODEL_LABEL.into(),
    }
}

/// The lane's override of the allocator setting, if it has one.
pub fn allocator_override(lane: &ModelLane) -> Option<String> {
    let env = lane
        .spec
        .runner
        .as_ref()
        .map(|r| r.env.as_slice())
        .unwrap_or_default();
    env.iter()
        .find(|e| e.name == ALLOC_CONF_ENV)
        .map(|e| e.value.clone().unwrap_or_default())
}

/// The runner pods the lane should have: `replicas` of them (at least one), named
/// `<lane>-<template hash>-<index>` so that a changed template replaces them. The hash also
/// covers what the runners read from the lane's VideoModels at start (their weights,
/// sampling and modes), so a changed model replaces them too; `models` are the VideoModels
/// the operator knows. The chart's runner policies (runner-policies.yaml) read a runner's
/// lane back from this name, so it must keep its form: a 6-hex hash and a decimal index.
pub fn desired_pods(lane: &ModelLane, config: &Config, models: &[Arc<VideoModel>]) -> Vec<Pod> {
    let replicas = lane.spec.replicas.unwrap_or(1).max(1);
    let template = pod_spec(lane, config);
    let hash = template_hash(&template, &models_run(lane, models));
    let owner = lane
        .controller_owner_ref(&())
        .expect("a ModelLane read from the API server has a name and uid");
    (0..replicas)
        .map(|i| Pod {
            metadata: ObjectMeta {
                name: Some(format!("{}-{hash}-{i}", lane.name_any())),
                namespace: Some(config.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (LABEL_LANE.into(), lane.name_any()),
                    (LABEL_MODEL.into(), model_label(lane)),
                    ("app.kubernetes.io/name".into(), "framelane-runner".into()),
                    ("app.kubernetes.io/component".into(), "runner".into()),
                ])),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            spec: Some(template.clone()),
            status: None,
        })
        .collect()
}

fn pod_spec(lane: &ModelLane, config: &Config) -> PodSpec {
    let runner = lane.spec.runner.clone().unwrap_or_default();
    let claim = |name: &str| LaneVolume {
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: name.into(),
            read_only: None,
        }),
        ..Default::default()
    };
    let models = runner
        .model_volume
        .clone()
        .unwrap_or_else(|| claim(&config.models_claim));
    let outputs = runner
        .output_volume
        .clone()
        .unwrap_or_else(|| claim(&config.outputs_claim));
    PodSpec {
        containers: vec![container(lane, &runner, config)],
        volumes: Some(vec![
            volume("models", models),
            volume("outputs", outputs),
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            },
        ]),
        security_context: Some(pod_security()),
        service_account_name: config.runner_service_account.clone(),
        restart_policy: Some("Always".into()),
        node_selector: (!runner.node_selector.is_empty()).then(|| runner.node_selector.clone()),
        tolerations: (!runner.tolerations.is_empty()).then(|| runner.tolerations.clone()),
        priority_class_name: runner.priority_class_name.clone(),
        image_pull_secrets: (!config.runner_image_pull_secrets.is_empty()).then(|| {
            config
                .runner_image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        ..Default::default()
    }
}

/// The runner container: its image, environment, GPU, mounts and restricted security.
fn container(lane: &ModelLane, runner: &RunnerTemplate, config: &Config) -> Container {
    let resources = runner
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            limits: Some(BTreeMap::from([(
                config.gpu_resource.clone(),
                Quantity("1".into()),
            )])),
            ..Default::default()
        });
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    Container {
        name: "runner".into(),
        image: Some(
            runner
                .image
                .clone()
                .unwrap_or_else(|| config.runner_image.clone()),
        ),
        image_pull_policy: config.runner_image_pull_policy.clone(),
        env: Some(env(lane, runner, config)),
        args: Some(memory_args(runner)),
        ports: Some(vec![ContainerPort {
            name: Some(METRICS_PORT_NAME.into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(resources),
        volume_mounts: Some(vec![
            mount("models", MODELS_MOUNT, true),
            mount("outputs", OUTPUTS_MOUNT, false),
            mount("tmp", TMP_MOUNT, false),
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            read_only_root_filesystem: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The lane's memory mode, VAE tiling and transformer weights (`spec.runner.memory`), as
/// the runner's flags.
fn memory_args(runner: &RunnerTemplate) -> Vec<String> {
    let memory = runner.memory.clone().unwrap_or_default();
    vec![
        "--memory-mode".into(),
        memory.mode.flag().into(),
        "--vae-tiling".into(),
        memory.vae_tiling.as_str().into(),
        "--transformer-weights".into(),
        memory.transformer_weights.as_str().into(),
    ]
}

/// The runner's environment: who it is (from the downward API), its lane and models, where
/// its volumes are, the image hosts it may fetch from, the namespace of its jobs when the
/// operator watches only one, the allocator setting unless the lane overrides it, and the
/// lane's own.
fn env(lane: &ModelLane, runner: &RunnerTemplate, config: &Config) -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let value = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        // The runner makes its pod the owner of its heartbeat Lease, so the Lease goes with it.
        field("POD_UID", "metadata.uid"),
        value("FRAMELANE_LANE", lane.name_any()),
        value("FRAMELANE_LANE_MODE", lane.spec.mode.as_str().into()),
        value("FRAMELANE_MODELS", lane.spec.models.join(",")),
        value("FRAMELANE_MODELS_DIR", MODELS_MOUNT.into()),
        value("FRAMELANE_OUTPUT_DIR", OUTPUTS_MOUNT.into()),
    ];
    if !config.image_url_hosts.is_empty() {
        env.push(value(
            "FRAMELANE_IMAGE_URL_HOSTS",
            config.image_url_hosts.join(","),
        ));
    }
    // The runner's account may read jobs only there: listing them cluster-wide is forbidden.
    if let Some(namespace) = &config.watch_namespace {
        env.push(value("FRAMELANE_WATCH_NAMESPACE", namespace.clone()));
    }
    if allocator_override(lane).is_none() {
        env.push(value(ALLOC_CONF_ENV, ALLOC_CONF_DEFAULT.into()));
    }
    env.extend(runner.env.iter().cloned());
    env
}

/// What the `restricted` Pod Security Standard asks of the pod.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUNNER_UID),
        run_as_group: Some(RUNNER_UID),
        fs_group: Some(RUNNER_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

fn volume(name: &str, source: LaneVolume) -> Volume {
    Volume {
        name: name.into(),
        persistent_volume_claim: source.persistent_volume_claim,
        host_path: source.host_path,
        nfs: source.nfs,
        empty_dir: source.empty_dir,
        ..Default::default()
    }
}

/// What a runner of `lane` reads from each of its VideoModels at start and runs by: the
/// weights, the sampling and the modes (not the limits, defaults or fixed parameters, which
/// admission writes into each job). A model the operator does not know adds nothing.
fn models_run(lane: &ModelLane, models: &[Arc<VideoModel>]) -> serde_json::Value {
    lane.spec
        .models
        .iter()
        .filter_map(|name| models.iter().find(|m| m.name_any() == *name))
        .map(|m| {
            serde_json::json!({"name": m.name_any(), "weights": m.spec.weights,
                "sampling": m.spec.sampling, "modes": m.spec.modes})
        })
        .collect()
}

/// A short, stable hash of the pod template and what its runners read from their models
/// (FNV-1a over their JSON), so pods are replaced exactly when what they would run changes.
fn template_hash(spec: &PodSpec, models: &serde_json::Value) -> String {
    let json = serde_json::to_vec(&(spec, models)).expect("a PodSpec serializes");
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:06x}", hash & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;

    fn lane(spec: serde_json::Value) -> ModelLane {
        let mut lane: ModelLane = serde_json::from_value(json!({
            "apiVersion": "framelane.dev/v1alpha1", "kind": "ModelLane",
            "metadata": {"name": "anisora", "uid": "u-1"}, "spec": spec}))
        .unwrap();
        lane.metadata.uid = Some("u-1".into());
        lane
    }
    fn config() -> Config {
        Config::parse_from(["framelane-operator", "--namespace", "fl"])
    }
    fn env_of(pod: &Pod) -> Vec<(String, Option<String>)> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value))
            .collect()
    }

    #[test]
    fn a_minimal_lane_gets_one_gpu_pod_with_the_allocator_setting() {
        let pods = desired_pods(
            &lane(json!({"mode": "Dedicated", "models": ["anisora"]})),
            &config(),
            &[],
        );
        assert_eq!(pods.len(), 1);
        let pod = &pods[0];
        assert!(pod.name_any().starts_with("anisora-"));
        assert_eq!(pod.labels()[LABEL_LANE], "anisora");
        assert_eq!(pod.labels()[LABEL_MODEL], "anisora");
        assert_eq!(pod.owner_references()[0].kind, "ModelLane");
        assert_eq!(pod.owner_references()[0].controller, Some(true));
        assert!(env_of(pod).contains(&(ALLOC_CONF_ENV.into(), Some(ALLOC_CONF_DEFAULT.into()))));
        let limits = pod.spec.as_ref().unwrap().containers[0]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        // The port the chart's PodMonitor scrapes (`port: metrics`).
        let ports = pod.spec.as_ref().unwrap().containers[0]
            .ports
            .clone()
            .unwrap();
        assert_eq!(ports.len(), 1, "{ports:?}");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].container_port),
            (Some("metrics"), 8080)
        );
    }

    #[test]
    fn the_lanes_memory_mode_and_tiling_are_the_runners_flags() {
        let args = |spec: serde_json::Value| {
            desired_pods(&lane(spec), &config(), &[])[0]
                .spec
                .as_ref()
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap()
        };
        assert_eq!(
            args(json!({"mode": "Dedicated", "models": ["anisora"]})),
            [
                "--memory-mode",
                "auto",
                "--vae-tiling",
                "auto",
                "--transformer-weights",
                "compute"
            ]
        );
        assert_eq!(
            args(json!({"mode": "Dedicated", "models": ["anisora"],
                "runner": {"memory": {"mode": "modelOffload", "vaeTiling": "on",
                    "transformerWeights": "fp8"}}})),
            [
                "--memory-mode",
                "model-offload",
                "--vae-tiling",
                "on",
                "--transformer-weights",
                "fp8"
            ]
        );
        assert_eq!(
            args(json!({"mode": "Dedicated", "models": ["anisora"],
                "runner": {"memory": {"mode": "expertSwap"}}})),
            [
                "--memory-mode",
                "expert-swap",
                "--vae-tiling",
                "auto",
                "--transformer-weights",
                "compute"
            ]
        );
    }

    #[test]
    fn runner_pods_meet_the_restricted_pod_security_standard() {
        let pods = desired_pods(
            &lane(json!({"mode": "Dedicated", "models": ["anisora"]})),
            &config(),
            &[],
        );
        let spec = pods[0].spec.as_ref().unwrap();
        let pod = spec.security_context.as_ref().unwrap();
        assert_eq!(pod.run_as_non_root, Some(true));
        assert_eq!(
            (pod.run_as_user, pod.run_as_group, pod.fs_group),
            (Some(65532), Some(65532), Some(65532))
        );
        assert_eq!(
            pod.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let container = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(container.allow_privilege_escalation, Some(false));
        assert_eq!(
            container.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(container.read_only_root_filesystem, Some(true));
        // The read-only root leaves /tmp writable, on an emptyDir.
        let tmp = spec.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/tmp")
            .expect("a /tmp mount");
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == tmp.name)
            .unwrap();
        assert!(volume.empty_dir.is_some(), "{volume:?}");
        assert_ne!(tmp.read_only, Some(true));
    }

    #[test]
    fn runner_pods_know_their_uid_and_use_the_configured_account() {
        let minimal = lane(json!({"mode": "Dedicated", "models": ["anisora"]}));
        let pods = desired_pods(&minimal, &config(), &[]);
        let env = pods[0].spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let uid = env.iter().find(|e| e.name == "POD_UID").expect("POD_UID");
        let field = uid.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(field.field_path, "metadata.uid");
        assert_eq!(
            pods[0].spec.as_ref().unwrap().service_account_name,
            None,
            "the namespace's default account unless one is configured"
        );

        let with_account = Config::parse_from([
            "framelane-operator",
            "--namespace",
            "fl",
            "--runner-service-account",
            "framelane-runner",
        ]);
        let pods = desired_pods(&minimal, &with_account, &[]);
        assert_eq!(
            pods[0]
                .spec
                .as_ref()
                .unwrap()
                .service_account_name
                .as_deref(),
            Some("framelane-runner")
        );
    }

    #[test]
    fn runner_pods_pull_with_the_configured_policy_and_secrets() {
        let minimal = lane(json!({"mode": "Dedicated", "models": ["anisora"]}));
        let plain = desired_pods(&minimal, &config(), &[]);
        let spec = plain[0].spec.as_ref().unwrap();
        assert_eq!(spec.image_pull_secrets, None);
        assert_eq!(spec.containers[0].image_pull_policy, None);
        let private = Config::parse_from([
            "framelane-operator",
            "--namespace",
            "fl",
            "--runner-image-pull-policy",
            "Always",
            "--runner-image-pull-secrets",
            "regcred,mirror",
        ]);
        let pods = desired_pods(&minimal, &private, &[]);
        let spec = pods[0].spec.as_ref().unwrap();
        let secrets: Vec<&str> = spec
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(secrets, ["regcred", "mirror"]);
        assert_eq!(
            spec.containers[0].image_pull_policy.as_deref(),
            Some("Always")
        );
        assert_ne!(
            pods[0].name_any(),
            plain[0].name_any(),
            "the pods are replaced"
        );
        assert!(
            Config::try_parse_from([
                "framelane-operator",
                "--namespace",
                "fl",
                "--runner-image-pull-policy",
                "Sometimes",
            ])
            .is_err()
        );
    }

    #[test]
    fn runner_pods_watch_the_operators_job_namespace_when_it_has_one() {
        let minimal = lane(json!({"mode": "Dedicated", "models": ["anisora"]}));
        let watched = |config: &Config| {
            env_of(&desired_pods(&minimal, config, &[])[0])
                .into_iter()
                .find(|(name, _)| name == "FRAMELANE_WATCH_NAMESPACE")
                .map(|(_, value)| value)
        };
        assert_eq!(watched(&config()), None, "every namespace");
        let one = Config::parse_from([
            "framelane-operator",
            "--namespace",
            "fl",
            "--watch-namespace",
            "team-a",
        ]);
        assert_eq!(watched(&one), Some(Some("team-a".to_string())));
    }

    #[test]
    fn an_explicit_override_is_honoured_once() {
        let lane = lane(
            json!({"mode": "Shared", "models": ["a", "b"], "replicas": 2,
            "runner": {"env": [{"name": ALLOC_CONF_ENV, "value": "backend:cudaMallocAsync"}]}}),
        );
        assert_eq!(
            allocator_override(&lane).as_deref(),
            Some("backend:cudaMallocAsync")
        );
        let pods = desired_pods(&lane, &config(), &[]);
        assert_eq!(pods.len(), 2);
        let settings: Vec<_> = env_of(&pods[0])
            .into_iter()
            .filter(|(n, _)| n == ALLOC_CONF_ENV)
            .collect();
        assert_eq!(
            settings,
            [(
                ALLOC_CONF_ENV.to_string(),
                Some("backend:cudaMallocAsync".to_string())
            )]
        );
        assert_eq!(pods[1].labels()[LABEL_MODEL], SHARED_MODEL_LABEL);
    }

    #[test]
    fn changing_the_template_renames_the_pods() {
        let a = desired_pods(
            &lane(json!({"mode": "Dedicated", "models": ["anisora"]})),
            &config(),
            &[],
        );
        let b = desired_pods(
            &lane(
                json!({"mode": "Dedicated", "models": ["anisora"], "runner": {"image": "other:1"}}),
            ),
            &config(),
            &[],
        );
        assert_ne!(a[0].name_any(), b[0].name_any());
        let again = desired_pods(
            &lane(json!({"mode": "Dedicated", "models": ["anisora"]})),
            &config(),
            &[],
        );
        assert_eq!(a[0].name_any(), again[0].name_any());
    }

    #[test]
    fn changing_what_runners_read_from_a_model_renames_the_pods() {
        let model = |spec: serde_json::Value| -> Arc<VideoModel> {
            let mut full = json!({"weights": {"format": "diffusers", "path": "anisora"},
                "modes": ["t2v", "i2v"], "fixedParameters": {"steps": 8},
                "defaults": {"width": 832, "height": 480, "frames": 81, "fps": 16},
                "limits": {"maxWidth": 1280, "maxHeight": 1280, "maxFrames": 161}});
            for (k, v) in spec.as_object().unwrap() {
                full[k] = v.clone();
            }
            Arc::new(
                serde_json::from_value(json!({"apiVersion": "framelane.dev/v1alpha1",
                    "kind": "VideoModel", "metadata": {"name": "anisora"}, "spec": full}))
                .unwrap(),
            )
        };
        let lane = lane(json!({"mode": "Dedicated", "models": ["anisora"]}));
        let name = |m: Arc<VideoModel>| desired_pods(&lane, &config(), &[m])[0].name_any();
        let first = name(model(json!({})));
        for changed in [
            json!({"weights": {"format": "diffusers", "path": "anisora-v2"}}),
            json!({"sampling": {"solver": "euler", "shift": 5.0}}),
            json!({"modes": ["i2v"]}),
        ] {
            assert_ne!(name(model(changed.clone())), first, "{changed}");
        }
        // What admission writes into each job does not restart the runners.
        for same in [
            json!({"limits": {"maxWidth": 1920, "maxHeight": 1080, "maxFrames": 161}}),
            json!({"defaults": {"width": 1280, "height": 720, "frames": 81, "fps": 16}}),
            json!({"fixedParameters": {"steps": 12}}),
        ] {
            assert_eq!(name(model(same.clone())), first, "{same}");
        }
    }
}
