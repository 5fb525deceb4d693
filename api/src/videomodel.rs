//! `VideoModel` (cluster-scoped): what a model is — its fixed sampling parameters, defaults,
//! limits and where its package lives.

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
pub struct VideoModelSpec {
    /// Sampling parameters every job of this model must use. A job that sets a different
    /// value is rejected at admission (HTTP 422); a job that leaves one out gets this value.
    pub fixed_parameters: FixedParameters,
    /// Values a job gets for the size and timing fields it leaves out.
    pub defaults: ModelDefaults,
    /// The largest video a job of this model may ask for; larger requests are rejected at
    /// admission with the limit in the message.
    pub limits: ModelLimits,
    /// Where the runner finds the model's files.
    pub package: ModelPackage,
    /// The generation modes this model offers. A job asking for another mode is rejected.
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

/// Where a model's files live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelPackage {
    /// Directory of the package (manifest.json plus TorchScript modules), relative to the
    /// root of the lane's model volume. No leading `/` and no `..`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')").message("must be a relative path inside the model volume: no leading '/' and no '..'"))]
    pub path: String,
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
