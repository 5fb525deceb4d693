//! `VideoJob` (namespaced): one generation. Its spec is what the user asked for and never
//! changes; its status is the job's journey through the lane's queue and runner.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{GenerationMode, modellane::FallbackCause, reasons::JobReason};

/// One video generation: a prompt for a model, run once on a warm GPU lane.
// Each printcolumn(...) repeats `type_`; clippy reads that as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "framelane.dev",
    version = "v1alpha1",
    kind = "VideoJob",
    plural = "videojobs",
    shortname = "vj",
    category = "framelane",
    namespaced,
    status = "VideoJobStatus",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Lane", type_ = "string", json_path = ".status.lane"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.percent",
        description = "Percent of denoising steps done"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // A status rule does not run when the status itself is removed; this one does.
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || has(self.status)").message("status cannot be removed once the job has a phase: a job's journey is only ever added to").field_path(".status")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: delete the VideoJob and create a new one"))]
#[x_kube(validation = Rule::new("self.mode != 'i2v' || has(self.image)").message("spec.image is required when mode is i2v").field_path(".image"))]
pub struct VideoJobSpec {
    /// Name of the VideoModel to run (for example `anisora` or `phr00t`).
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// `t2v` (text to video, the default) or `i2v` (image to video; needs `image`). The
    /// model must offer the mode.
    #[serde(default = "default_mode")]
    pub mode: GenerationMode,
    /// What to generate: 1 to 2000 characters, not only whitespace.
    #[schemars(length(min = 1, max = 2000))]
    #[x_kube(validation = Rule::new("self.matches('\\\\S')").message("must contain a non-whitespace character"))]
    pub prompt: String,
    /// What to steer away from: at most 1000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1000))]
    pub negative_prompt: Option<String>,
    /// The start image for `i2v`: a path inside the lane's model volume or an
    /// `http(s)://` URL the runner can fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub image: Option<String>,
    /// Frame width in pixels: a multiple of 16, at least 256, at most the model's maxWidth.
    /// Left out: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 4096))]
    #[x_kube(validation = Rule::new("self % 16 == 0").message("must be a multiple of 16 (for example 832 or 480)"))]
    pub width: Option<i32>,
    /// Frame height in pixels: a multiple of 16, at least 256, at most the model's maxHeight.
    /// Left out: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 4096))]
    #[x_kube(validation = Rule::new("self % 16 == 0").message("must be a multiple of 16 (for example 832 or 480)"))]
    pub height: Option<i32>,
    /// Number of frames, of the form 4k+1 (1, 5, ..., 81, ...), at most the model's
    /// maxFrames. Left out: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1025))]
    #[x_kube(validation = Rule::new("self % 4 == 1").message("must be of the form 4k+1 (for example 81)"))]
    pub frames: Option<i32>,
    /// Frames per second of the output video. Left out: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 120))]
    pub fps: Option<i32>,
    /// Denoising steps. Fixed by the model (anisora: 8, phr00t: 4); any other value is
    /// rejected. Left out: the model's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub steps: Option<i32>,
    /// Classifier-free guidance scale. Fixed by models that declare one (phr00t: 1.0); any
    /// other value is rejected. Left out: the model's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub cfg: Option<f64>,
    /// Noise seed, 0 to 4294967295 (32 bits, so every client keeps it exact); the same seed
    /// gives the same video. Left out or -1: a
    /// random seed, recorded in `status.seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 4294967295_i64))]
    pub seed: Option<i64>,
    /// Seconds after the job finishes (Succeeded or Failed) when it is deleted. Left out:
    /// kept until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Seconds the job may run once a runner claimed it (each attempt anew); then it fails
    /// with reason `DeadlineExceeded`. Left out: its lane's `spec.queue.jobDeadlineSeconds`
    /// (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub deadline_seconds: Option<i32>,
}

fn default_mode() -> GenerationMode {
    GenerationMode::T2v
}

vocabulary! {
    /// Where a job is in its life.
    pub enum JobPhase {
        /// Admitted to a lane and waiting for a runner.
        Queued,
        /// Claimed by a runner and generating.
        Running,
        /// Finished; the video is at `status.output.path`. Final.
        Succeeded,
        /// Finished without a video; `status.reason` says why. Final.
        Failed,
    }
}

vocabulary! {
    /// Whether a job runs on its model's own lane or on a fallback lane.
    pub enum LaneAssignment {
        /// The model's dedicated lane.
        Dedicated,
        /// The dedicated lane's fallback lane; `fallbackCause` says why.
        Fallback,
    }
}

/// What the operator and the runner last recorded about a job. Its rules bind every writer:
/// a finished status is final, the phase only moves forward, `queuedAt` is written once.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.phase) || !(oldSelf.phase in ['Succeeded', 'Failed']) || self == oldSelf").message("the job is Succeeded or Failed, and a finished job's status never changes again: create a new VideoJob to run it again"))]
#[x_kube(validation = Rule::new("!has(oldSelf.phase) || (has(self.phase) && ({'Queued': 1, 'Running': 2, 'Succeeded': 3, 'Failed': 3}[self.phase] >= {'Queued': 1, 'Running': 2, 'Succeeded': 3, 'Failed': 3}[oldSelf.phase] || (oldSelf.phase == 'Running' && self.phase == 'Queued')))").message("status.phase only moves forward (Queued, Running, then Succeeded or Failed; from Running back to Queued only when the operator requeues a lost runner's job) and is never removed").field_path(".phase"))]
#[x_kube(validation = Rule::new("!has(oldSelf.queuedAt) || (has(self.queuedAt) && self.queuedAt == oldSelf.queuedAt)").message("status.queuedAt is the job's place in its lane's queue: once set it never changes (a requeue or a move to the fallback lane keeps it)").field_path(".queuedAt"))]
pub struct VideoJobStatus {
    /// Queued, Running, Succeeded or Failed. Succeeded and Failed are final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// The ModelLane the job was admitted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// Whether that lane is the model's dedicated lane or a fallback lane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane_mode: Option<LaneAssignment>,
    /// Why the job went to a fallback lane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_cause: Option<FallbackCause>,
    /// The lane the job left for its fallback lane: its model's own lane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// 1-based place in the lane's queue while Queued (1 = next to run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i32>,
    /// When the job was admitted to its lane's queue, in microseconds: the queue's order
    /// (oldest first). A requeued job keeps it, and so its place.
    #[x_kube(validation = Rule::new("self < timestamp('9000-01-01T00:00:00Z')").message("status.queuedAt must be before the year 9000: the operator cannot read later times"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<MicroTime>,
    /// When a runner started the job.
    #[x_kube(validation = Rule::new("self < timestamp('9000-01-01T00:00:00Z')").message("status.startedAt must be before the year 9000: the operator cannot read later times"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    /// When the job reached Succeeded or Failed.
    #[x_kube(validation = Rule::new("self < timestamp('9000-01-01T00:00:00Z')").message("status.finishedAt must be before the year 9000: the operator cannot read later times"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    /// Name of the runner (pod) that claimed the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Which start of that runner holds the job: `<pod uid>/<nonce>`, the nonce drawn when
    /// its process started; its heartbeat Lease names the same holder. A runner restarted
    /// under the same pod name is a new holder, and its old job is requeued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_incarnation: Option<String>,
    /// How many times a runner has started the job (more than 1 after a runner was lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// The seed actually used (resolved from a random one when the spec left it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Generation progress, updated at every denoising step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The generated video, once Succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
    /// GPU memory of the run, recorded after the runner cleaned up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    /// Machine-readable reason of the last transition, for example `QueueWaitTimeout`,
    /// `RunnerLost`, `GpuOutOfMemory` or `Cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<JobReason>,
    /// Human-readable explanation of the reason, with what to do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Standard conditions: Admitted, Running, Complete, Failed.
    #[x_kube(validation = Rule::new("self.all(c, c.lastTransitionTime < timestamp('9000-01-01T00:00:00Z'))").message("status.conditions[].lastTransitionTime must be before the year 9000: the operator cannot read later times"))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// How far generation has come.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Current stage: LoadingModel, EncodingPrompt, Denoising, Decoding or Encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Denoising steps done.
    pub step: i32,
    /// Denoising steps in all.
    pub total_steps: i32,
    /// Percent of the whole job done, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
}

/// The generated video.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// Path of the MP4 inside the lane's output volume.
    pub path: String,
    /// Size of the MP4 in bytes.
    pub size_bytes: i64,
    /// Lower-case hex SHA-256 of the MP4.
    pub sha256: String,
    /// Frames in the video.
    pub frames: i32,
    /// Frames per second of the video.
    pub fps: i32,
    /// Frame width in pixels.
    pub width: i32,
    /// Frame height in pixels.
    pub height: i32,
    /// Path of a preview image (the middle frame) inside the output volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_path: Option<String>,
}

/// GPU memory of one run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemoryReport {
    /// Device the job ran on, for example `cuda:0` or `cpu`.
    pub device: String,
    /// Most bytes allocated by tensors during the job.
    pub peak_allocated_bytes: i64,
    /// Most bytes reserved by the caching allocator during the job.
    pub peak_reserved_bytes: i64,
    /// Bytes still allocated after the runner cleaned up.
    pub after_cleanup_allocated_bytes: i64,
    /// Bytes still reserved after the runner emptied the cache.
    pub after_cleanup_reserved_bytes: i64,
    /// Where the model kept its parts: `resident`, `expertSwap` or `modelOffload` (the
    /// ModelLane's `spec.runner.memory.mode`, `auto` resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<String>,
    /// Whether the VAE decoded (and, for image to video, encoded) in spatial tiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_tiled: Option<bool>,
    /// Seconds the job waited for its model to be loaded (a cold load or a Shared lane's
    /// switch); 0 when it was already loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_load_seconds: Option<f64>,
    /// Each stage's memory and time, in order: `EncodingPrompt`, `EncodingImage` (image to
    /// video), `Denoising`, `Decoding`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageMemoryReport>,
}

/// GPU memory and time of one stage of a run. The allocator's cache is emptied after every
/// stage, so each stage's peak is its own.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StageMemoryReport {
    /// `EncodingPrompt`, `EncodingImage`, `Denoising` or `Decoding`.
    pub stage: String,
    /// Most bytes allocated by tensors during the stage.
    pub peak_allocated_bytes: i64,
    /// Most bytes reserved by the caching allocator during the stage.
    pub peak_reserved_bytes: i64,
    /// Seconds the stage took, bringing offloaded parts to the device included.
    pub seconds: f64,
    /// Seconds spent copying offloaded parts (or a swapped expert) to the device.
    pub load_seconds: f64,
    /// Allocator retries (cache flushes to satisfy an allocation) during the stage.
    pub alloc_retries: i64,
}
