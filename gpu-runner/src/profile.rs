//! The runner's side of the fit check: its models' shapes (read from their config files and
//! weight headers, no weight loaded), its device's memory, the memory mode it runs in, all
//! reported in its heartbeat (`framelane.dev/memory`); and the refusal of a job that does
//! not fit, before the GPU is touched. The estimate itself is `framelane_core::memory`.

use std::path::Path;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use framelane_api::{
    VideoJob, VideoModel,
    modellane::{MemoryMode, TransformerWeights, VaeTiling},
};
use framelane_core::memory::{
    ANNOTATION_VERSION, JobSize, ModelProfile, RunnerMemory, TextEncoderShape, TransformerShape,
    VaeShape, fits, resolve_mode, usable_bytes,
};
use kube::ResourceExt;

use crate::{
    accel::{self, AccelError},
    cache::ModelRef,
    memory::RunnerDevice,
    wan::{
        components::{ComponentError, TextEncoderFiles, VaeFiles},
        pipeline::{ModelFiles, Precision, TEXT_LENGTH},
        safetensors::{SafetensorsError, TensorFiles},
        weights::{TransformerCheckpoint, WeightsError},
    },
};

/// The runner's memory flags.
#[derive(clap::Args, Debug, Clone)]
pub struct MemoryArgs {
    /// How the models are held in GPU memory (the lane's spec.runner.memory.mode).
    #[arg(long, env = "FRAMELANE_MEMORY_MODE", default_value = "auto",
        value_parser = PossibleValuesParser::new(MemoryMode::ALL.map(MemoryMode::flag))
            .map(|flag| MemoryMode::from_flag(&flag).expect("a listed --memory-mode")))]
    pub memory_mode: MemoryMode,
    /// Whether the VAE works in tiles (the lane's spec.runner.memory.vaeTiling).
    #[arg(long, env = "FRAMELANE_VAE_TILING", default_value = "auto",
        value_parser = PossibleValuesParser::new(VaeTiling::ALL.map(VaeTiling::as_str))
            .map(|flag| VaeTiling::from_flag(&flag).expect("a listed --vae-tiling")))]
    pub vae_tiling: VaeTiling,
    /// How the transformers' linear weights are stored (the lane's
    /// spec.runner.memory.transformerWeights): `fp8` halves them against bfloat16.
    #[arg(long, env = "FRAMELANE_TRANSFORMER_WEIGHTS", default_value = "compute",
        value_parser = PossibleValuesParser::new(TransformerWeights::ALL.map(TransformerWeights::as_str))
            .map(|flag| TransformerWeights::from_flag(&flag).expect("a listed --transformer-weights")))]
    pub transformer_weights: TransformerWeights,
    /// For tests and CPU lanes: the device memory to report and check jobs against, in bytes,
    /// instead of the GPU's. Without it a CPU runner reports none and checks nothing.
    #[arg(long, env = "FRAMELANE_DEVICE_MEMORY_BYTES")]
    pub device_memory_bytes: Option<u64>,
    /// Host memory a Shared runner may fill with its models' weights (pinned next to a GPU)
    /// so that a switch back to a model copies it from there instead of reading its files: it
    /// does so when all its models fit. Default: 80 % of the container's memory limit, or of
    /// the machine's memory without one. 0: always read the files (expert-swap and
    /// model-offload, which keep parts in host memory, then refuse to start).
    #[arg(long, env = "FRAMELANE_HOST_MEMORY_BYTES")]
    pub host_memory_bytes: Option<u64>,
}

impl MemoryArgs {
    /// The precision this runner loads its models in: `weights` (the weights' dtype), the
    /// transformers' linear weights stored as `--transformer-weights` says.
    pub fn precision(&self, weights: Precision) -> Precision {
        Precision {
            fp8_transformers: self.transformer_weights == TransformerWeights::Fp8,
            ..weights
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Files(#[from] SafetensorsError),
    #[error("{path}: {message}")]
    Index { path: String, message: String },
    #[error(transparent)]
    Accel(#[from] AccelError),
}

/// A model's shapes and weight bytes in `precision`, from its config files and the weight
/// files' headers.
pub fn model_profile(
    files: &ModelFiles,
    precision: Precision,
    device: tch::Device,
) -> Result<ModelProfile, ProfileError> {
    let (transformers, text_encoder, vae) = match files {
        ModelFiles::Diffusers(dir) => {
            let mut transformers =
                vec![TransformerCheckpoint::diffusers(&dir.join("transformer"))?];
            if has_second_transformer(dir)? {
                transformers.push(TransformerCheckpoint::diffusers(
                    &dir.join("transformer_2"),
                )?);
            }
            (
                transformers,
                TextEncoderFiles::diffusers(&dir.join("text_encoder"))?,
                VaeFiles::diffusers(&dir.join("vae"))?,
            )
        }
        ModelFiles::ComfyUi(files) => {
            let first = TensorFiles::open(&files.transformer)?;
            let or_first = |paths: &[std::path::PathBuf]| {
                if paths.is_empty() {
                    Ok(first.clone())
                } else {
                    TensorFiles::open(paths)
                }
            };
            let mut transformers = vec![TransformerCheckpoint::comfyui(first.clone(), None)?];
            if !files.transformer_2.is_empty() {
                transformers.push(TransformerCheckpoint::comfyui(
                    TensorFiles::open(&files.transformer_2)?,
                    None,
                )?);
            }
            (
                transformers,
                TextEncoderFiles::comfyui(or_first(&files.text_encoder)?)?,
                VaeFiles::comfyui(or_first(&files.vae)?)?,
            )
        }
    };
    let dtype = precision.model.elt_size_in_bytes() as u64;
    let storage = precision.transformer_storage();
    let config = transformers[0].config();
    let text = text_encoder.config();
    let v = vae.config();
    let u = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(ModelProfile {
        transformer_bytes: transformers
            .iter()
            .map(|t| t.config().stored_bytes(storage))
            .collect(),
        upcast_bytes: config.upcast_bytes(storage),
        text_encoder_bytes: text_encoder.bytes(precision.model),
        vae_bytes: vae.bytes(precision.vae),
        dtype_bytes: dtype,
        vae_dtype_bytes: precision.vae.elt_size_in_bytes() as u64,
        transformer: TransformerShape {
            dim: u(config.dim()),
            ffn_dim: u(config.ffn_dim),
            heads: u(config.num_attention_heads),
            layers: u(config.num_layers),
            in_channels: u(config.in_channels),
            out_channels: u(config.out_channels()),
            patch: config.patch_size.map(u),
            text_dim: u(config.text_dim),
        },
        text_encoder: TextEncoderShape {
            d_model: u(text.d_model),
            d_ff: u(text.d_ff),
            heads: u(text.num_heads),
            text_length: TEXT_LENGTH as u64,
        },
        vae: VaeShape {
            base_dim: u(v.decoder_base_dim.unwrap_or(v.base_dim)),
            z_dim: u(v.z_dim),
            dim_mult: v.dim_mult.iter().copied().map(u).collect(),
            res_blocks: u(v.num_res_blocks),
            temporal_compression: u(v.scale_factor_temporal),
            spatial_compression: u(v.scale_factor_spatial),
        },
        conv_unfold: device == tch::Device::Cpu,
    })
}

/// `mode`, with `auto` resolved as a runner resolves it at start: [`resolve_mode`] of the
/// models in `files` on the usable bytes of `device` (a CUDA device's memory), resident on
/// the CPU. A cache, and a pipeline loaded with `auto`, decide with this.
pub fn resolve_auto<'a>(
    mode: MemoryMode,
    files: impl IntoIterator<Item = &'a ModelFiles>,
    precision: Precision,
    device: tch::Device,
) -> Result<MemoryMode, ProfileError> {
    let total = match (mode, device) {
        (MemoryMode::Auto, tch::Device::Cuda(i)) => accel::memory_info(i)?.1,
        (MemoryMode::Auto, _) => return Ok(MemoryMode::Resident),
        _ => return Ok(mode),
    };
    if total == 0 {
        return Ok(MemoryMode::Resident);
    }
    let profiles = files
        .into_iter()
        .map(|files| model_profile(files, precision, device))
        .collect::<Result<Vec<_>, _>>()?;
    let all: Vec<&ModelProfile> = profiles.iter().collect();
    Ok(resolve_mode(mode, &all, usable_bytes(total)))
}

/// Whether a diffusers folder's `model_index.json` names a second transformer.
fn has_second_transformer(dir: &Path) -> Result<bool, ProfileError> {
    let path = dir.join("model_index.json");
    let index = |message: String| ProfileError::Index {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| index(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| index(e.to_string()))?;
    Ok(json
        .get("transformer_2")
        .and_then(|t| t.get(0))
        .is_some_and(|library| !library.is_null()))
}

/// What the runner reports and checks jobs against: `None` when it does not know its
/// device's memory (a CPU without `--device-memory-bytes`). The models weigh what they
/// weigh loaded in `weights` as [`MemoryArgs::precision`] makes it.
pub fn runner_memory(
    args: &MemoryArgs,
    device: &RunnerDevice,
    refs: &[ModelRef],
    weights: Precision,
) -> Result<Option<RunnerMemory>, ProfileError> {
    let precision = args.precision(weights);
    let device_bytes = match args.device_memory_bytes {
        Some(bytes) => bytes,
        None => match device.device {
            tch::Device::Cuda(i) => accel::memory_info(i)?.1,
            _ => 0,
        },
    };
    if device_bytes == 0 {
        return Ok(None);
    }
    let budget = usable_bytes(device_bytes);
    let mut profiles = std::collections::BTreeMap::new();
    for r in refs {
        profiles.insert(
            r.model.clone(),
            model_profile(&r.spec.files, precision, device.device)?,
        );
    }
    let all: Vec<&ModelProfile> = profiles.values().collect();
    let mode = resolve_mode(args.memory_mode, &all, budget);
    Ok(Some(RunnerMemory {
        v: ANNOTATION_VERSION,
        device_bytes,
        budget_bytes: budget,
        mode,
        vae_tiling: args.vae_tiling,
        models: profiles,
    }))
}

/// How this runner runs `job` of `model`: whether its VAE tiles, as the fit check weighs it;
/// or why it must not run it: its estimate does not fit the budget.
pub fn fit_job(
    memory: &RunnerMemory,
    job: &VideoJob,
    model: &VideoModel,
    lane: &str,
) -> Result<bool, String> {
    let size = JobSize::of(&job.spec, model);
    fits(memory, &model.name_any(), &size).map_err(|refused| refused.message(&size, lane))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        memory: MemoryArgs,
    }

    #[test]
    fn memory_flags_take_what_the_operator_passes_from_the_lane() {
        let parse = |args: &[&str]| Flags::try_parse_from([&["runner"], args].concat());
        let defaults = parse(&[]).unwrap().memory;
        assert_eq!(
            (defaults.memory_mode, defaults.vae_tiling),
            (MemoryMode::Auto, VaeTiling::Auto)
        );
        for mode in MemoryMode::ALL {
            for tiling in VaeTiling::ALL {
                let flags = [
                    "--memory-mode",
                    mode.flag(),
                    "--vae-tiling",
                    tiling.as_str(),
                ];
                let memory = parse(&flags).unwrap().memory;
                assert_eq!((memory.memory_mode, memory.vae_tiling), (mode, tiling));
            }
        }
        let wrong = parse(&["--memory-mode", "expertSwap"])
            .err()
            .expect("the API's spelling is not the flag's")
            .to_string();
        assert!(
            wrong.contains("expert-swap") && wrong.contains("model-offload"),
            "{wrong}"
        );
    }

    #[test]
    fn the_transformer_weights_flag_sets_how_the_models_load() {
        let parse = |args: &[&str]| {
            Flags::try_parse_from([&["runner"], args].concat())
                .unwrap()
                .memory
        };
        assert_eq!(
            parse(&[]).precision(Precision::BFLOAT16),
            Precision::BFLOAT16
        );
        let fp8 = parse(&["--transformer-weights", "fp8"]);
        assert_eq!(fp8.transformer_weights, TransformerWeights::Fp8);
        assert_eq!(
            fp8.precision(Precision::FLOAT32),
            Precision {
                fp8_transformers: true,
                ..Precision::FLOAT32
            }
        );
        assert_eq!(
            parse(&["--transformer-weights", "compute"])
                .precision(fp8.precision(Precision::BFLOAT16)),
            Precision::BFLOAT16,
            "the flag, not the precision passed in, says how the transformers store"
        );
    }
}
