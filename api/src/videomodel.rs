//! `VideoModel` (cluster-scoped): what a model is — its fixed sampling parameters, defaults,
//! limits, its weight files and how it samples.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::GenerationMode;

/// A video-generation model that lanes can serve and jobs can name.
// Each printcolumn(...) repeats `type_`; clippy reads that as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "framelane.dev",
    version = "v1alpha1",
    kind = "VideoModel",
    plural = "videomodels",
    shortname = "vm",
    category = "framelane",
    status = "VideoModelStatus",
    printcolumn(
        name = "Steps",
        type_ = "integer",
        json_path = ".spec.fixedParameters.steps"
    ),
    printcolumn(
        name = "Cfg",
        type_ = "number",
        json_path = ".spec.fixedParameters.cfg"
    ),
    printcolumn(name = "Modes", type_ = "string", json_path = ".spec.modes"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.defaults.width <= self.limits.maxWidth").field_path(".defaults.width").message("must be at most limits.maxWidth: every job that leaves width out would be refused; lower the default or raise the limit"))]
#[x_kube(validation = Rule::new("self.defaults.height <= self.limits.maxHeight").field_path(".defaults.height").message("must be at most limits.maxHeight: every job that leaves height out would be refused; lower the default or raise the limit"))]
#[x_kube(validation = Rule::new("self.defaults.frames <= self.limits.maxFrames").field_path(".defaults.frames").message("must be at most limits.maxFrames: every job that leaves frames out would be refused; lower the default or raise the limit"))]
pub struct VideoModelSpec {
    /// Sampling parameters every job of this model must use. A job that sets a different
    /// value is rejected at admission (HTTP 422); a job that leaves one out gets this value.
    pub fixed_parameters: FixedParameters,
    /// Values a job gets for the size and timing fields it leaves out.
    pub defaults: ModelDefaults,
    /// The largest video a job of this model may ask for; larger requests are rejected at
    /// admission with the limit in the message.
    pub limits: ModelLimits,
    /// The model's weight files on the lane's model volume.
    pub weights: ModelWeights,
    /// How the model samples: solver, noise schedule and expert boundary. Left out: as a
    /// diffusers folder was saved (its scheduler/ and model_index.json's boundary_ratio);
    /// ComfyUI files carry no scheduler and need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    /// The generation modes this model offers: what its weights run (`t2v` for a
    /// text-to-video transformer, `i2v` for an image-to-video one). A job asking for another
    /// mode is rejected; a runner refuses a model whose weights run another mode.
    #[schemars(length(min = 1, max = 2), extend("x-kubernetes-list-type" = "set"))]
    pub modes: Vec<GenerationMode>,
}

/// Sampling parameters fixed by the model's training or distillation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FixedParameters {
    /// Number of denoising steps (AniSora: 8, Phr00t: 4).
    #[schemars(range(min = 1, max = 1000))]
    pub steps: i32,
    /// Classifier-free guidance scale. 1.0 disables guidance and skips the unconditional
    /// pass (Phr00t). Absent: the model accepts any cfg a job sets, default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub cfg: Option<f64>,
}

/// Values a job gets for fields it leaves out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelDefaults {
    /// Frame width in pixels, a multiple of 16.
    #[schemars(range(min = 256, max = 4096))]
    #[x_kube(validation = Rule::new("self % 16 == 0").message("must be a multiple of 16"))]
    pub width: i32,
    /// Frame height in pixels, a multiple of 16.
    #[schemars(range(min = 256, max = 4096))]
    #[x_kube(validation = Rule::new("self % 16 == 0").message("must be a multiple of 16"))]
    pub height: i32,
    /// Number of frames, of the form 4k+1 (the video VAE's temporal stride is 4).
    #[schemars(range(min = 1, max = 1025))]
    #[x_kube(validation = Rule::new("self % 4 == 1").message("must be of the form 4k+1 (1, 5, 9, ..., 81, ...)"))]
    pub frames: i32,
    /// Frames per second of the output video.
    #[schemars(range(min = 1, max = 120))]
    pub fps: i32,
}

/// The largest video a job may ask for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxWidth >= 256 && self.maxHeight >= 256").message("maxWidth and maxHeight must be at least 256"))]
pub struct ModelLimits {
    /// Largest frame width in pixels.
    #[schemars(range(min = 256, max = 4096))]
    pub max_width: i32,
    /// Largest frame height in pixels.
    #[schemars(range(min = 256, max = 4096))]
    pub max_height: i32,
    /// Largest number of frames.
    #[schemars(range(min = 1, max = 1025))]
    pub max_frames: i32,
}

/// Where a model's weights are. Every path is relative to the root of the lane's model
/// volume: no leading `/` and no `..`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.format == 'diffusers' ? has(self.path) && !has(self.file) && !has(self.files) && !has(self.tokenizer) : !has(self.path) && has(self.file) != has(self.files) && has(self.tokenizer)").message("format diffusers takes path only; format comfyui takes tokenizer and one of file or files"))]
pub struct ModelWeights {
    /// `diffusers`: a pipeline folder as diffusers saves it (model_index.json, tokenizer/,
    /// text_encoder/, transformer/, transformer_2/, vae/, scheduler/). `comfyui`: ComfyUI's
    /// safetensors files (fp8 and scaled fp8 included).
    pub format: WeightsFormat,
    /// diffusers: the pipeline folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(RELATIVE).message(RELATIVE_MESSAGE))]
    pub path: Option<String>,
    /// comfyui: one AllInOne checkpoint holding the transformer, the umT5 text encoder and
    /// the VAE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(RELATIVE).message(RELATIVE_MESSAGE))]
    pub file: Option<String>,
    /// comfyui: split files, one set per component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<ComfyUiFiles>,
    /// comfyui: a folder with the umT5 tokenizer's tokenizer.json (the `tokenizer/` folder of
    /// a diffusers Wan model); ComfyUI files carry none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(RELATIVE).message(RELATIVE_MESSAGE))]
    pub tokenizer: Option<String>,
}

const RELATIVE: &str = "!self.startsWith('/') && !self.split('/').exists(p, p == '..')";
const RELATIVE_MESSAGE: &str =
    "must be a relative path inside the model volume: no leading '/' and no '..'";
const ALL_RELATIVE: &str = "self.all(f, !f.startsWith('/') && !f.split('/').exists(p, p == '..'))";
const ALL_RELATIVE_MESSAGE: &str =
    "must be relative paths inside the model volume: no leading '/' and no '..'";

/// The layout of a model's weight files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum WeightsFormat {
    /// A diffusers pipeline folder.
    #[serde(rename = "diffusers")]
    Diffusers,
    /// ComfyUI's files.
    #[serde(rename = "comfyui")]
    ComfyUi,
}

/// A model in ComfyUI's split files.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComfyUiFiles {
    /// The diffusion transformer (of a two-expert model, the high-noise one): one file, or
    /// the parts of one split over several.
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new(ALL_RELATIVE).message(ALL_RELATIVE_MESSAGE))]
    pub transformer: Vec<String>,
    /// The low-noise expert of a two-expert model (Wan 2.2 A14B), as `transformer`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(validation = Rule::new(ALL_RELATIVE).message(ALL_RELATIVE_MESSAGE))]
    pub transformer2: Vec<String>,
    /// The umT5 text encoder.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(RELATIVE).message(RELATIVE_MESSAGE))]
    pub text_encoder: String,
    /// The Wan VAE.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(RELATIVE).message(RELATIVE_MESSAGE))]
    pub vae: String,
}

/// How a model samples.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.solver != 'unipc' || !has(self.schedule) || self.schedule == 'shift'").message("unipc runs on its own shifted flow schedule: leave schedule out or set it to shift"))]
#[x_kube(validation = Rule::new("!has(self.eta) || self.solver == 'euler_ancestral'").message("eta is the ancestral noise of euler_ancestral only"))]
pub struct Sampling {
    /// `unipc`: flow UniPC multistep (diffusers' UniPCMultistepScheduler as Wan is saved
    /// with it: order 2, bh2). `euler`: flow Euler. `euler_ancestral`: rectified-flow Euler
    /// ancestral (ComfyUI's euler_ancestral_RF, `euler_a`).
    pub solver: Solver,
    /// The noise levels (see [`Schedule`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The flow time shift: `sigma' = shift * s / (1 + (shift - 1) * s)`.
    #[schemars(range(min = 0.01, max = 100.0))]
    pub shift: f64,
    /// euler_ancestral: how much noise each step adds back, 0 (plain Euler) to 1 (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub eta: Option<f64>,
    /// Two-expert models (Wan 2.2 A14B): where the high-noise transformer hands over to the
    /// low-noise one. Left out: a diffusers folder's boundary_ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Experts>,
}

/// Where a two-expert model switches transformers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Experts {
    /// The high-noise transformer runs the steps whose timestep is at least `boundary` times
    /// the solver's 1000 training timesteps, the low-noise one the rest (AniSora: 0.9).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub boundary: f64,
}

/// How each sampling step moves the latents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Solver {
    /// Flow UniPC multistep.
    #[serde(rename = "unipc")]
    UniPc,
    /// Flow Euler.
    #[serde(rename = "euler")]
    Euler,
    /// Rectified-flow Euler ancestral.
    #[serde(rename = "euler_ancestral")]
    EulerAncestral,
}

/// The noise levels the solver steps through. `shift` (default): the solver's own schedule,
/// linear in time then shifted (diffusers' flow sigmas). `beta`: ComfyUI's beta scheduler
/// (alpha = beta = 0.6) over its flow table shifted by `shift`; not for `unipc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Schedule {
    /// Linear in time, then shifted.
    #[serde(rename = "shift")]
    Shift,
    /// ComfyUI's beta scheduler, shifted.
    #[serde(rename = "beta")]
    Beta,
}

/// What the operator last observed about a model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VideoModelStatus {
    /// Lanes that currently list this model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
