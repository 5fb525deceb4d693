//! Framelane's Kubernetes API (`framelane.dev/v1alpha1`): the one definition of every type,
//! field, shape rule and reason that the operator, the runner, the CRDs and the tests share.
//! Types only: no client, no I/O.
//!
//! Static shape rules (ranges, enums, multiples, immutability) live in the CRD schema via
//! schemars attributes and CEL; rules that need other objects (a model's fixed parameters and
//! limits, a lane's queue depth) are decided in `framelane-core` and enforced by the
//! admission webhook and the controller.

/// Declares a vocabulary enum: the string of a variant is its name (in JSON, in text and
/// as a metric label).
macro_rules! vocabulary {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize, schemars::JsonSchema,
        )]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The string the API shows.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant),)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod crds;
pub mod modellane;
pub mod reasons;
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

impl GenerationMode {
    /// The mode as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationMode::T2v => "t2v",
            GenerationMode::I2v => "i2v",
        }
    }
}
