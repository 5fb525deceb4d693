//! Where a Wan transformer's weights are and what they are called.
//!
//! - diffusers: `transformer/` (or `transformer_2/`) with `config.json` and either
//!   `diffusion_pytorch_model.safetensors` or shards listed in
//!   `diffusion_pytorch_model.safetensors.index.json`.
//! - ComfyUI: one or more files whose transformer tensors carry the original Wan names
//!   (`blocks.N.self_attn.q.weight`, `head.modulation`, ...) under a prefix such as
//!   `model.diffusion_model.` (AllInOne checkpoints, beside `text_encoders.` and `vae.`) or
//!   none (a bare diffusion-model file). The names are diffusers' single-file conversion for
//!   Wan read backwards; the config is inferred from tensor shapes as ComfyUI does.
//!
//! Float8 weights (`F8_E4M3`, `F8_E5M2`) and ComfyUI's scaled fp8 are upcast tensor by tensor
//! as they load (see [`TensorFiles::weight`]).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, TchError, Tensor};

use super::safetensors::{SafetensorsError, TensorFiles};
use super::transformer::{ConfigError, QK_NORM, TransformerConfig, quantize_fp8};

/// Why a transformer checkpoint cannot be loaded. Each message names the file and, where one
/// is at fault, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    File(#[from] SafetensorsError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a diffusers transformer config: {source}")]
    ConfigJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{origin}: {source}")]
    Config { origin: String, source: ConfigError },
    #[error("{dir} has neither {name} nor {name}.index.json; the runner reads safetensors only")]
    NoWeights { dir: PathBuf, name: String },
    #[error("{path}: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("no Wan transformer in {files}: no tensor is named `head.modulation` under any prefix")]
    NotWan { files: String },
    #[error(
        "{files} hold more than one Wan transformer (prefixes {prefixes:?}); load each from its own files"
    )]
    SeveralTransformers {
        files: String,
        prefixes: Vec<String>,
    },
    #[error(
        "cannot infer the transformer config from {files}: {reason}; pass the model's diffusers config.json"
    )]
    Infer { files: String, reason: String },
    #[error(
        "tensor `{name}` is missing from {files}: the transformer config needs it with shape {expected:?}"
    )]
    Missing {
        name: String,
        files: String,
        expected: Vec<i64>,
    },
    #[error(
        "tensor `{name}` in {path} has shape {found:?}, but the transformer config needs {expected:?}"
    )]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error(
        "tensor `{name}` in {path} is not part of the Wan transformer the runner implements \
         (a VACE, camera, audio or Wan 2.1 image branch, or another model)"
    )]
    Unexpected { name: String, path: PathBuf },
    #[error(transparent)]
    Host(#[from] crate::accel::AccelError),
    #[error("{what} ({files}): {source}")]
    Torch {
        what: String,
        files: String,
        source: TchError,
    },
}

/// How the checkpoint names its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// diffusers' own names.
    Diffusers,
    /// The original Wan names under `prefix` (`model.diffusion_model.`, or `""`).
    ComfyUi { prefix: String },
}

/// A transformer's weight files, their naming and its config, ready to load.
#[derive(Debug)]
pub struct TransformerCheckpoint {
    files: TensorFiles,
    layout: Layout,
    config: TransformerConfig,
}

/// The weights file of a diffusers model folder (or the stem of its shards' index).
pub(super) const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

impl TransformerCheckpoint {
    /// A diffusers component folder such as `transformer/` or `transformer_2/`.
    pub fn diffusers(dir: &Path) -> Result<TransformerCheckpoint, WeightsError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| WeightsError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: TransformerConfig =
            serde_json::from_str(&text).map_err(|source| WeightsError::ConfigJson {
                path: config_path,
                source,
            })?;
        let paths = safetensors_in(dir, DIFFUSERS_WEIGHTS)?;
        TransformerCheckpoint::new(TensorFiles::open(&paths)?, Layout::Diffusers, config)
    }

    /// ComfyUI-named transformer tensors in `files` (one file, split files, or an AllInOne
    /// checkpoint also holding the text encoder and VAE). `config` overrides the one
    /// inferred from the tensors' shapes, which assumes Wan's head size of 128.
    pub fn comfyui(
        files: TensorFiles,
        config: Option<TransformerConfig>,
    ) -> Result<TransformerCheckpoint, WeightsError> {
        let prefixes = files.find_prefixes("head.modulation");
        let prefix = match prefixes.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(WeightsError::NotWan {
                    files: files.describe(),
                });
            }
            _ => {
                return Err(WeightsError::SeveralTransformers {
                    files: files.describe(),
                    prefixes,
                });
            }
        };
        let config = match config {
            Some(config) => config,
            None => infer_config(&files, &prefix)?,
        };
        TransformerCheckpoint::new(files, Layout::ComfyUi { prefix }, config)
    }

    fn new(
        files: TensorFiles,
        layout: Layout,
        config: TransformerConfig,
    ) -> Result<TransformerCheckpoint, WeightsError> {
        config.validate().map_err(|source| WeightsError::Config {
            origin: files.describe(),
            source,
        })?;
        Ok(TransformerCheckpoint {
            files,
            layout,
            config,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn files(&self) -> &TensorFiles {
        &self.files
    }

    /// The name a diffusers parameter has in these files.
    pub fn file_name(&self, diffusers_name: &str) -> String {
        match &self.layout {
            Layout::Diffusers => diffusers_name.to_owned(),
            Layout::ComfyUi { prefix } => format!("{prefix}{}", comfy_name(diffusers_name)),
        }
    }

    /// The parameter `diffusers_name`, checked against `shape`, as `kind` on `device`.
    pub(super) fn tensor(
        &self,
        diffusers_name: &str,
        shape: &[i64],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, WeightsError> {
        let name = self.checked(diffusers_name, shape)?;
        Ok(self.files.weight(&name, kind, device)?)
    }

    /// The parameter `diffusers_name`, checked against `shape`, in float8 on `device` with
    /// its float32 scale: a float8 tensor's own values and scale (ComfyUI's `scale_weight`, or
    /// 1), else the tensor rounded to float8 ([`quantize_fp8`]).
    pub(super) fn fp8_tensor(
        &self,
        diffusers_name: &str,
        shape: &[i64],
        device: Device,
    ) -> Result<(Tensor, Tensor), WeightsError> {
        let name = self.checked(diffusers_name, shape)?;
        if let Some(stored) = self.files.fp8(&name, device)? {
            return Ok(stored);
        }
        let weight = self.files.weight(&name, Kind::Float, device)?;
        quantize_fp8(&weight).map_err(|e| self.torch_error(&format!("rounding `{name}` to fp8"), e))
    }

    /// The file name of `diffusers_name`, once its tensor is found with `shape`.
    fn checked(&self, diffusers_name: &str, shape: &[i64]) -> Result<String, WeightsError> {
        let name = self.file_name(diffusers_name);
        let Some(info) = self.files.info(&name) else {
            return Err(WeightsError::Missing {
                name,
                files: self.files.describe(),
                expected: shape.to_vec(),
            });
        };
        if info.shape != shape {
            return Err(WeightsError::Shape {
                path: self.files.path_of(info).to_path_buf(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
                name,
            });
        }
        Ok(name)
    }

    /// Refuses tensors of the transformer that no parameter read (`used`, diffusers names):
    /// they belong to a variant the runner does not implement. ComfyUI's fp8 scales and its
    /// `scaled_fp8` marker are expected extras.
    pub(super) fn check_no_leftovers(&self, used: &[String]) -> Result<(), WeightsError> {
        let expected: HashSet<String> = used.iter().map(|n| self.file_name(n)).collect();
        let prefix = match &self.layout {
            Layout::Diffusers => "",
            Layout::ComfyUi { prefix } => prefix.as_str(),
        };
        match unexpected_tensor(&self.files, prefix, &expected) {
            Some((name, path)) => Err(WeightsError::Unexpected { name, path }),
            None => Ok(()),
        }
    }

    pub(super) fn torch_error(&self, what: &str, source: TchError) -> WeightsError {
        WeightsError::Torch {
            what: what.to_owned(),
            files: self.files.describe(),
            source,
        }
    }
}

/// The first tensor under `prefix` in `files` that is neither in `expected` (file names) nor
/// one of ComfyUI's fp8 extras (`scaled_fp8`, and the `scale_weight` or `scale_input` of an
/// expected weight), with its file.
pub(super) fn unexpected_tensor(
    files: &TensorFiles,
    prefix: &str,
    expected: &HashSet<String>,
) -> Option<(String, PathBuf)> {
    let is_fp8_extra = |name: &str| {
        name.strip_prefix(prefix) == Some("scaled_fp8")
            || [".scale_weight", ".scale_input"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|stem| expected.contains(&format!("{stem}.weight")))
            })
    };
    let name = files
        .names()
        .filter(|name| name.starts_with(prefix))
        .find(|name| !expected.contains(*name) && !is_fp8_extra(name))?;
    let path = files
        .info(name)
        .map_or_else(PathBuf::new, |info| files.path_of(info).to_path_buf());
    Some((name.to_owned(), path))
}

/// The safetensors files of a diffusers or transformers component folder: `NAME` (such as
/// `diffusion_pytorch_model.safetensors` or `model.safetensors`), or the shards its
/// `NAME.index.json` lists.
pub(super) fn safetensors_in(dir: &Path, name: &str) -> Result<Vec<PathBuf>, WeightsError> {
    let index = dir.join(format!("{name}.index.json"));
    let single = dir.join(name);
    if index.is_file() {
        shard_paths(dir, &index)
    } else if single.is_file() {
        Ok(vec![single])
    } else {
        Err(WeightsError::NoWeights {
            dir: dir.to_path_buf(),
            name: name.to_owned(),
        })
    }
}

/// The shard files an index lists, each a plain file name in `dir`.
fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let text = std::fs::read_to_string(index).map_err(|source| WeightsError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| WeightsError::Index {
        path: index.to_path_buf(),
        reason,
    };
    let parsed: ShardIndex =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a shard index: {e}")))?;
    let shards: BTreeSet<&str> = parsed.weight_map.values().map(String::as_str).collect();
    if shards.is_empty() {
        return Err(bad("its weight_map is empty".to_owned()));
    }
    shards
        .into_iter()
        .map(|shard| {
            if Path::new(shard).file_name().and_then(|n| n.to_str()) == Some(shard) {
                Ok(dir.join(shard))
            } else {
                Err(bad(format!(
                    "shard `{shard}` is not a file name in the same folder"
                )))
            }
        })
        .collect()
}

/// diffusers names of the top-level parameters and their original Wan names.
const TOP_NAMES: [(&str, &str); 7] = [
    (
        "condition_embedder.time_embedder.linear_1.",
        "time_embedding.0.",
    ),
    (
        "condition_embedder.time_embedder.linear_2.",
        "time_embedding.2.",
    ),
    (
        "condition_embedder.text_embedder.linear_1.",
        "text_embedding.0.",
    ),
    (
        "condition_embedder.text_embedder.linear_2.",
        "text_embedding.2.",
    ),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
];

/// Inside `blocks.N.`: diffusers' cross-attention norm is `norm2`, Wan's is `norm3`.
const BLOCK_NAMES: [(&str, &str); 6] = [
    ("scale_shift_table", "modulation"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    ("norm2.", "norm3."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
];

/// Inside `self_attn.` and `cross_attn.`; `norm_q` and `norm_k` keep their names.
const ATTENTION_NAMES: [(&str, &str); 4] = [
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "o."),
];

fn swap_prefix(name: &str, table: &[(&str, &str)]) -> String {
    table
        .iter()
        .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        .unwrap_or_else(|| name.to_owned())
}

/// The original Wan (ComfyUI) name of a diffusers transformer parameter.
fn comfy_name(name: &str) -> String {
    let Some(rest) = name.strip_prefix("blocks.") else {
        return swap_prefix(name, &TOP_NAMES);
    };
    let (index, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let rest = swap_prefix(rest, &BLOCK_NAMES);
    let rest = match rest.split_once('.') {
        Some((attn @ ("self_attn" | "cross_attn"), inner)) => {
            format!("{attn}.{}", swap_prefix(inner, &ATTENTION_NAMES))
        }
        _ => rest,
    };
    format!("blocks.{index}.{rest}")
}

/// Wan's head size: ComfyUI derives the head count from the hidden size with it.
const HEAD_DIM: i64 = 128;

/// The config ComfyUI would infer for the transformer under `prefix`.
fn infer_config(files: &TensorFiles, prefix: &str) -> Result<TransformerConfig, WeightsError> {
    let infer = |reason: String| WeightsError::Infer {
        files: files.describe(),
        reason,
    };
    let shape = |name: &str, rank: usize| -> Result<Vec<i64>, WeightsError> {
        let full = format!("{prefix}{name}");
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
    };
    let dim = shape("head.modulation", 3)?[2];
    let patch = shape("patch_embedding.weight", 5)?;
    let patch_size = [patch[2], patch[3], patch[4]];
    let patch_volume: i64 = patch_size.iter().product();
    let head_out = shape("head.head.weight", 2)?[0];
    if dim % HEAD_DIM != 0 || head_out % patch_volume != 0 {
        return Err(infer(format!(
            "hidden size {dim} is not a multiple of Wan's head size {HEAD_DIM}, or the head's {head_out} \
             outputs do not split into patches of {patch_volume}"
        )));
    }
    let blocks = format!("{prefix}blocks.");
    let num_layers = files
        .names()
        .filter_map(|name| {
            name.strip_prefix(&blocks)?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    let has = |name: &str| files.info(&format!("{prefix}{name}")).is_some();
    Ok(TransformerConfig {
        patch_size,
        num_attention_heads: dim / HEAD_DIM,
        attention_head_dim: HEAD_DIM,
        in_channels: patch[1],
        out_channels: Some(head_out / patch_volume),
        text_dim: shape("text_embedding.0.weight", 2)?[1],
        freq_dim: shape("time_embedding.0.weight", 2)?[1],
        ffn_dim: shape("blocks.0.ffn.0.weight", 2)?[0],
        num_layers,
        cross_attn_norm: has("blocks.0.norm3.weight"),
        qk_norm: has("blocks.0.self_attn.norm_q.weight").then(|| QK_NORM.to_owned()),
        image_dim: files
            .info(&format!("{prefix}img_emb.proj.0.weight"))
            .and_then(|info| info.shape.first().copied()),
        ..TransformerConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names_map_to_wan_names() {
        let cases = [
            ("patch_embedding.weight", "patch_embedding.weight"),
            (
                "condition_embedder.time_embedder.linear_2.bias",
                "time_embedding.2.bias",
            ),
            (
                "condition_embedder.time_proj.weight",
                "time_projection.1.weight",
            ),
            (
                "condition_embedder.text_embedder.linear_1.weight",
                "text_embedding.0.weight",
            ),
            ("scale_shift_table", "head.modulation"),
            ("proj_out.bias", "head.head.bias"),
            ("blocks.12.scale_shift_table", "blocks.12.modulation"),
            ("blocks.0.attn1.to_q.weight", "blocks.0.self_attn.q.weight"),
            ("blocks.0.attn2.to_out.0.bias", "blocks.0.cross_attn.o.bias"),
            (
                "blocks.3.attn1.norm_k.weight",
                "blocks.3.self_attn.norm_k.weight",
            ),
            ("blocks.3.norm2.weight", "blocks.3.norm3.weight"),
            ("blocks.3.ffn.net.0.proj.weight", "blocks.3.ffn.0.weight"),
            ("blocks.3.ffn.net.2.bias", "blocks.3.ffn.2.bias"),
        ];
        for (diffusers, wan) in cases {
            assert_eq!(comfy_name(diffusers), wan, "{diffusers}");
        }
    }
}
