//! A whole Wan model, the way diffusers' `WanPipeline` (text to video) and
//! `WanImageToVideoPipeline` (image to video, Wan 2.2 A14B: no image encoder) run it: the
//! prompt through umT5, the latents through one or two transformers and a solver, the result
//! through the VAE.
//!
//! Image to video: the first frame, followed by `frames - 1` black frames, is VAE-encoded and
//! normalized, a mask marks the first latent frame as given, and the transformer sees the
//! latents, the mask (4 channels) and the encoded frames (16) stacked: 36 input channels.
//! A transformer of 16 input channels makes text-to-video models, one of 36 image-to-video
//! ones; a model runs only its own mode.
//!
//! Precision: the transformers and the text encoder compute in the model's kind (bfloat16 in
//! production), the VAE in its own (float32); latents, noise and solver math are float32.

use std::path::{Path, PathBuf};
use std::time::Instant;

use framelane_api::videojob::StageMemoryReport;
use serde::Deserialize;
use tch::{Device, Kind, TchError, Tensor};

use super::components::{ComponentError, TextEncoderFiles, VaeFiles};
use super::recipe::Solver;
use super::safetensors::{SafetensorsError, TensorFiles};
use super::scheduler::{Expert, SchedulerConfig, SchedulerError, expert_for};
use super::transformer::WanTransformer;
use super::transformer::{Storage, TransformerConfig};
use super::umt5::{Umt5Encoder, Umt5Error, tokenize_prompts};
use super::vae::{AutoencoderKLWan, Tiling, VaeError};
use super::weights::{TransformerCheckpoint, WeightsError};
use crate::accel::AccelError;
use crate::memory::{MeasuredStage, StageMeter};
use crate::placement::{self, HostWeights, MemoryMode, PartBytes, Placement, VaeTiling};
use crate::profile::{self, ProfileError};
use crate::sampler::{StepControl, guide, uses_uncond};
use crate::tokenizer::{PromptTokenizer, TokenizerError};
use crate::video::Frames;

/// Token ids per prompt: the Wan pipelines' `max_sequence_length`.
pub const TEXT_LENGTH: usize = 512;
/// Mask channels stacked before the encoded first frame in image-to-video inputs.
const MASK_CHANNELS: i64 = 4;

/// Where a Wan model's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFiles {
    /// A diffusers pipeline folder: `model_index.json`, `tokenizer/`, `text_encoder/`,
    /// `transformer/` (and `transformer_2/`), `vae/`, `scheduler/`.
    Diffusers(PathBuf),
    /// ComfyUI files.
    ComfyUi(ComfyUiFiles),
}

/// A model in ComfyUI's files: one AllInOne file, or split files per component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComfyUiFiles {
    /// The (high-noise) transformer: one or more files. An AllInOne file also holds the text
    /// encoder and the VAE.
    pub transformer: Vec<PathBuf>,
    /// The low-noise expert of a two-expert model; empty for one transformer.
    pub transformer_2: Vec<PathBuf>,
    /// The umT5 text encoder; empty: in the transformer's files.
    pub text_encoder: Vec<PathBuf>,
    /// The VAE; empty: in the transformer's files.
    pub vae: Vec<PathBuf>,
    /// A folder with the umT5 tokenizer's `tokenizer.json`.
    pub tokenizer: PathBuf,
}

/// What a model is made of and how it samples. `None` takes the value a diffusers folder was
/// saved with (`scheduler/`, `model_index.json`'s `boundary_ratio`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub files: ModelFiles,
    pub solver: Option<Solver>,
    /// Where a two-expert model switches from its high-noise to its low-noise transformer,
    /// as a fraction of the solver's timestep range.
    pub boundary_ratio: Option<f64>,
}

/// The dtypes a pipeline computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    /// The transformers and the text encoder (float32 or bfloat16).
    pub model: Kind,
    /// The VAE.
    pub vae: Kind,
    /// Whether the transformers' linear weights are stored in float8 and upcast to `model`
    /// as each layer runs (`--transformer-weights fp8`; see [`Storage`]).
    pub fp8_transformers: bool,
}

impl Precision {
    /// bfloat16 weights with a float32 VAE, as the Wan models are published and run.
    pub const BFLOAT16: Precision = Precision {
        model: Kind::BFloat16,
        vae: Kind::Float,
        fp8_transformers: false,
    };
    pub const FLOAT32: Precision = Precision {
        model: Kind::Float,
        vae: Kind::Float,
        fp8_transformers: false,
    };

    /// How the transformers keep their weights.
    pub fn transformer_storage(self) -> Storage {
        Storage {
            kind: self.model,
            fp8: self.fp8_transformers,
        }
    }
}

/// What a model generates from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    TextToVideo,
    ImageToVideo,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::TextToVideo => "t2v",
            Mode::ImageToVideo => "i2v",
        }
    }
}

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a diffusers Wan pipeline index: {reason}")]
    ModelIndex { path: PathBuf, reason: String },
    #[error(transparent)]
    Transformer(#[from] WeightsError),
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    File(#[from] SafetensorsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("the model's parts do not fit together: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Sampling(String),
    #[error("`{field}` {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("cancelled at a step boundary after {completed} of {total} denoising steps")]
    Cancelled { completed: usize, total: usize },
    #[error(transparent)]
    TextEncoder(#[from] Umt5Error),
    #[error(transparent)]
    Vae(#[from] VaeError),
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(transparent)]
    Profile(#[from] Box<ProfileError>),
    #[error("{0}")]
    Torch(#[from] TchError),
}

/// diffusers' `model_index.json`: the fields that decide how the pipeline runs.
#[derive(Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    #[serde(default)]
    boundary_ratio: Option<f64>,
    #[serde(default)]
    expand_timesteps: bool,
    #[serde(default)]
    image_encoder: Option<(Option<String>, Option<String>)>,
    #[serde(default)]
    transformer_2: Option<(Option<String>, Option<String>)>,
}

const PIPELINES: [&str; 2] = ["WanPipeline", "WanImageToVideoPipeline"];

impl ModelIndex {
    fn read(dir: &Path) -> Result<ModelIndex, PipelineError> {
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path).map_err(|source| PipelineError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |reason: String| PipelineError::ModelIndex {
            path: path.clone(),
            reason,
        };
        let index: ModelIndex = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if !PIPELINES.contains(&index.class_name.as_str()) {
            return Err(bad(format!(
                "_class_name is {}; the runner runs {PIPELINES:?}",
                index.class_name
            )));
        }
        if index.expand_timesteps {
            return Err(bad(
                "expand_timesteps is true (Wan 2.2 TI2V-5B), which the runner does not implement"
                    .to_owned(),
            ));
        }
        if index
            .image_encoder
            .as_ref()
            .is_some_and(|(library, _)| library.is_some())
        {
            return Err(bad(
                "it has an image_encoder (Wan 2.1 image-to-video's CLIP), which the runner does \
                 not implement; use a Wan 2.2 image-to-video model"
                    .to_owned(),
            ));
        }
        Ok(index)
    }

    fn has_transformer_2(&self) -> bool {
        self.transformer_2
            .as_ref()
            .is_some_and(|(library, _)| library.is_some())
    }
}

/// The transformers, text encoder, VAE and tokenizer of a model, with their configs, before
/// any weight is read.
struct Parts {
    tokenizer_dir: PathBuf,
    text_encoder: TextEncoderFiles,
    transformer: TransformerCheckpoint,
    transformer_2: Option<TransformerCheckpoint>,
    vae: VaeFiles,
    solver: Solver,
    boundary_ratio: Option<f64>,
}

impl Parts {
    fn find(spec: &ModelSpec) -> Result<Parts, PipelineError> {
        match &spec.files {
            ModelFiles::Diffusers(dir) => {
                let index = ModelIndex::read(dir)?;
                let solver = match &spec.solver {
                    Some(solver) => solver.clone(),
                    None => Solver::Scheduler(SchedulerConfig::read(
                        &dir.join("scheduler/scheduler_config.json"),
                    )?),
                };
                let transformer_2 = index
                    .has_transformer_2()
                    .then(|| TransformerCheckpoint::diffusers(&dir.join("transformer_2")))
                    .transpose()?;
                Ok(Parts {
                    tokenizer_dir: dir.join("tokenizer"),
                    text_encoder: TextEncoderFiles::diffusers(&dir.join("text_encoder"))?,
                    transformer: TransformerCheckpoint::diffusers(&dir.join("transformer"))?,
                    transformer_2,
                    vae: VaeFiles::diffusers(&dir.join("vae"))?,
                    solver,
                    boundary_ratio: spec.boundary_ratio.or(index.boundary_ratio),
                })
            }
            ModelFiles::ComfyUi(files) => {
                let transformer_files = TensorFiles::open(&files.transformer)?;
                let or_transformer = |paths: &[PathBuf]| {
                    if paths.is_empty() {
                        Ok(transformer_files.clone())
                    } else {
                        TensorFiles::open(paths)
                    }
                };
                let text_files = or_transformer(&files.text_encoder)?;
                let vae_files = or_transformer(&files.vae)?;
                let transformer_2 = (!files.transformer_2.is_empty())
                    .then(|| {
                        TransformerCheckpoint::comfyui(
                            TensorFiles::open(&files.transformer_2)?,
                            None,
                        )
                    })
                    .transpose()?;
                Ok(Parts {
                    tokenizer_dir: files.tokenizer.clone(),
                    text_encoder: TextEncoderFiles::comfyui(text_files)?,
                    transformer: TransformerCheckpoint::comfyui(transformer_files, None)?,
                    transformer_2,
                    vae: VaeFiles::comfyui(vae_files)?,
                    solver: spec.solver.clone().ok_or_else(|| {
                        PipelineError::Sampling(
                            "ComfyUI files carry no scheduler: the model must name its sampling \
                             (solver, schedule, shift)"
                                .to_owned(),
                        )
                    })?,
                    boundary_ratio: spec.boundary_ratio,
                })
            }
        }
    }

    /// Refuses parts that cannot work together, before reading weights. Returns the mode.
    fn check(&self) -> Result<Mode, PipelineError> {
        let mismatch = |m: String| Err(PipelineError::Mismatch(m));
        let config = self.transformer.config();
        if let Some(low) = &self.transformer_2 {
            let low = low.config();
            if (
                low.in_channels,
                low.out_channels(),
                low.text_dim,
                low.patch_size,
            ) != (
                config.in_channels,
                config.out_channels(),
                config.text_dim,
                config.patch_size,
            ) {
                return mismatch(format!(
                    "the two transformers take different inputs: {} and {} channels, text {} \
                     and {}, patch {:?} and {:?}",
                    config.in_channels,
                    low.in_channels,
                    config.text_dim,
                    low.text_dim,
                    config.patch_size,
                    low.patch_size
                ));
            }
        }
        match (&self.transformer_2, self.boundary_ratio) {
            (Some(_), None) => {
                return Err(PipelineError::Sampling(
                    "the model has two transformers but no expert boundary: set \
                     sampling.experts.boundary (Wan 2.2 A14B: 0.9 for image to video, 0.875 \
                     for text to video)"
                        .to_owned(),
                ));
            }
            (None, Some(ratio)) => {
                return Err(PipelineError::Sampling(format!(
                    "an expert boundary of {ratio} is set, but the model has one transformer; \
                     remove sampling.experts or give the model its second transformer"
                )));
            }
            (_, Some(ratio)) if !(0.0..=1.0).contains(&ratio) => {
                return Err(PipelineError::Sampling(format!(
                    "the expert boundary must be between 0 and 1, got {ratio}"
                )));
            }
            _ => {}
        }
        self.solver.check()?;
        let text = self.text_encoder.config().d_model;
        if text != config.text_dim {
            return mismatch(format!(
                "the text encoder makes {text}-wide embeddings, the transformer takes {} \
                 (text_dim)",
                config.text_dim
            ));
        }
        let z = self.vae.config().z_dim;
        if config.out_channels() != z {
            return mismatch(format!(
                "the transformer predicts {} latent channels, the VAE has {z}",
                config.out_channels()
            ));
        }
        if config.in_channels == z {
            Ok(Mode::TextToVideo)
        } else if config.in_channels == 2 * z + MASK_CHANNELS {
            Ok(Mode::ImageToVideo)
        } else {
            mismatch(format!(
                "the transformer takes {} input channels: neither text to video ({z}) nor \
                 image to video ({})",
                config.in_channels,
                2 * z + MASK_CHANNELS
            ))
        }
    }

    fn bytes(&self, precision: Precision) -> PartBytes {
        let transformer =
            |c: &TransformerCheckpoint| c.config().stored_bytes(precision.transformer_storage());
        PartBytes {
            text_encoder: self.text_encoder.bytes(precision.model),
            transformer: transformer(&self.transformer),
            transformer_2: self.transformer_2.as_ref().map(transformer),
            vae: self.vae.bytes(precision.vae),
        }
    }
}

/// One job's inputs.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub prompt: &'a str,
    /// The empty prompt when the job has none.
    pub negative_prompt: &'a str,
    pub width: i64,
    pub height: i64,
    pub frames: i64,
    pub steps: u32,
    /// Classifier-free guidance; 1 or less runs each step once, on the prompt alone.
    pub guidance: f64,
    pub seed: u64,
    /// Image to video: the first frame `[1, 3, height, width]` in [-1, 1] (see
    /// `crate::image`).
    pub image: Option<&'a Tensor>,
}

/// How a loaded model keeps its memory: where its parts live and whether the VAE tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    pub mode: MemoryMode,
    pub vae_tiling: VaeTiling,
    /// Keep a host copy of every part, the resident ones too, so that the whole model can
    /// leave the device ([`WanPipeline::park`]) and come back without reading its files: what
    /// a Shared runner does with its models between switches.
    pub host_copies: bool,
}

/// A part of the model: kept on the device, or kept in host memory and copied to the device
/// for its stage only.
struct Part<M> {
    on_device: Option<M>,
    /// The host copy the device copy is made from: offloaded parts, and every part of a model
    /// loaded with [`MemoryPlan::host_copies`].
    host: Option<HostWeights>,
    /// Whether the part stays on the device between stages (its placement keeps it there).
    resident: bool,
}

impl<M> Part<M> {
    /// A resident part: from its host copy when `host` is given (a model that can be parked),
    /// else loaded straight from its files.
    fn resident(
        host: Option<HostWeights>,
        from_host: impl FnOnce(&HostWeights) -> Result<M, PipelineError>,
        load: impl FnOnce() -> Result<M, PipelineError>,
    ) -> Result<Part<M>, PipelineError> {
        let module = match &host {
            Some(host) => from_host(host)?,
            None => load()?,
        };
        Ok(Part {
            on_device: Some(module),
            host,
            resident: true,
        })
    }

    fn offloaded(host: HostWeights) -> Part<M> {
        Part {
            on_device: None,
            host: Some(host),
            resident: false,
        }
    }

    /// The part on the device, copied there from its host copy when it is not; the seconds
    /// that took are added to `load_seconds`.
    fn bring(
        &mut self,
        load_seconds: &mut f64,
        build: impl FnOnce(&HostWeights) -> Result<M, PipelineError>,
    ) -> Result<&M, PipelineError> {
        let started = Instant::now();
        if self.copy_in(build)? {
            *load_seconds += started.elapsed().as_secs_f64();
        }
        Ok(self.on_device.as_ref().expect("brought above"))
    }

    /// Copies the part to the device from its host copy unless it is there; whether it copied.
    fn copy_in(
        &mut self,
        build: impl FnOnce(&HostWeights) -> Result<M, PipelineError>,
    ) -> Result<bool, PipelineError> {
        if self.on_device.is_some() {
            return Ok(false);
        }
        let host = self
            .host
            .as_ref()
            .expect("a part not on the device has a host copy");
        self.on_device = Some(build(host)?);
        Ok(true)
    }

    /// Brings a resident part back to the device after [`AnyPart::park`] (the model cache
    /// times the whole switch).
    fn restore(
        &mut self,
        build: impl FnOnce(&HostWeights) -> Result<M, PipelineError>,
    ) -> Result<(), PipelineError> {
        if self.resident {
            self.copy_in(build)?;
        }
        Ok(())
    }
}

/// What the pipeline does alike to each of its parts, whatever their modules.
trait AnyPart {
    /// Drops the device copy of an offloaded part; a resident part stays.
    fn release(&mut self);
    /// Drops the device copy whatever the placement; the host copy stays.
    fn park(&mut self);
    fn on_device(&self) -> bool;
    fn host_bytes(&self) -> u64;
}

impl<M> AnyPart for Part<M> {
    fn release(&mut self) {
        if !self.resident {
            self.on_device = None;
        }
    }

    fn park(&mut self) {
        assert!(
            self.host.is_some(),
            "only a part with a host copy is parked"
        );
        self.on_device = None;
    }

    fn on_device(&self) -> bool {
        self.on_device.is_some()
    }

    fn host_bytes(&self) -> u64 {
        self.host.as_ref().map_or(0, HostWeights::bytes)
    }
}

/// A loaded model on one device.
pub struct WanPipeline {
    tokenizer: PromptTokenizer,
    text_encoder_files: TextEncoderFiles,
    text_encoder: Part<Umt5Encoder>,
    transformer_config: TransformerConfig,
    transformer: Part<WanTransformer>,
    transformer_2_config: Option<TransformerConfig>,
    transformer_2: Option<Part<WanTransformer>>,
    vae_files: VaeFiles,
    vae: Part<AutoencoderKLWan>,
    solver: Solver,
    boundary_ratio: Option<f64>,
    precision: Precision,
    placement: Placement,
    vae_tiling: VaeTiling,
    bytes: PartBytes,
    mode: Mode,
    device: Device,
    /// The measured stages of the running job (see [`WanPipeline::take_stages`]).
    stages: Vec<StageMemoryReport>,
    /// Whether a VAE pass of the running job was tiled.
    tiled: bool,
    /// Whether the running job's VAE passes tile, decided before it ran
    /// ([`WanPipeline::set_job_tiling`]); `None`: they tile only under `vae_tiling` `on`.
    job_tiling: Option<bool>,
}

impl WanPipeline {
    /// Bytes the model's weights take on the device in `precision`, read from the file
    /// headers: what a load needs before activations.
    pub fn weight_bytes(spec: &ModelSpec, precision: Precision) -> Result<u64, PipelineError> {
        Ok(Parts::find(spec)?.bytes(precision).all())
    }

    /// The mode the model's weights run (image or text to video), read from its configs and
    /// the file headers, no weight loaded.
    pub fn mode_of(spec: &ModelSpec) -> Result<Mode, PipelineError> {
        Parts::find(spec)?.check()
    }

    /// Bytes of each part in `precision`, read from the file headers.
    pub fn part_bytes(spec: &ModelSpec, precision: Precision) -> Result<PartBytes, PipelineError> {
        Ok(Parts::find(spec)?.bytes(precision))
    }

    /// Reads and checks every part, then loads the weights onto `device`, every part
    /// resident.
    pub fn load(
        spec: &ModelSpec,
        precision: Precision,
        device: Device,
    ) -> Result<WanPipeline, PipelineError> {
        Self::load_with(spec, precision, device, MemoryPlan::default())
    }

    /// Reads and checks every part, then places the weights as `plan` says: on `device`, or
    /// in host memory for the parts that wait there.
    pub fn load_with(
        spec: &ModelSpec,
        precision: Precision,
        device: Device,
        plan: MemoryPlan,
    ) -> Result<WanPipeline, PipelineError> {
        let parts = Parts::find(spec)?;
        let mode = parts.check()?;
        let bytes = parts.bytes(precision);
        let memory_mode =
            profile::resolve_auto(plan.mode, [&spec.files], precision, device).map_err(Box::new)?;
        let placement = placement::place(memory_mode, &bytes);
        let tokenizer = PromptTokenizer::load(&parts.tokenizer_dir, TEXT_LENGTH)?;
        let offload_experts = placement != Placement::Resident;
        let offload_rest = placement == Placement::ModelOffload;
        let (kind, storage) = (precision.model, precision.transformer_storage());
        // The host copy a resident part is built from, when the model must be parkable.
        let host_copy = |read: &dyn Fn() -> Result<HostWeights, PipelineError>| {
            plan.host_copies.then(read).transpose()
        };
        let transformer_part = |checkpoint: &TransformerCheckpoint| {
            let read = || Ok(WanTransformer::read_host(checkpoint, storage)?);
            if offload_experts {
                return Ok::<_, PipelineError>(Part::offloaded(read()?));
            }
            Part::resident(
                host_copy(&read)?,
                |host| {
                    Ok(WanTransformer::from_host(
                        checkpoint.config(),
                        host,
                        storage,
                        device,
                    )?)
                },
                || Ok(WanTransformer::load(checkpoint, storage, device)?),
            )
        };
        let transformer = transformer_part(&parts.transformer)?;
        let transformer_2 = parts
            .transformer_2
            .as_ref()
            .map(transformer_part)
            .transpose()?;
        let (text, vae_files, vae_kind) = (&parts.text_encoder, &parts.vae, precision.vae);
        let read_text = || Ok(text.read_host(kind)?);
        let text_encoder = if offload_rest {
            Part::offloaded(read_text()?)
        } else {
            Part::resident(
                host_copy(&read_text)?,
                |host| Ok(text.from_host(host, kind, device)?),
                || Ok(text.load(kind, device)?),
            )?
        };
        let read_vae = || Ok(vae_files.read_host(vae_kind)?);
        let vae = if offload_rest {
            Part::offloaded(read_vae()?)
        } else {
            Part::resident(
                host_copy(&read_vae)?,
                |host| Ok(vae_files.from_host(host, vae_kind, device)?),
                || Ok(vae_files.load(vae_kind, device)?),
            )?
        };
        Ok(WanPipeline {
            tokenizer,
            text_encoder_files: parts.text_encoder,
            text_encoder,
            transformer_config: parts.transformer.config().clone(),
            transformer,
            transformer_2_config: parts.transformer_2.as_ref().map(|c| c.config().clone()),
            transformer_2,
            vae_files: parts.vae,
            vae,
            solver: parts.solver,
            boundary_ratio: parts.boundary_ratio,
            precision,
            placement,
            vae_tiling: plan.vae_tiling,
            bytes,
            mode,
            device,
            stages: Vec::new(),
            tiled: false,
            job_tiling: None,
        })
    }

    /// Where this model keeps its parts.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Bytes of each part's weights.
    pub fn bytes(&self) -> PartBytes {
        self.bytes
    }

    /// Which parts are on the device now: text encoder, high-noise (or only) transformer,
    /// low-noise transformer, VAE.
    pub fn on_device(&self) -> [bool; 4] {
        self.parts()
            .map(|part| part.is_some_and(AnyPart::on_device))
    }

    /// The text encoder, the high-noise (or only) transformer, the low-noise one if any, and
    /// the VAE.
    fn parts(&self) -> [Option<&dyn AnyPart>; 4] {
        [
            Some(&self.text_encoder),
            Some(&self.transformer),
            self.transformer_2.as_ref().map(|p| p as &dyn AnyPart),
            Some(&self.vae),
        ]
    }

    fn parts_mut(&mut self) -> impl Iterator<Item = &mut dyn AnyPart> {
        [
            Some(&mut self.text_encoder as &mut dyn AnyPart),
            Some(&mut self.transformer),
            self.transformer_2.as_mut().map(|p| p as &mut dyn AnyPart),
            Some(&mut self.vae),
        ]
        .into_iter()
        .flatten()
    }

    /// The measured stages since the last call, in order.
    pub fn take_stages(&mut self) -> Vec<StageMemoryReport> {
        self.tiled = false;
        std::mem::take(&mut self.stages)
    }

    /// Sends every offloaded part back to host memory (resident parts stay): after a job,
    /// whichever way it ended.
    pub fn release_offloaded(&mut self) {
        self.parts_mut().for_each(AnyPart::release);
    }

    /// Bytes of the host copies this model holds (pinned memory next to a GPU).
    pub fn host_bytes(&self) -> u64 {
        self.parts()
            .into_iter()
            .flatten()
            .map(AnyPart::host_bytes)
            .sum()
    }

    /// Takes the whole model off the device; its host copies stay, so
    /// [`WanPipeline::unpark`] brings it back without reading its files. Panics unless it was
    /// loaded with [`MemoryPlan::host_copies`].
    pub fn park(&mut self) {
        self.parts_mut().for_each(AnyPart::park);
    }

    /// Copies the parts the placement keeps on the device back from their host copies, as
    /// they were before [`WanPipeline::park`].
    pub fn unpark(&mut self) -> Result<(), PipelineError> {
        let (kind, device) = (self.precision.model, self.device);
        let files = &self.text_encoder_files;
        self.text_encoder
            .restore(|host| Ok(files.from_host(host, kind, device)?))?;
        let storage = self.precision.transformer_storage();
        let expert = |config| {
            move |host: &HostWeights| Ok(WanTransformer::from_host(config, host, storage, device)?)
        };
        self.transformer.restore(expert(&self.transformer_config))?;
        if let (Some(low), Some(config)) = (&mut self.transformer_2, &self.transformer_2_config) {
            low.restore(expert(config))?;
        }
        let (files, vae_kind) = (&self.vae_files, self.precision.vae);
        self.vae
            .restore(|host| Ok(files.from_host(host, vae_kind, device)?))
    }

    /// Tiles the VAE passes of the job about to run, or not, whatever the plan's
    /// `vae_tiling` (`None`: as it says).
    pub fn set_job_tiling(&mut self, tiles: Option<bool>) {
        self.job_tiling = tiles;
    }

    /// Whether a VAE pass since the last [`WanPipeline::take_stages`] was tiled.
    pub fn vae_tiled(&self) -> bool {
        self.tiled
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn solver(&self) -> &Solver {
        &self.solver
    }

    pub fn boundary_ratio(&self) -> Option<f64> {
        self.boundary_ratio
    }

    /// The token ids the text encoder sees for `text` (cleaned, padded to 512).
    pub fn token_ids(&self, text: &str) -> Result<Vec<i64>, PipelineError> {
        let tokens = tokenize_prompts(&self.tokenizer, &[text])?;
        Ok(Vec::<i64>::try_from(tokens.ids.f_flatten(0, -1)?)?)
    }

    /// The latent shape of a request, checking its size fits the model.
    pub fn latent_shape(&self, request: &Request<'_>) -> Result<[i64; 5], PipelineError> {
        let vae = self.vae_files.config();
        let (ts, ss) = (vae.scale_factor_temporal, vae.scale_factor_spatial);
        let [_, ph, pw] = self.transformer_config.patch_size;
        let invalid = |field, reason: String| Err(PipelineError::InvalidRequest { field, reason });
        if request.frames < 1 || (request.frames - 1) % ts != 0 {
            return invalid(
                "frames",
                format!("must be of the form {ts}k+1, got {}", request.frames),
            );
        }
        for (field, value, patch) in [("width", request.width, pw), ("height", request.height, ph)]
        {
            let multiple = ss * patch;
            if value < multiple || value % multiple != 0 {
                return invalid(
                    field,
                    format!("must be a multiple of {multiple}, got {value}"),
                );
            }
        }
        if request.steps == 0 {
            return invalid("steps", "must be at least 1".to_owned());
        }
        Ok([
            1,
            vae.z_dim,
            (request.frames - 1) / ts + 1,
            request.height / ss,
            request.width / ss,
        ])
    }

    /// The denoised latents of `request`. `on_step(done, total)` runs after every step;
    /// returning `Cancel` stops there. Measures the prompt encoding, the image encoding
    /// (image to video) and the denoising as stages, with offloaded parts brought to the
    /// device for their stage and sent back after it.
    pub fn denoise(
        &mut self,
        request: &Request<'_>,
        on_step: &mut dyn FnMut(usize, usize) -> StepControl,
    ) -> Result<Tensor, PipelineError> {
        let _no_grad = tch::no_grad_guard();
        let shape = self.latent_shape(request)?;
        match (self.mode, request.image) {
            (Mode::TextToVideo, Some(_)) => {
                return Err(PipelineError::InvalidRequest {
                    field: "image",
                    reason: "is for image to video; this model makes videos from text only"
                        .to_owned(),
                });
            }
            (Mode::ImageToVideo, None) => {
                return Err(PipelineError::InvalidRequest {
                    field: "image",
                    reason: "is required: this model makes videos from an image".to_owned(),
                });
            }
            _ => {}
        }
        let (cond, uncond) = self.prompt_stage(request)?;
        let condition = request
            .image
            .map(|image| self.image_stage(image, request))
            .transpose()?;
        self.denoising_stage(
            request,
            &shape,
            &cond,
            uncond.as_ref(),
            condition.as_ref(),
            on_step,
        )
    }

    /// Runs `work` as the measured `stage`: the parts it brought to the device go back to the
    /// host (`release`) whether it succeeded or not, then the stage's peak memory and seconds
    /// are recorded.
    fn measured<T>(
        &mut self,
        stage: MeasuredStage,
        work: impl FnOnce(&mut Self, &mut StageMeter) -> Result<T, PipelineError>,
        release: impl FnOnce(&mut Self),
    ) -> Result<T, PipelineError> {
        let mut meter = StageMeter::start(self.device, stage)?;
        let done = work(self, &mut meter);
        release(self);
        let done = done?;
        self.stages.push(meter.finish()?);
        Ok(done)
    }

    /// The prompt's (and, with guidance, the negative prompt's) embeddings.
    fn prompt_stage(
        &mut self,
        request: &Request<'_>,
    ) -> Result<(Tensor, Option<Tensor>), PipelineError> {
        self.measured(
            MeasuredStage::EncodingPrompt,
            |this, meter| {
                let (files, tokenizer) = (&this.text_encoder_files, &this.tokenizer);
                let (kind, device) = (this.precision.model, this.device);
                let encoder = this.text_encoder.bring(&mut meter.load_seconds, |host| {
                    Ok(files.from_host(host, kind, device)?)
                })?;
                let cond = prompt_embeds(encoder, tokenizer, kind, request.prompt)?;
                let uncond = uses_uncond(request.guidance)
                    .then(|| prompt_embeds(encoder, tokenizer, kind, request.negative_prompt))
                    .transpose()?;
                Ok((cond, uncond))
            },
            |this| this.text_encoder.release(),
        )
    }

    /// The image-to-video condition, measured as its own stage.
    fn image_stage(
        &mut self,
        image: &Tensor,
        request: &Request<'_>,
    ) -> Result<Tensor, PipelineError> {
        self.measured(
            MeasuredStage::EncodingImage,
            |this, meter| this.image_condition(image, request, &mut meter.load_seconds),
            |this| this.vae.release(),
        )
    }

    fn denoising_stage(
        &mut self,
        request: &Request<'_>,
        shape: &[i64; 5],
        cond: &Tensor,
        uncond: Option<&Tensor>,
        condition: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> StepControl,
    ) -> Result<Tensor, PipelineError> {
        self.measured(
            MeasuredStage::Denoising,
            |this, meter| {
                this.denoising_steps(request, shape, cond, uncond, condition, on_step, meter)
            },
            // Experts go back to host memory whether the loop finished or not.
            |this| {
                this.transformer.release();
                if let Some(low) = &mut this.transformer_2 {
                    low.release();
                }
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn denoising_steps(
        &mut self,
        request: &Request<'_>,
        shape: &[i64; 5],
        cond: &Tensor,
        uncond: Option<&Tensor>,
        condition: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize) -> StepControl,
        meter: &mut StageMeter,
    ) -> Result<Tensor, PipelineError> {
        let (initial, mut sampler) = self.solver.start(request.steps, request.seed, shape)?;
        let mut latents = initial.f_to_device(self.device)?;
        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        let train = self.solver.num_train_timesteps();
        let (storage, device) = (self.precision.transformer_storage(), self.device);
        for (i, &t) in timesteps.iter().enumerate() {
            let expert = expert_for(t, self.boundary_ratio, train);
            // Expert-swap and model-offload: the expert not in use goes back to host memory
            // before the other comes to the device.
            let (part, config) = match expert {
                Expert::HighNoise => {
                    if let Some(low) = &mut self.transformer_2 {
                        low.release();
                    }
                    (&mut self.transformer, &self.transformer_config)
                }
                Expert::LowNoise => {
                    self.transformer.release();
                    (
                        self.transformer_2
                            .as_mut()
                            .expect("a boundary is set only with a second transformer"),
                        self.transformer_2_config
                            .as_ref()
                            .expect("a second transformer has a config"),
                    )
                }
            };
            let transformer = part.bring(&mut meter.load_seconds, |host| {
                Ok(WanTransformer::from_host(config, host, storage, device)?)
            })?;
            let input = match condition {
                Some(condition) => Tensor::f_cat(&[&latents, condition], 1)?,
                None => latents.shallow_clone(),
            };
            let timestep = Tensor::from_slice(&[t as f32]).f_to_device(device)?;
            let mut velocity = transformer.forward(&input, &timestep, cond)?;
            if let Some(uncond) = uncond {
                let unconditional = transformer.forward(&input, &timestep, uncond)?;
                velocity = guide(&velocity, &unconditional, request.guidance)?;
            }
            if self.solver.wants_float_velocity() {
                velocity = velocity.f_to_kind(Kind::Float)?;
            }
            latents = sampler.step(&velocity, &latents)?;
            if on_step(i + 1, total) == StepControl::Cancel {
                return Err(PipelineError::Cancelled {
                    completed: i + 1,
                    total,
                });
            }
        }
        Ok(latents)
    }

    /// The VAE on the device (brought there if it is offloaded).
    fn vae_on_device(
        &mut self,
        load_seconds: &mut f64,
    ) -> Result<&AutoencoderKLWan, PipelineError> {
        let (files, kind, device) = (&self.vae_files, self.precision.vae, self.device);
        self.vae.bring(
            load_seconds,
            |host| Ok(files.from_host(host, kind, device)?),
        )
    }

    /// The tiles of a VAE pass, if it is tiled: as decided for the job
    /// ([`WanPipeline::set_job_tiling`], what a runner's fit check decided), else only under
    /// `--vae-tiling on`: `auto` without a decision (a runner that does not know its device's
    /// memory, which checks no job either) does not tile.
    fn vae_tiles(&self) -> Option<Tiling> {
        let tiles = self.job_tiling.unwrap_or(self.vae_tiling == VaeTiling::On);
        tiles.then(Tiling::default)
    }

    /// The image-to-video condition: the mask and the encoded, normalized first frame
    /// followed by black frames, `[1, 4 + z_dim, latent frames, h, w]` in float32.
    fn image_condition(
        &mut self,
        image: &Tensor,
        request: &Request<'_>,
        load_seconds: &mut f64,
    ) -> Result<Tensor, PipelineError> {
        let size = image.size();
        if size != [1, 3, request.height, request.width] {
            return Err(PipelineError::InvalidRequest {
                field: "image",
                reason: format!(
                    "is {size:?}; it must be resized to the job's [1, 3, {}, {}] first",
                    request.height, request.width
                ),
            });
        }
        let (vae_kind, device) = (self.precision.vae, self.device);
        let tiles = self.vae_tiles();
        self.tiled |= tiles.is_some();
        let first = image.f_to_device(device)?.f_to_kind(vae_kind)?;
        let rest = Tensor::f_zeros(
            [1, 3, request.frames - 1, request.height, request.width],
            (vae_kind, device),
        )?;
        let video = Tensor::f_cat(&[first.f_unsqueeze(2)?, rest], 2)?;
        let vae = self.vae_on_device(load_seconds)?;
        let encoded = vae.encode(&video, tiles.as_ref())?.f_to_kind(Kind::Float)?;
        let encoded = vae.normalize_latents(&encoded)?;
        let (_, _, frames, h, w) = encoded.size5()?;
        let mask = Tensor::f_cat(
            &[
                Tensor::f_ones([1, MASK_CHANNELS, 1, h, w], (Kind::Float, device))?,
                Tensor::f_zeros([1, MASK_CHANNELS, frames - 1, h, w], (Kind::Float, device))?,
            ],
            2,
        )?;
        Ok(Tensor::f_cat(&[mask, encoded], 1)?)
    }

    /// Decodes denoised latents into 8-bit frames, as the pipelines' video processor makes
    /// them; measured as the decoding stage, in tiles where [`WanPipeline::vae_tiles`] says.
    pub fn decode(&mut self, latents: &Tensor) -> Result<Frames, PipelineError> {
        let _no_grad = tch::no_grad_guard();
        self.measured(
            MeasuredStage::Decoding,
            |this, meter| this.decode_frames(latents, &mut meter.load_seconds),
            |this| this.vae.release(),
        )
    }

    fn decode_frames(
        &mut self,
        latents: &Tensor,
        load_seconds: &mut f64,
    ) -> Result<Frames, PipelineError> {
        let tiles = self.vae_tiles();
        self.tiled |= tiles.is_some();
        let kind = self.precision.vae;
        let vae = self.vae_on_device(load_seconds)?;
        let latents = vae.unnormalize_latents(&latents.f_to_kind(kind)?)?;
        Ok(vae.decode_frames(&latents, tiles.as_ref())?)
    }
}

/// The prompt's embeddings `[1, 512, text_dim]` in the transformer's dtype `kind`, as the
/// pipelines' `encode_prompt` gives them to the transformer.
fn prompt_embeds(
    encoder: &Umt5Encoder,
    tokenizer: &PromptTokenizer,
    kind: Kind,
    text: &str,
) -> Result<Tensor, PipelineError> {
    let embeds = encoder.prompt_embeds(tokenizer, &[text])?;
    Ok(embeds.f_to_kind(kind)?)
}
