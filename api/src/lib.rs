//! Framelane's Kubernetes API (`framelane.dev/v1alpha1`): the one definition of every type,
//! field and shape rule that the operator, the runner, the CRDs and the tests share.
//!
//! Static shape rules (ranges, enums, multiples, immutability) live in the CRD schema via
//! schemars attributes and CEL; rules that need other objects (a model's fixed parameters and
//! limits, a lane's queue depth) belong to the admission webhook.

pub mod crds;
pub mod modellane;
pub mod runner;
#[cfg(feature = "serve")]
pub mod serve;
pub mod videojob;
pub mod videomodel;
pub mod wellknown;

pub use modellane::{ModelLane, ModelLaneSpec, ModelLaneStatus};
pub use videojob::{VideoJob, VideoJobSpec, VideoJobStatus};
pub use videomodel::{VideoModel, VideoModelSpec, VideoModelStatus};

/// The API group of every Framelane resource.
pub const GROUP: &str = "framelane.dev";
/// The served and stored version of every Framelane resource.
pub const VERSION: &str = "v1alpha1";

/// How a job produces its video: from text alone, or from text plus a start image.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum GenerationMode {
    /// Text to video.
    #[serde(rename = "t2v")]
    T2v,
    /// Image to video: the job's `spec.image` is the first frame.
    #[serde(rename = "i2v")]
    I2v,
}
