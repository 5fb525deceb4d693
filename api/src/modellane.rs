//! `ModelLane` (cluster-scoped): where models run — a set of warm runner pods with a bounded
//! queue and a fallback lane.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        EmptyDirVolumeSource, EnvVar, HostPathVolumeSource, NFSVolumeSource,
        PersistentVolumeClaimVolumeSource, ResourceRequirements, Toleration,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime},
};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A set of warm GPU runner pods serving one model (Dedicated) or several (Shared).
// Each printcolumn(...) repeats `type_`; clippy reads that as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "framelane.dev",
    version = "v1alpha1",
    kind = "ModelLane",
    plural = "modellanes",
    shortname = "lane",
    category = "framelane",
    status = "ModelLaneStatus",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Models", type_ = "string", json_path = ".spec.models"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyRunners"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queueDepth"),
    printcolumn(name = "Fallback", type_ = "string", json_path = ".status.fallback.cause"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(self.spec.fallback) || self.spec.fallback.lane != self.metadata.name").message("spec.fallback.lane must name another lane, not this one"),
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name must be at most 63 characters: it is the framelane.dev/lane label of the lane's runner pods and heartbeat Leases")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Dedicated' || size(self.models) == 1").message("a Dedicated lane serves exactly one model: list one in spec.models, or use mode: Shared"))]
pub struct ModelLaneSpec {
    /// `Dedicated`: one model, always loaded and warm. `Shared`: several models, switched
    /// safely (unload, empty the GPU cache, load) as jobs need them.
    pub mode: LaneMode,
    /// Names of the VideoModels this lane serves (exactly one for a Dedicated lane).
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "set", "items" = {"type": "string", "minLength": 1, "maxLength": 253}))]
    pub models: Vec<String>,
    /// Number of warm runner pods. Never zero: a lane is kept warm so jobs never wait for a
    /// cold start. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: Option<i32>,
    /// The runner pods' image, resources, environment and model volume. Fields left out
    /// come from the operator's configuration (Helm values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<RunnerTemplate>,
    /// Queue limits. Left out: the operator's defaults (maxDepth 25, maxWaitSeconds 30,
    /// jobDeadlineSeconds 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,
    /// Where this lane's jobs go when it cannot run them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSpec>,
}

vocabulary! {
    /// Whether a lane serves one model or several.
    pub enum LaneMode {
        /// One model, loaded once and kept warm.
        Dedicated,
        /// Several models, switched as jobs need them.
        Shared,
    }
}

/// How the runner pods of a lane look.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunnerTemplate {
    /// Container image of the runner (framelane-runner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Compute resources of the runner container, e.g. `limits: {nvidia.com/gpu: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables of the runner container.
    /// `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` is always set; setting it here
    /// overrides it and raises a Warning Event and a condition on the lane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Volume holding the model packages, mounted read-only into every runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_volume: Option<LaneVolume>,
    /// Volume the runners write videos to, under `<namespace>/<job name>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_volume: Option<LaneVolume>,
    /// How the runners hold the models in GPU memory. Left out: `auto` for both fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<RunnerMemorySpec>,
    /// Node labels the runner pods must match, e.g. a GPU node pool's
    /// (`cloud.google.com/gke-accelerator: nvidia-h100-80gb`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints of the nodes the runner pods may run on, e.g. the `nvidia.com/gpu` taint GPU
    /// node pools carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the runner pods, so that warm runners are not the first pods
    /// preempted on a busy GPU node (the class must exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// How a lane's runners hold the models in GPU memory. A job whose estimated peak does not
/// fit the runners' GPU in this mode is refused at admission (HTTP 422) with the largest
/// size that fits (docs/fit-check.md).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunnerMemorySpec {
    /// `resident`: every model part stays on the GPU. `expertSwap`: a two-expert model keeps
    /// one expert on the GPU at a time, the other in pinned host memory. `modelOffload`: the
    /// text encoder, the denoiser and the VAE are each on the GPU only for their stage.
    /// `auto` (default): chosen at start from the GPU's memory.
    #[serde(default)]
    pub mode: MemoryMode,
    /// Whether the VAE decodes and encodes in spatial tiles and frame chunks: `on`, `off`, or
    /// `auto` (default: for each job whose untiled estimate does not fit the runner's GPU).
    #[serde(default)]
    pub vae_tiling: VaeTiling,
    /// How the denoisers' linear weights are stored on the GPU and in host memory: `compute`
    /// (default), in the precision they compute in; `fp8`, in float8 (e4m3) with a scale per
    /// tensor, each upcast as its layer runs: half the bytes of bfloat16, so a 14B expert
    /// takes 14.5 GB. An fp8 checkpoint keeps its own values (the same video as
    /// `compute`); a bfloat16 one is rounded to fp8 at load, which changes the video slightly.
    #[serde(default)]
    pub transformer_weights: TransformerWeights,
}

/// How a runner holds the models in GPU memory (`spec.runner.memory.mode`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum MemoryMode {
    /// Chosen at start from the GPU's memory.
    #[default]
    Auto,
    /// Every model part stays on the GPU.
    Resident,
    /// One expert of a two-expert model on the GPU at a time.
    ExpertSwap,
    /// Each model part on the GPU only for its stage.
    ModelOffload,
}

impl MemoryMode {
    /// The value as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryMode::Auto => "auto",
            MemoryMode::Resident => "resident",
            MemoryMode::ExpertSwap => "expertSwap",
            MemoryMode::ModelOffload => "modelOffload",
        }
    }

    /// Every mode.
    pub const ALL: [MemoryMode; 4] = [
        MemoryMode::Auto,
        MemoryMode::Resident,
        MemoryMode::ExpertSwap,
        MemoryMode::ModelOffload,
    ];

    /// The value of the runner's `--memory-mode` flag.
    pub fn flag(self) -> &'static str {
        match self {
            MemoryMode::Auto => "auto",
            MemoryMode::Resident => "resident",
            MemoryMode::ExpertSwap => "expert-swap",
            MemoryMode::ModelOffload => "model-offload",
        }
    }

    /// The mode a `--memory-mode` value names.
    pub fn from_flag(flag: &str) -> Option<MemoryMode> {
        MemoryMode::ALL.into_iter().find(|m| m.flag() == flag)
    }
}

/// Whether a runner's VAE works in tiles (`spec.runner.memory.vaeTiling`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum VaeTiling {
    /// Each job whose untiled estimate does not fit the runner's GPU.
    #[default]
    Auto,
    Off,
    On,
}

impl VaeTiling {
    /// Every setting.
    pub const ALL: [VaeTiling; 3] = [VaeTiling::Auto, VaeTiling::Off, VaeTiling::On];

    /// The setting a `--vae-tiling` value names.
    pub fn from_flag(flag: &str) -> Option<VaeTiling> {
        VaeTiling::ALL.into_iter().find(|t| t.as_str() == flag)
    }

    /// The value as the API writes it, and of the runner's `--vae-tiling` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            VaeTiling::Auto => "auto",
            VaeTiling::Off => "off",
            VaeTiling::On => "on",
        }
    }
}

/// How a runner stores its denoisers' linear weights (`spec.runner.memory.transformerWeights`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum TransformerWeights {
    /// In the precision they compute in.
    #[default]
    Compute,
    /// float8 e4m3 with a scale per tensor, upcast layer by layer.
    Fp8,
}

impl TransformerWeights {
    /// Every setting.
    pub const ALL: [TransformerWeights; 2] = [TransformerWeights::Compute, TransformerWeights::Fp8];

    /// The setting a `--transformer-weights` value names.
    pub fn from_flag(flag: &str) -> Option<TransformerWeights> {
        TransformerWeights::ALL
            .into_iter()
            .find(|t| t.as_str() == flag)
    }

    /// The value as the API writes it, and of the runner's `--transformer-weights` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            TransformerWeights::Compute => "compute",
            TransformerWeights::Fp8 => "fp8",
        }
    }
}

/// A volume of the runner pods: exactly one source, with the same shape as in a Pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.persistentVolumeClaim), has(self.hostPath), has(self.nfs), has(self.emptyDir)].filter(x, x).size() == 1").message("set exactly one of persistentVolumeClaim, hostPath, nfs or emptyDir"))]
pub struct LaneVolume {
    /// A PersistentVolumeClaim in the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// A directory on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    /// An NFS export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    /// Scratch space that lives as long as the pod (outputs are lost with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
}

/// Bounds on a lane's queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Most unfinished (Queued or Running) jobs the lane holds. Further creates are
    /// rejected with HTTP 503 `queue_overloaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_depth: Option<i32>,
    /// Seconds a queued job waits before it moves to the fallback lane: when the lane has no
    /// available runner (if the fallback lane cannot take it either, it fails with reason
    /// `QueueWaitTimeout`), when the lane is in fallback, or when all its runners are busy and
    /// a runner of the fallback lane is free. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_wait_seconds: Option<i32>,
    /// Most unfinished jobs of one namespace the lane holds, so that one team cannot fill it:
    /// further creates from that namespace are refused with HTTP 503 `queue_overloaded`
    /// naming the namespace, while other namespaces' are still admitted. Left out: no share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_per_namespace: Option<i32>,
    /// Seconds a job may run once a runner claimed it (each attempt anew). A job still
    /// Running after that fails with reason `DeadlineExceeded`, its slot is freed and its
    /// runner stops at its next step. A job's own `spec.deadlineSeconds` overrides it.
    /// Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub job_deadline_seconds: Option<i32>,
}

/// Where a lane's jobs go when it cannot run them. The lane is in fallback while its runner
/// pods cannot be scheduled or no runner of it has been fresh for the grace period (cause
/// `capacity`), while a ResourceQuota refuses its pods (`quota`), or while `force` is true
/// (`manual`); new jobs then go to the fallback lane, and queued ones after `maxWaitSeconds`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FallbackSpec {
    /// Name of the ModelLane that takes this lane's jobs while it is in fallback. It must
    /// serve this lane's models (a Shared lane usually).
    #[schemars(length(min = 1, max = 253))]
    pub lane: String,
    /// The manual switch: `true` sends new jobs to the fallback lane now (cause `manual`).
    #[serde(default)]
    pub force: bool,
}

/// What the operator last observed about a lane.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelLaneStatus {
    /// `Ready`: every runner fresh. `Degraded`: some runners fresh. `Unavailable`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LanePhase>,
    /// Runners whose heartbeat Lease is fresh.
    #[serde(default)]
    pub ready_runners: i32,
    /// Unfinished (Queued or Running) jobs admitted to this lane.
    #[serde(default)]
    pub queue_depth: i32,
    /// Whether new jobs for this lane's models go to its fallback lane, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackStatus>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

vocabulary! {
    /// How well a lane can run jobs.
    pub enum LanePhase {
        /// Every runner has a fresh heartbeat.
        Ready,
        /// At least one, but not every, runner has a fresh heartbeat.
        Degraded,
        /// No runner has a fresh heartbeat.
        Unavailable,
    }
}

/// A lane's fallback state: the episode going on, if any, and the last one that ended.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FallbackStatus {
    /// Whether new jobs for this lane's models go to the fallback lane now.
    pub active: bool,
    /// Why the lane is in fallback (while active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FallbackCause>,
    /// When the episode going on began (while active), in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<MicroTime>,
    /// The last episode that ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_episode: Option<FallbackEpisode>,
}

/// One finished fallback episode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FallbackEpisode {
    /// Why the lane was in fallback.
    pub cause: FallbackCause,
    /// When the episode began, in microseconds.
    pub start: MicroTime,
    /// When it ended, in microseconds.
    pub end: MicroTime,
    /// How long it lasted, in seconds.
    pub duration_seconds: f64,
}

/// Why a lane is in fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FallbackCause {
    /// Its runner pods cannot be scheduled, or no runner of it has been fresh for the grace
    /// period (60 s by default).
    Capacity,
    /// Creating its runner pods is refused by a ResourceQuota.
    Quota,
    /// An admin set `spec.fallback.force: true`.
    Manual,
}

impl FallbackCause {
    pub const ALL: [FallbackCause; 3] = [
        FallbackCause::Capacity,
        FallbackCause::Quota,
        FallbackCause::Manual,
    ];

    /// The cause as the API writes it (and as the `cause` metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackCause::Capacity => "capacity",
            FallbackCause::Quota => "quota",
            FallbackCause::Manual => "manual",
        }
    }
}
