//! Where the text encoder and the VAE of a Wan model are, and what their tensors are called.
//!
//! - diffusers: `text_encoder/` (transformers' `config.json` and `model.safetensors`, or
//!   shards with an index) and `vae/` (`config.json` and `diffusion_pytorch_model.safetensors`).
//! - ComfyUI: one or more files holding the umT5 encoder under transformers' names (behind
//!   `text_encoders.umt5xxl.transformer.` in an AllInOne file, or no prefix in a split file),
//!   and the VAE under the original Wan names (behind `vae.`, or none). Neither carries a
//!   config: both are inferred from tensor shapes, as ComfyUI does. The VAE names are
//!   diffusers' single-file conversion read backwards.
//!
//! Loading refuses a missing tensor, one of another shape, and one the component does not
//! use (another model's), naming the tensor as the file calls it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, TchError, Tensor};

use super::safetensors::{SafetensorsError, TensorFiles};
use super::tensors::{TensorSource, WeightError};
use super::umt5::{Umt5Config, Umt5Encoder, Umt5Error};
use super::vae::{AutoencoderKLWan, VaeConfig, VaeError};
use super::weights::{DIFFUSERS_WEIGHTS, WeightsError, safetensors_in, unexpected_tensor};
use crate::accel::AccelError;
use crate::placement::HostWeights;

/// Tensors only umT5, or only the Wan VAE, has: how a component is found in files that hold
/// several.
const TEXT_MARKER: &str = "shared.weight";
const VAE_MARKER: &str = "decoder.middle.0.residual.0.gamma";

/// transformers saves umT5's tied input embedding under both names; the runner reads
/// `shared.weight`.
const TIED_EMBEDDING: &str = "encoder.embed_tokens.weight";

/// Why a text encoder or VAE cannot be found or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error(transparent)]
    Files(#[from] WeightsError),
    #[error(transparent)]
    File(#[from] SafetensorsError),
    #[error("no {component} in {files}: no tensor is named `{marker}` under any prefix")]
    NotFound {
        component: &'static str,
        files: String,
        marker: &'static str,
    },
    #[error(
        "{files} hold more than one {component} (prefixes {prefixes:?}); give each its own files"
    )]
    Several {
        component: &'static str,
        files: String,
        prefixes: Vec<String>,
    },
    #[error("cannot infer the {component} config from {files}: {reason}")]
    Infer {
        component: &'static str,
        files: String,
        reason: String,
    },
    #[error(
        "tensor `{name}` is missing from {files}: the {component} needs it with shape {expected:?}"
    )]
    Missing {
        component: &'static str,
        name: String,
        files: String,
        expected: Vec<i64>,
    },
    #[error(
        "tensor `{name}` in {path} has shape {found:?}, but the {component} config needs {expected:?}"
    )]
    Shape {
        component: &'static str,
        name: String,
        path: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("tensor `{name}` in {path} is not part of the {component} the runner implements")]
    Unexpected {
        component: &'static str,
        name: String,
        path: PathBuf,
    },
    #[error(transparent)]
    Host(#[from] AccelError),
    #[error("copying a weight to the device: {0}")]
    Copy(TchError),
    #[error(transparent)]
    TextEncoder(#[from] Umt5Error),
    #[error(transparent)]
    Vae(#[from] VaeError),
}

/// How a component's files name its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Naming {
    /// diffusers' (and transformers') own names.
    Diffusers,
    /// ComfyUI's names under `prefix`.
    ComfyUi { prefix: String },
}

/// A umT5 text encoder's config and weight files.
#[derive(Debug)]
pub struct TextEncoderFiles {
    config: Umt5Config,
    files: TensorFiles,
    prefix: String,
}

impl TextEncoderFiles {
    /// transformers' layout: `config.json` and `model.safetensors` (or shards) in `dir`.
    pub fn diffusers(dir: &Path) -> Result<TextEncoderFiles, ComponentError> {
        let config = Umt5Config::from_file(&dir.join("config.json"))?;
        let files = TensorFiles::open(&safetensors_in(dir, "model.safetensors")?)?;
        Ok(TextEncoderFiles {
            config,
            files,
            prefix: String::new(),
        })
    }

    /// The umT5 encoder in ComfyUI files, its config inferred from the tensors.
    pub fn comfyui(files: TensorFiles) -> Result<TextEncoderFiles, ComponentError> {
        let prefix = prefix_of(&files, "text encoder", TEXT_MARKER)?;
        let config = infer_umt5(&files, &prefix)?;
        Ok(TextEncoderFiles {
            config,
            files,
            prefix,
        })
    }

    pub fn config(&self) -> &Umt5Config {
        &self.config
    }

    /// Bytes the weights take as `kind`.
    pub fn bytes(&self, kind: Kind) -> u64 {
        component_bytes(&self.files, &self.prefix, kind, |name| {
            name != TIED_EMBEDDING
        })
    }

    /// The encoder on `device`, computing in `kind`.
    pub fn load(&self, kind: Kind, device: Device) -> Result<Umt5Encoder, ComponentError> {
        self.read(kind, device, None)
    }

    /// The weights in host memory, for [`TextEncoderFiles::from_host`].
    pub fn read_host(&self, kind: Kind) -> Result<HostWeights, ComponentError> {
        read_host(|host| self.read(kind, Device::Cpu, Some(host)))
    }

    /// The encoder on `device` from weights [`TextEncoderFiles::read_host`] read.
    pub fn from_host(
        &self,
        host: &HostWeights,
        kind: Kind,
        device: Device,
    ) -> Result<Umt5Encoder, ComponentError> {
        from_host(host, device, |source| {
            Umt5Encoder::from_tensors(self.config.clone(), device, kind, source)
        })
    }

    fn read(
        &self,
        kind: Kind,
        device: Device,
        host: Option<&mut HostWeights>,
    ) -> Result<Umt5Encoder, ComponentError> {
        let naming = Naming::ComfyUi {
            prefix: self.prefix.clone(),
        };
        let mut reader = Reader::new(&self.files, naming, kind, device, |name| name.to_owned());
        reader.host = host;
        let loaded = Umt5Encoder::from_tensors(self.config.clone(), device, kind, &mut |name| {
            reader.read(name)
        });
        let encoder = match loaded {
            Err(Umt5Error::Weights(e)) => return Err(reader.explain("text encoder", e)),
            other => other?,
        };
        reader.finish("text encoder", &[TIED_EMBEDDING])?;
        Ok(encoder)
    }
}

/// A component's weights, kept in host memory as `read` reads them.
fn read_host<M>(
    read: impl FnOnce(&mut HostWeights) -> Result<M, ComponentError>,
) -> Result<HostWeights, ComponentError> {
    let mut host = HostWeights::default();
    read(&mut host)?;
    Ok(host)
}

/// A component that `build` builds from `host`'s weights, each copied to `device`; the first
/// copy that failed is the error.
fn from_host<M, E>(
    host: &HostWeights,
    device: Device,
    build: impl FnOnce(&mut TensorSource<'_>) -> Result<M, E>,
) -> Result<M, ComponentError>
where
    ComponentError: From<E>,
{
    let mut failed = None;
    let built = build(&mut |name| match host.to_device(name, device)? {
        Ok(tensor) => Some(tensor),
        Err(e) => {
            failed.get_or_insert(e);
            None
        }
    });
    match failed {
        Some(e) => Err(ComponentError::Copy(e)),
        None => Ok(built?),
    }
}

/// A Wan VAE's config and weight files.
#[derive(Debug)]
pub struct VaeFiles {
    config: VaeConfig,
    files: TensorFiles,
    naming: Naming,
}

impl VaeFiles {
    /// diffusers' layout: `config.json` and `diffusion_pytorch_model.safetensors` in `dir`.
    pub fn diffusers(dir: &Path) -> Result<VaeFiles, ComponentError> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let files = TensorFiles::open(&safetensors_in(dir, DIFFUSERS_WEIGHTS)?)?;
        Ok(VaeFiles {
            config,
            files,
            naming: Naming::Diffusers,
        })
    }

    /// The Wan VAE in ComfyUI files, its config inferred from the tensors.
    pub fn comfyui(files: TensorFiles) -> Result<VaeFiles, ComponentError> {
        let prefix = prefix_of(&files, "VAE", VAE_MARKER)?;
        let config = infer_vae(&files, &prefix)?;
        Ok(VaeFiles {
            config,
            files,
            naming: Naming::ComfyUi { prefix },
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Bytes the weights take as `kind`.
    pub fn bytes(&self, kind: Kind) -> u64 {
        let prefix = match &self.naming {
            Naming::Diffusers => "",
            Naming::ComfyUi { prefix } => prefix.as_str(),
        };
        component_bytes(&self.files, prefix, kind, |_| true)
    }

    /// The VAE on `device`, computing in `kind`.
    pub fn load(&self, kind: Kind, device: Device) -> Result<AutoencoderKLWan, ComponentError> {
        self.read(kind, device, None)
    }

    /// The weights in host memory, for [`VaeFiles::from_host`].
    pub fn read_host(&self, kind: Kind) -> Result<HostWeights, ComponentError> {
        read_host(|host| self.read(kind, Device::Cpu, Some(host)))
    }

    /// The VAE on `device` from weights [`VaeFiles::read_host`] read.
    pub fn from_host(
        &self,
        host: &HostWeights,
        kind: Kind,
        device: Device,
    ) -> Result<AutoencoderKLWan, ComponentError> {
        from_host(host, device, |source| {
            AutoencoderKLWan::from_tensors(self.config.clone(), device, kind, source)
        })
    }

    fn read(
        &self,
        kind: Kind,
        device: Device,
        host: Option<&mut HostWeights>,
    ) -> Result<AutoencoderKLWan, ComponentError> {
        let blocks = self.config.num_res_blocks;
        let mut reader = Reader::new(&self.files, self.naming.clone(), kind, device, |name| {
            wan_vae_name(name, blocks)
        });
        reader.host = host;
        let loaded =
            AutoencoderKLWan::from_tensors(self.config.clone(), device, kind, &mut |name| {
                reader.read(name)
            });
        let vae = match loaded {
            Err(VaeError::Weights(e)) => return Err(reader.explain("VAE", e)),
            other => other?,
        };
        reader.finish("VAE", &[])?;
        Ok(vae)
    }
}

/// Reads a component's tensors by diffusers name, remembering which it read.
struct Reader<'a, F> {
    files: &'a TensorFiles,
    naming: Naming,
    kind: Kind,
    device: Device,
    /// A diffusers name to the name in ComfyUI files (after the prefix).
    rename: F,
    used: HashSet<String>,
    /// The first tensor that could not be read, with why.
    failed: Option<SafetensorsError>,
    /// Where each tensor read is kept instead (the module then holds host copies).
    host: Option<&'a mut HostWeights>,
    /// The first host copy that failed.
    host_failed: Option<AccelError>,
}

impl<'a, F: Fn(&str) -> String> Reader<'a, F> {
    fn new(files: &'a TensorFiles, naming: Naming, kind: Kind, device: Device, rename: F) -> Self {
        Reader {
            files,
            naming,
            kind,
            device,
            rename,
            used: HashSet::new(),
            failed: None,
            host: None,
            host_failed: None,
        }
    }

    fn file_name(&self, name: &str) -> String {
        match &self.naming {
            Naming::Diffusers => name.to_owned(),
            Naming::ComfyUi { prefix } => format!("{prefix}{}", (self.rename)(name)),
        }
    }

    /// The tensor as the component's kind on its device; `None` when the files lack it or
    /// it cannot be read (then [`Reader::explain`] says why).
    fn read(&mut self, name: &str) -> Option<Tensor> {
        let file_name = self.file_name(name);
        self.files.info(&file_name)?;
        self.used.insert(file_name.clone());
        match self.files.weight(&file_name, self.kind, self.device) {
            Ok(tensor) => match self.host.as_deref_mut() {
                None => Some(tensor),
                Some(host) => match host.keep(name, &tensor) {
                    Ok(copy) => Some(copy),
                    Err(e) => {
                        self.host_failed.get_or_insert(e);
                        None
                    }
                },
            },
            Err(e) => {
                self.failed.get_or_insert(e);
                None
            }
        }
    }

    /// A weight error of the component, with the tensor named as the files name it.
    fn explain(&mut self, component: &'static str, error: WeightError) -> ComponentError {
        if let Some(failed) = self.failed.take() {
            return ComponentError::File(failed);
        }
        if let Some(failed) = self.host_failed.take() {
            return ComponentError::Host(failed);
        }
        match error {
            WeightError::Missing { name, expected } => ComponentError::Missing {
                component,
                name: self.file_name(&name),
                files: self.files.describe(),
                expected,
            },
            WeightError::Shape {
                name,
                expected,
                found,
            } => {
                let name = self.file_name(&name);
                let path = self
                    .files
                    .info(&name)
                    .map_or_else(PathBuf::new, |info| self.files.path_of(info).to_path_buf());
                ComponentError::Shape {
                    component,
                    name,
                    path,
                    expected,
                    found,
                }
            }
            WeightError::Torch { name, source } => ComponentError::File(SafetensorsError::Torch {
                path: PathBuf::from(self.files.describe()),
                name: self.file_name(&name),
                source,
            }),
        }
    }

    /// Refuses tensors under the component's prefix that it did not read (`tolerated`:
    /// names after the prefix that it may carry unread).
    fn finish(mut self, component: &'static str, tolerated: &[&str]) -> Result<(), ComponentError> {
        let prefix = match &self.naming {
            Naming::Diffusers => String::new(),
            Naming::ComfyUi { prefix } => prefix.clone(),
        };
        self.used
            .extend(tolerated.iter().map(|name| format!("{prefix}{name}")));
        match unexpected_tensor(self.files, &prefix, &self.used) {
            Some((name, path)) => Err(ComponentError::Unexpected {
                component,
                name,
                path,
            }),
            None => Ok(()),
        }
    }
}

/// The one prefix under which `marker` names a tensor in `files`.
fn prefix_of(
    files: &TensorFiles,
    component: &'static str,
    marker: &'static str,
) -> Result<String, ComponentError> {
    let prefixes = files.find_prefixes(marker);
    match prefixes.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ComponentError::NotFound {
            component,
            files: files.describe(),
            marker,
        }),
        _ => Err(ComponentError::Several {
            component,
            files: files.describe(),
            prefixes,
        }),
    }
}

/// Bytes of the tensors under `prefix` (those `keep` accepts) once converted to `kind`; fp8
/// scales and markers are not weights.
fn component_bytes(
    files: &TensorFiles,
    prefix: &str,
    kind: Kind,
    keep: impl Fn(&str) -> bool,
) -> u64 {
    files
        .names()
        .filter_map(|name| Some((name, name.strip_prefix(prefix)?)))
        .filter(|(_, rest)| keep(rest) && *rest != "scaled_fp8" && !rest.ends_with(".scale_weight"))
        .filter_map(|(name, _)| files.info(name))
        .map(|info| info.shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64)
        .sum()
}

/// The shape of `prefix + name`, which must have `rank` dimensions.
fn shape_of(
    files: &TensorFiles,
    component: &'static str,
    prefix: &str,
    name: &str,
    rank: usize,
) -> Result<Vec<i64>, ComponentError> {
    let full = format!("{prefix}{name}");
    let infer = |reason: String| ComponentError::Infer {
        component,
        files: files.describe(),
        reason,
    };
    let info = files
        .info(&full)
        .ok_or_else(|| infer(format!("it has no tensor `{full}`")))?;
    if info.shape.len() != rank {
        return Err(infer(format!(
            "`{full}` has shape {:?}, expected {rank} dimensions",
            info.shape
        )));
    }
    Ok(info.shape.clone())
}

/// Indices `N` of the tensors named `{prefix}{group}N.*`, one past the largest.
fn count(files: &TensorFiles, prefix: &str, group: &str) -> i64 {
    let start = format!("{prefix}{group}");
    files
        .names()
        .filter_map(|name| {
            name.strip_prefix(&start)?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1)
}

/// The umT5 config the tensors under `prefix` imply. The relative-position distance, norm
/// epsilon and feed-forward are umT5-XXL's (transformers' defaults), as ComfyUI assumes.
fn infer_umt5(files: &TensorFiles, prefix: &str) -> Result<Umt5Config, ComponentError> {
    let component = "text encoder";
    let shape = |name: &str, rank| shape_of(files, component, prefix, name, rank);
    let embed = shape("shared.weight", 2)?;
    let attention = "encoder.block.0.layer.0.SelfAttention";
    let bias = shape(&format!("{attention}.relative_attention_bias.weight"), 2)?;
    let inner = shape(&format!("{attention}.q.weight"), 2)?[0];
    let (buckets, heads) = (bias[0], bias[1]);
    if heads == 0 || inner % heads != 0 {
        return Err(ComponentError::Infer {
            component,
            files: files.describe(),
            reason: format!("{inner} query features do not split into {heads} heads"),
        });
    }
    let d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 2)?[0];
    Ok(Umt5Config {
        model_type: None,
        vocab_size: embed[0],
        d_model: embed[1],
        d_kv: inner / heads,
        d_ff,
        num_layers: count(files, prefix, "encoder.block."),
        num_heads: heads,
        relative_attention_num_buckets: buckets,
        ..Umt5Config::default()
    })
}

/// The Wan VAE config the tensors under `prefix` imply: widths from the convolutions, the
/// stages and their residual blocks from the encoder's layer list (a stage ends at each
/// downsampler; a downsampler with a `time_conv` also halves time).
fn infer_vae(files: &TensorFiles, prefix: &str) -> Result<VaeConfig, ComponentError> {
    let component = "VAE";
    let infer = |reason: String| ComponentError::Infer {
        component,
        files: files.describe(),
        reason,
    };
    let shape = |name: &str, rank| shape_of(files, component, prefix, name, rank);
    let has = |name: String| files.info(&format!("{prefix}{name}")).is_some();
    let base_dim = shape("encoder.conv1.weight", 5)?[0];
    let z_dim = shape("conv2.weight", 5)?[0];
    let mut stages: Vec<Vec<i64>> = vec![Vec::new()];
    let mut temporal = Vec::new();
    for i in 0..count(files, prefix, "encoder.downsamples.") {
        let layer = format!("encoder.downsamples.{i}");
        if has(format!("{layer}.resample.1.weight")) {
            temporal.push(has(format!("{layer}.time_conv.weight")));
            stages.push(Vec::new());
        } else {
            let width = shape(&format!("{layer}.residual.6.weight"), 5)?[0];
            stages.last_mut().expect("one stage at least").push(width);
        }
    }
    let num_res_blocks = stages[0].len() as i64;
    let mut dim_mult = Vec::with_capacity(stages.len());
    for (i, widths) in stages.iter().enumerate() {
        let width = match widths.as_slice() {
            [first, rest @ ..]
                if widths.len() as i64 == num_res_blocks
                    && rest.iter().all(|w| w == first)
                    && first % base_dim == 0 =>
            {
                *first
            }
            _ => {
                return Err(infer(format!(
                    "encoder stage {i} has residual blocks of widths {widths:?}; a Wan VAE has \
                     {num_res_blocks} per stage, each a multiple of {base_dim}"
                )));
            }
        };
        dim_mult.push(width / base_dim);
    }
    Ok(VaeConfig {
        base_dim,
        z_dim,
        dim_mult,
        num_res_blocks,
        temperal_downsample: temporal,
        ..VaeConfig::default()
    })
}

/// The original Wan (ComfyUI) name of a diffusers VAE parameter, for a VAE with
/// `num_res_blocks` residual blocks per encoder stage (one more per decoder stage).
fn wan_vae_name(name: &str, num_res_blocks: i64) -> String {
    let Some((top, rest)) = name.split_once('.') else {
        return name.to_owned();
    };
    match top {
        "quant_conv" => return format!("conv1.{rest}"),
        "post_quant_conv" => return format!("conv2.{rest}"),
        _ => {}
    }
    let Some((part, rest)) = rest.split_once('.') else {
        return name.to_owned();
    };
    let inner = match part {
        "conv_in" => format!("conv1.{rest}"),
        "norm_out" => format!("head.0.{rest}"),
        "conv_out" => format!("head.2.{rest}"),
        "mid_block" => match rest.split_once('.') {
            Some(("attentions", inner)) => {
                format!("middle.1.{}", inner.split_once('.').map_or(inner, |p| p.1))
            }
            Some(("resnets", inner)) => match inner.split_once('.') {
                Some((index, block)) => match index.parse::<i64>() {
                    Ok(i) => format!("middle.{}.{}", 2 * i, residual_name(block)),
                    Err(_) => rest.to_owned(),
                },
                None => rest.to_owned(),
            },
            _ => rest.to_owned(),
        },
        "down_blocks" => match rest.split_once('.') {
            Some((index, block)) => format!("downsamples.{index}.{}", residual_name(block)),
            None => rest.to_owned(),
        },
        "up_blocks" => up_block_name(rest, num_res_blocks).unwrap_or_else(|| rest.to_owned()),
        _ => format!("{part}.{rest}"),
    };
    format!("{top}.{inner}")
}

/// `STAGE.resnets.J.X` or `STAGE.upsamplers.0.X` of the decoder: the original decoder lists
/// each stage's residual blocks, then its upsampler, in one sequence.
fn up_block_name(rest: &str, num_res_blocks: i64) -> Option<String> {
    let (stage, rest) = rest.split_once('.')?;
    let stage: i64 = stage.parse().ok()?;
    let (kind, rest) = rest.split_once('.')?;
    let (index, block) = rest.split_once('.')?;
    let index: i64 = index.parse().ok()?;
    let per_stage = num_res_blocks + 2;
    match kind {
        "resnets" => Some(format!(
            "upsamples.{}.{}",
            stage * per_stage + index,
            residual_name(block)
        )),
        "upsamplers" => Some(format!(
            "upsamples.{}.{block}",
            stage * per_stage + per_stage - 1
        )),
        _ => None,
    }
}

/// Inside a residual block: diffusers' names to the original sequential ones.
fn residual_name(block: &str) -> String {
    const NAMES: [(&str, &str); 5] = [
        ("norm1.gamma", "residual.0.gamma"),
        ("conv1.", "residual.2."),
        ("norm2.gamma", "residual.3.gamma"),
        ("conv2.", "residual.6."),
        ("conv_shortcut.", "shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(from, to)| block.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        .unwrap_or_else(|| block.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_vae_names_map_to_wan_names() {
        let cases = [
            ("quant_conv.weight", "conv1.weight"),
            ("post_quant_conv.bias", "conv2.bias"),
            ("encoder.conv_in.weight", "encoder.conv1.weight"),
            (
                "encoder.down_blocks.0.norm1.gamma",
                "encoder.downsamples.0.residual.0.gamma",
            ),
            (
                "encoder.down_blocks.4.conv_shortcut.bias",
                "encoder.downsamples.4.shortcut.bias",
            ),
            (
                "encoder.down_blocks.2.resample.1.weight",
                "encoder.downsamples.2.resample.1.weight",
            ),
            (
                "encoder.down_blocks.5.time_conv.bias",
                "encoder.downsamples.5.time_conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.conv2.weight",
                "encoder.middle.2.residual.6.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_qkv.bias",
                "encoder.middle.1.to_qkv.bias",
            ),
            ("encoder.norm_out.gamma", "encoder.head.0.gamma"),
            ("decoder.conv_out.bias", "decoder.head.2.bias"),
            (
                "decoder.mid_block.resnets.0.norm2.gamma",
                "decoder.middle.0.residual.3.gamma",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.upsamples.2.residual.2.weight",
            ),
            (
                "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
                "decoder.upsamples.4.shortcut.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.time_conv.weight",
                "decoder.upsamples.11.time_conv.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.1.norm1.gamma",
                "decoder.upsamples.13.residual.0.gamma",
            ),
        ];
        for (diffusers, wan) in cases {
            assert_eq!(wan_vae_name(diffusers, 2), wan, "{diffusers}");
        }
    }
}
