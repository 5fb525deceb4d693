//! Model packages: a directory with `manifest.json` and three TorchScript modules. Loading
//! checks the manifest, loads the modules onto the device, and runs each once on a tiny probe
//! input so a broken export fails here, naming the file, rather than mid-job.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{CModule, Device, Kind, Tensor};

use crate::sampler::SamplerKind;
use crate::schedule::{ScheduleError, SigmaSchedule};
use crate::tokenizer::{PromptTokenizer, TokenizerError, TokenizerKind};

pub const MANIFEST: &str = "manifest.json";
pub const TEXT_ENCODER: &str = "text_encoder.pt";
pub const DENOISER: &str = "denoiser.pt";
pub const VAE_DECODER: &str = "vae_decoder.pt";

/// The only manifest layout this runner reads.
pub const FORMAT_VERSION: u32 = 1;

/// Module weights' dtype on the device. Scheduler math stays float32 either way.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModuleDtype {
    Float32,
    Bfloat16,
}

impl ModuleDtype {
    pub fn kind(self) -> Kind {
        match self {
            ModuleDtype::Float32 => Kind::Float,
            ModuleDtype::Bfloat16 => Kind::BFloat16,
        }
    }
}

/// `manifest.json`. Field names are camelCase in the file.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// The VideoModel name this package implements.
    pub model: String,
    pub steps: u32,
    pub schedule: SigmaSchedule,
    pub sampler: SamplerKind,
    /// Ancestral noise amount (euler_ancestral only); 1.0 when left out.
    #[serde(default = "one")]
    pub eta: f64,
    pub cfg: f64,
    pub latent_channels: i64,
    pub temporal_stride: i64,
    pub spatial_stride: i64,
    pub text_length: i64,
    /// The denoiser's timestep input is `sigma * timestepScale`; 1000 when left out.
    #[serde(default = "thousand")]
    pub timestep_scale: f64,
    pub fps: u32,
    pub dtype: ModuleDtype,
    pub tokenizer: TokenizerKind,
    /// Bytes the weights take on the device; checked against free memory before loading.
    pub weight_bytes: u64,
}

fn one() -> f64 {
    1.0
}

fn thousand() -> f64 {
    1000.0
}

/// Why a package cannot be used. Each names the file and, where it applies, the field.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(
        "{path}: missing; a model package needs {MANIFEST}, {TEXT_ENCODER}, {DENOISER} and {VAE_DECODER}"
    )]
    MissingFile { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid manifest: {source}")]
    ManifestSyntax {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}` {reason}")]
    ManifestField {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error(
        "{path}: field `steps` is {manifest} but the VideoModel fixes steps to {expected}; re-export the package or fix the VideoModel"
    )]
    StepsMismatch {
        path: PathBuf,
        manifest: u32,
        expected: u32,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: not a loadable TorchScript module: {message}")]
    ModuleLoad { path: PathBuf, message: String },
    #[error("{path}: probe run failed: {message}")]
    ProbeFailed { path: PathBuf, message: String },
    #[error(
        "{path}: wrong output shape on the probe input {input:?}: expected {expected}, got {got:?}"
    )]
    WrongOutputShape {
        path: PathBuf,
        input: Vec<i64>,
        expected: String,
        got: Vec<i64>,
    },
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`; `expected_steps` is the VideoModel's fixed steps.
    pub fn read(dir: &Path, expected_steps: Option<u32>) -> Result<Manifest, PackageError> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Err(PackageError::MissingFile { path });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| PackageError::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| PackageError::ManifestSyntax {
                path: path.clone(),
                source,
            })?;
        manifest.check(&path, expected_steps)?;
        Ok(manifest)
    }

    fn check(&self, path: &Path, expected_steps: Option<u32>) -> Result<(), PackageError> {
        let field = |field: &'static str, reason: String| PackageError::ManifestField {
            path: path.to_path_buf(),
            field,
            reason,
        };
        if self.format_version != FORMAT_VERSION {
            return Err(field(
                "formatVersion",
                format!(
                    "is {} but this runner reads version {FORMAT_VERSION}",
                    self.format_version
                ),
            ));
        }
        if let Some(expected) = expected_steps
            && expected != self.steps
        {
            return Err(PackageError::StepsMismatch {
                path: path.to_path_buf(),
                manifest: self.steps,
                expected,
            });
        }
        self.schedule
            .sigmas(self.steps)
            .map_err(|e: ScheduleError| field("schedule", format!("is unusable: {e}")))?;
        let positive = [
            ("latentChannels", self.latent_channels),
            ("temporalStride", self.temporal_stride),
            ("spatialStride", self.spatial_stride),
            ("textLength", self.text_length),
        ];
        for (name, value) in positive {
            if value < 1 {
                return Err(field(name, format!("must be at least 1, got {value}")));
            }
        }
        if !(self.cfg.is_finite() && self.cfg >= 0.0) {
            return Err(field("cfg", format!("must be >= 0, got {}", self.cfg)));
        }
        if !(self.eta.is_finite() && (0.0..=1.0).contains(&self.eta)) {
            return Err(field("eta", format!("must be in [0, 1], got {}", self.eta)));
        }
        if !(self.timestep_scale.is_finite() && self.timestep_scale > 0.0) {
            return Err(field(
                "timestepScale",
                format!("must be > 0, got {}", self.timestep_scale),
            ));
        }
        if self.fps == 0 {
            return Err(field("fps", "must be at least 1".to_owned()));
        }
        Ok(())
    }

    /// The `steps + 1` noise levels of this package.
    pub fn sigmas(&self) -> Vec<f64> {
        self.schedule
            .sigmas(self.steps)
            .expect("checked when the manifest was read")
    }
}

/// A loaded, probed package: its modules live on `device` until this is dropped.
#[derive(Debug)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub device: Device,
    pub tokenizer: PromptTokenizer,
    pub text_encoder: CModule,
    pub denoiser: CModule,
    pub vae_decoder: CModule,
}

impl ModelPackage {
    /// Loads `dir` onto `device` and probes each module. `expected_steps` is the VideoModel's
    /// fixed number of steps; a manifest that says otherwise is rejected.
    pub fn load(
        dir: &Path,
        device: Device,
        expected_steps: Option<u32>,
    ) -> Result<ModelPackage, PackageError> {
        let manifest = Manifest::read(dir, expected_steps)?;
        let tokenizer =
            PromptTokenizer::load(dir, manifest.tokenizer, manifest.text_length as usize)?;
        let kind = manifest.dtype.kind();
        let load = |file: &str| -> Result<CModule, PackageError> {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(PackageError::MissingFile { path });
            }
            let load_error = |message: String| PackageError::ModuleLoad {
                path: path.clone(),
                message,
            };
            let mut module =
                CModule::load_on_device(&path, device).map_err(|e| load_error(e.to_string()))?;
            module.set_eval();
            // A module with no parameter in the manifest's dtype was exported in another one
            // and is converted here (both copies are on the device for a moment). Mixed
            // precision exports (bfloat16 with the layers diffusers keeps in float32) load as
            // saved.
            let kinds: Vec<Kind> = module
                .named_parameters()
                .map_err(|e| load_error(e.to_string()))?
                .iter()
                .map(|(_, t)| t.kind())
                .collect();
            if !kinds.is_empty() && !kinds.contains(&kind) {
                // tch's `CModule::to` panics instead of returning libtorch's error.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    module.to(device, kind, false);
                }))
                .map_err(|panic| load_error(crate::panic_message(&panic)))?;
            }
            Ok(module)
        };
        let package = ModelPackage {
            tokenizer,
            text_encoder: load(TEXT_ENCODER)?,
            denoiser: load(DENOISER)?,
            vae_decoder: load(VAE_DECODER)?,
            dir: dir.to_path_buf(),
            manifest,
            device,
        };
        package.probe()?;
        Ok(package)
    }

    /// Runs every module once on the smallest inputs the contract allows and checks shapes.
    fn probe(&self) -> Result<(), PackageError> {
        let _guard = tch::no_grad_guard();
        let m = &self.manifest;
        let kind = m.dtype.kind();
        let ids = self
            .tokenizer
            .encode("a probe prompt")
            .map_err(|message| TokenizerError {
                path: self.dir.join(crate::tokenizer::TOKENIZER_JSON),
                message,
            })?;
        let ids = Tensor::from_slice(&ids)
            .view([1, m.text_length])
            .to_device(self.device);
        let context = self.probe_one(TEXT_ENCODER, &self.text_encoder, &[&ids], |s| {
            (s.len() == 3 && s[0] == 1 && s[1] == m.text_length)
                .then_some(())
                .ok_or_else(|| format!("[1, {}, text_dim]", m.text_length))
        })?;
        let latent_shape = [1, m.latent_channels, 2, 2, 2];
        let latents = Tensor::zeros(latent_shape, (kind, self.device));
        // The timestep stays float32 whatever the module dtype (see sampler.rs).
        let timestep = Tensor::from_slice(&[500.0f32]).to_device(self.device);
        let _ = self.probe_one(
            DENOISER,
            &self.denoiser,
            &[&latents, &timestep, &context],
            |s| {
                (s == latent_shape)
                    .then_some(())
                    .ok_or_else(|| format!("{latent_shape:?} (the latent's shape)"))
            },
        )?;
        let video = [
            1,
            3,
            1 + m.temporal_stride,
            2 * m.spatial_stride,
            2 * m.spatial_stride,
        ];
        let _ = self.probe_one(VAE_DECODER, &self.vae_decoder, &[&latents], |s| {
            (s == video).then_some(()).ok_or_else(|| {
                format!(
                    "{video:?} ([1, 3, (T-1)*temporalStride+1, H*spatialStride, W*spatialStride])"
                )
            })
        })?;
        Ok(())
    }

    fn probe_one(
        &self,
        file: &str,
        module: &CModule,
        inputs: &[&Tensor],
        shape_ok: impl Fn(&[i64]) -> Result<(), String>,
    ) -> Result<Tensor, PackageError> {
        let path = self.dir.join(file);
        let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        let out = module
            .forward_ts(&owned)
            .map_err(|e| PackageError::ProbeFailed {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let got = out.size();
        shape_ok(&got).map_err(|expected| PackageError::WrongOutputShape {
            path,
            input: inputs[0].size(),
            expected,
            got,
        })?;
        Ok(out)
    }
}
