//! Wan 2.x's diffusion transformer, the math of diffusers' `WanTransformer3DModel`: patch
//! embedding, 3D rotary positions split over frames, height and width, a time embedding
//! projected into six modulation vectors per block, self-attention with queries and keys
//! RMS-normed across heads, cross-attention to the projected text, a tanh-GELU feed-forward,
//! and the modulated output head that unpatchifies back to latent frames.
//!
//! Precision follows diffusers loading the model with a reduced `torch_dtype`: the time
//! embedder, every `scale_shift_table` and the cross-attention norm keep float32 weights, the
//! modulated layer norms and gated residual adds run in float32, the rest in the model's kind.
//!
//! With [`Storage::fp8`], the blocks' linear weights are kept in float8 (e4m3) with a float32
//! scale per tensor and upcast as each runs (what diffusers' layerwise casting does, which
//! skips the same embeddings, norms and output projection): half the bytes of bfloat16. A float8 checkpoint keeps its own values and scales, so the upcast weight is the
//! one a load in the model's kind would have made.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

use super::weights::{TransformerCheckpoint, WeightsError};
use crate::placement::HostWeights;

/// The transformer's `config.json` as diffusers writes it. Missing fields take diffusers'
/// defaults; fields diffusers does not read (`_class_name`, ...) are ignored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct TransformerConfig {
    pub patch_size: [i64; 3],
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    pub in_channels: i64,
    /// `None` (or absent): the same as `in_channels`.
    pub out_channels: Option<i64>,
    pub text_dim: i64,
    pub freq_dim: i64,
    pub ffn_dim: i64,
    pub num_layers: i64,
    pub cross_attn_norm: bool,
    pub qk_norm: Option<String>,
    pub eps: f64,
    /// Wan 2.1 image-to-video's CLIP image branch; not implemented, must be `None`.
    pub image_dim: Option<i64>,
    pub added_kv_proj_dim: Option<i64>,
    pub rope_max_seq_len: i64,
    pub pos_embed_seq_len: Option<i64>,
}

impl Default for TransformerConfig {
    fn default() -> TransformerConfig {
        TransformerConfig {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some(QK_NORM.to_owned()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

/// The one query/key normalization Wan checkpoints use.
pub const QK_NORM: &str = "rms_norm_across_heads";

/// A config the runner cannot build a transformer from.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("transformer config `{field}` {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

impl TransformerConfig {
    /// The hidden size: heads times head size.
    pub fn dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels
            .filter(|&c| c > 0)
            .unwrap_or(self.in_channels)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let refuse = |field, problem: String| Err(ConfigError { field, problem });
        if let Some(dim) = self.image_dim {
            return refuse(
                "image_dim",
                format!(
                    "is {dim}: that is Wan 2.1 image-to-video with a CLIP image branch, which the \
                     runner does not implement; use a Wan 2.2 image-to-video checkpoint (no image encoder)"
                ),
            );
        }
        if let Some(dim) = self.added_kv_proj_dim {
            return refuse(
                "added_kv_proj_dim",
                format!(
                    "is {dim}: image key/value projections (Wan 2.1 image-to-video) are not implemented"
                ),
            );
        }
        if let Some(len) = self.pos_embed_seq_len {
            return refuse(
                "pos_embed_seq_len",
                format!("is {len}: first-last-frame image embeddings are not implemented"),
            );
        }
        if self.qk_norm.as_deref() != Some(QK_NORM) {
            return refuse(
                "qk_norm",
                format!("is {:?}; only \"{QK_NORM}\" is implemented", self.qk_norm),
            );
        }
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("text_dim", self.text_dim),
            ("freq_dim", self.freq_dim),
            ("ffn_dim", self.ffn_dim),
            ("num_layers", self.num_layers),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return refuse(field, format!("must be at least 1, got {value}"));
            }
        }
        if self.patch_size.iter().any(|&p| p <= 0) {
            return refuse(
                "patch_size",
                format!(
                    "must be three sizes of at least 1, got {:?}",
                    self.patch_size
                ),
            );
        }
        if self.attention_head_dim % 2 != 0 {
            return refuse(
                "attention_head_dim",
                format!(
                    "must be even (rotary positions rotate pairs), got {}",
                    self.attention_head_dim
                ),
            );
        }
        if self.freq_dim % 2 != 0 {
            return refuse(
                "freq_dim",
                format!(
                    "must be even (sine and cosine halves), got {}",
                    self.freq_dim
                ),
            );
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return refuse(
                "eps",
                format!("must be a positive number, got {}", self.eps),
            );
        }
        Ok(())
    }
}

/// Parameter name components diffusers keeps in float32 when loading in a reduced dtype
/// (its `_keep_in_fp32_modules`).
const KEEP_F32: [&str; 5] = [
    "time_embedder",
    "scale_shift_table",
    "norm1",
    "norm2",
    "norm3",
];

fn keeps_f32(name: &str) -> bool {
    name.split('.').any(|part| KEEP_F32.contains(&part))
}

/// How a transformer keeps its weights: the kind it computes in, and whether its blocks'
/// linear weights are stored in float8 ([`stores_fp8`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    pub kind: Kind,
    pub fp8: bool,
}

impl From<Kind> for Storage {
    /// Every weight in `kind` (or float32 where diffusers keeps it).
    fn from(kind: Kind) -> Storage {
        Storage { kind, fp8: false }
    }
}

/// The largest value of float8 e4m3 (no infinities): a weight rounded to fp8 is scaled so
/// that its largest magnitude lands here.
const FP8_MAX: f64 = 448.0;

/// Whether fp8 storage keeps the parameter `name` of `shape` in float8: the 2-D weights of
/// the blocks' linear layers; not the embeddings, the norms, the output projection or
/// anything diffusers keeps in float32 (what its layerwise casting skips in Wan).
pub fn stores_fp8(name: &str, shape: &[i64]) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && name.starts_with("blocks.") && !keeps_f32(name)
}

/// The name of a float8 weight's scale in host copies.
fn scale_name(weight: &str) -> String {
    format!("{weight}.fp8_scale")
}

enum Weight {
    Dense(Tensor),
    /// float8 values and their float32 scale (0-dim): the weight is `values * scale`.
    Fp8 {
        values: Tensor,
        scale: Tensor,
    },
}

struct Linear {
    weight: Weight,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match &self.weight {
            Weight::Dense(weight) => x.f_linear(weight, Some(&self.bias)),
            // Upcast as a load in the model's kind does: float32, scaled, then that kind (the
            // float32 copy is gone before the product runs).
            Weight::Fp8 { values, scale } => {
                let weight = {
                    let mut upcast = values.f_to_kind(Kind::Float)?;
                    let scaled = upcast.f_mul_(scale)?;
                    scaled.f_to_kind(self.bias.kind())?
                };
                x.f_linear(&weight, Some(&self.bias))
            }
        }
    }
}

/// The patch embedding: a 3-D convolution with stride equal to its kernel, run as a linear
/// layer over the patchified latents.
struct PatchEmbedding {
    weight: Tensor,
    bias: Tensor,
}

/// Walks the model's parameters by diffusers name: reads each from a checkpoint, in the kind
/// diffusers would give it, or only lists names and shapes.
struct Loader<'a> {
    source: Source<'a>,
    storage: Storage,
    /// Every parameter visited, in order.
    visited: Vec<(String, Vec<i64>)>,
}

enum Source<'a> {
    Checkpoint(&'a TransformerCheckpoint, Device),
    /// Host copies, copied to the device.
    Host(&'a HostWeights, Device),
    /// Listing only: parameters are left undefined.
    Shapes,
}

impl Loader<'_> {
    fn tensor(&mut self, name: String, shape: &[i64]) -> Result<Tensor, WeightsError> {
        let kind = if keeps_f32(&name) {
            Kind::Float
        } else {
            self.storage.kind
        };
        let tensor = match self.source {
            Source::Checkpoint(checkpoint, device) => {
                checkpoint.tensor(&name, shape, kind, device)?
            }
            Source::Host(host, device) => from_host(host, &name, shape, device)?,
            Source::Shapes => Tensor::new(),
        };
        self.visited.push((name, shape.to_vec()));
        Ok(tensor)
    }

    fn linear(&mut self, prefix: &str, input: i64, output: i64) -> Result<Linear, WeightsError> {
        let (name, shape) = (format!("{prefix}.weight"), [output, input]);
        let weight = if self.storage.fp8 && stores_fp8(&name, &shape) {
            let (values, scale) = match self.source {
                Source::Checkpoint(checkpoint, device) => {
                    checkpoint.fp8_tensor(&name, &shape, device)?
                }
                Source::Host(host, device) => (
                    from_host(host, &name, &shape, device)?,
                    from_host(host, &scale_name(&name), &[], device)?,
                ),
                Source::Shapes => (Tensor::new(), Tensor::new()),
            };
            self.visited.push((name, shape.to_vec()));
            Weight::Fp8 { values, scale }
        } else {
            Weight::Dense(self.tensor(name, &shape)?)
        };
        Ok(Linear {
            weight,
            bias: self.tensor(format!("{prefix}.bias"), &[output])?,
        })
    }
}

/// The host copy of `name` on `device`.
fn from_host(
    host: &HostWeights,
    name: &str,
    shape: &[i64],
    device: Device,
) -> Result<Tensor, WeightsError> {
    host.to_device(name, device)
        .ok_or_else(|| WeightsError::Missing {
            name: name.to_owned(),
            files: "the host copy".to_owned(),
            expected: shape.to_vec(),
        })?
        .map_err(|source| WeightsError::Torch {
            what: format!("copying `{name}` to the device"),
            files: "the host copy".to_owned(),
            source,
        })
}

/// `weight` (float32) in float8 e4m3 with a float32 scale (0-dim) that maps its largest
/// magnitude to [`FP8_MAX`]: what fp8 storage keeps of a weight a checkpoint holds in a wider
/// kind.
pub(super) fn quantize_fp8(weight: &Tensor) -> Result<(Tensor, Tensor), TchError> {
    let scale = weight
        .f_abs()?
        .f_max()?
        .f_div_scalar(FP8_MAX)?
        .f_clamp_min(f64::from(f32::MIN_POSITIVE))?;
    let values = weight.f_div(&scale)?.f_to_kind(Kind::Float8e4m3fn)?;
    Ok((values, scale))
}

impl TransformerConfig {
    /// Every parameter of the transformer, by diffusers name, with its shape: what
    /// [`WanTransformer::load`] reads.
    pub fn parameters(&self) -> Vec<(String, Vec<i64>)> {
        let mut loader = Loader {
            source: Source::Shapes,
            storage: Kind::Float.into(),
            visited: Vec::new(),
        };
        Weights::load(&mut loader, self).expect("listing shapes reads no file");
        loader.visited
    }

    /// Bytes the weights take stored as `storage` says (each float8 weight with its 4-byte
    /// scale; the parameters diffusers keeps in float32 in float32, whatever the model's kind).
    pub fn stored_bytes(&self, storage: Storage) -> u64 {
        let element = storage.kind.elt_size_in_bytes() as u64;
        self.parameters()
            .iter()
            .map(|(name, shape)| {
                let numel = shape.iter().product::<i64>() as u64;
                if storage.fp8 && stores_fp8(name, shape) {
                    numel + 4
                } else if keeps_f32(name) {
                    numel * 4
                } else {
                    numel * element
                }
            })
            .sum()
    }

    /// Bytes one float8 weight's upcast holds at once (float32, and its copy in the model's
    /// kind unless that is float32), for the largest such weight: 0 without fp8 storage.
    pub fn upcast_bytes(&self, storage: Storage) -> u64 {
        let copy = match storage.kind {
            Kind::Float => 0,
            kind => kind.elt_size_in_bytes() as u64,
        };
        self.parameters()
            .iter()
            .filter(|(name, shape)| storage.fp8 && stores_fp8(name, shape))
            .map(|(_, shape)| shape.iter().product::<i64>() as u64 * (4 + copy))
            .max()
            .unwrap_or(0)
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    heads: i64,
    eps: f64,
}

impl Attention {
    fn load(
        loader: &mut Loader<'_>,
        prefix: &str,
        config: &TransformerConfig,
    ) -> Result<Attention, WeightsError> {
        let dim = config.dim();
        Ok(Attention {
            to_q: loader.linear(&format!("{prefix}.to_q"), dim, dim)?,
            to_k: loader.linear(&format!("{prefix}.to_k"), dim, dim)?,
            to_v: loader.linear(&format!("{prefix}.to_v"), dim, dim)?,
            to_out: loader.linear(&format!("{prefix}.to_out.0"), dim, dim)?,
            norm_q: loader.tensor(format!("{prefix}.norm_q.weight"), &[dim])?,
            norm_k: loader.tensor(format!("{prefix}.norm_k.weight"), &[dim])?,
            heads: config.num_attention_heads,
            eps: config.eps,
        })
    }

    /// Self-attention when `context` is `None` (then `rope` rotates queries and keys),
    /// cross-attention to `context` otherwise.
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: Option<&Rotary>,
    ) -> Result<Tensor, TchError> {
        let source = context.unwrap_or(x);
        let inner = self.norm_q.size()[0];
        let split = |t: Tensor| t.f_unflatten(2, [self.heads, -1]);
        let mut q = split(self.to_q.forward(x)?.f_rms_norm(
            [inner],
            Some(&self.norm_q),
            self.eps,
        )?)?;
        let mut k = split(self.to_k.forward(source)?.f_rms_norm(
            [inner],
            Some(&self.norm_k),
            self.eps,
        )?)?;
        let v = split(self.to_v.forward(source)?)?;
        if let Some(rope) = rope {
            q = rope.rotate(&q)?;
            k = rope.rotate(&k)?;
        }
        let heads_first = |t: &Tensor| t.f_permute([0, 2, 1, 3]);
        let out = Tensor::f_scaled_dot_product_attention(
            &heads_first(&q)?,
            &heads_first(&k)?,
            &heads_first(&v)?,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )?;
        let out = heads_first(&out)?.f_flatten(2, 3)?.f_to_kind(q.kind())?;
        self.to_out.forward(&out)
    }
}

struct Block {
    /// `[1, 6, dim]`: shift, scale and gate for attention, then for the feed-forward.
    scale_shift_table: Tensor,
    attn1: Attention,
    attn2: Attention,
    /// The cross-attention input norm's weight and bias (`cross_attn_norm`).
    norm2: Option<(Tensor, Tensor)>,
    ffn_in: Linear,
    ffn_out: Linear,
}

impl Block {
    fn load(
        loader: &mut Loader<'_>,
        index: i64,
        config: &TransformerConfig,
    ) -> Result<Block, WeightsError> {
        let p = format!("blocks.{index}");
        let dim = config.dim();
        let norm2 = if config.cross_attn_norm {
            Some((
                loader.tensor(format!("{p}.norm2.weight"), &[dim])?,
                loader.tensor(format!("{p}.norm2.bias"), &[dim])?,
            ))
        } else {
            None
        };
        Ok(Block {
            scale_shift_table: loader.tensor(format!("{p}.scale_shift_table"), &[1, 6, dim])?,
            attn1: Attention::load(loader, &format!("{p}.attn1"), config)?,
            attn2: Attention::load(loader, &format!("{p}.attn2"), config)?,
            norm2,
            ffn_in: loader.linear(&format!("{p}.ffn.net.0.proj"), dim, config.ffn_dim)?,
            ffn_out: loader.linear(&format!("{p}.ffn.net.2"), config.ffn_dim, dim)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        modulation: &Tensor,
        rope: &Rotary,
        eps: f64,
    ) -> Result<Tensor, TchError> {
        let kind = x.kind();
        let dim = self.scale_shift_table.size()[2];
        let m = self
            .scale_shift_table
            .f_add(&modulation.f_to_kind(Kind::Float)?)?
            .f_chunk(6, 1)?;
        let (shift, scale, gate) = (&m[0], &m[1], &m[2]);
        let (c_shift, c_scale, c_gate) = (&m[3], &m[4], &m[5]);
        // Each intermediate goes as soon as the next one is made (a binding would live to the
        // end of the call), and the float32 sums are made in place: in bfloat16 the block's
        // peak is then what `framelane_core::memory` counts for it. The arithmetic is
        // diffusers' own, operation for operation.
        let modulate = |x: &Tensor, shift: &Tensor, scale: &Tensor| -> Result<Tensor, TchError> {
            let mut normed = x.f_to_kind(Kind::Float)?.f_layer_norm(
                [dim],
                None::<Tensor>,
                None::<Tensor>,
                eps,
                true,
            )?;
            let _ = normed.f_mul_(&scale.f_add_scalar(1.0)?)?;
            let _ = normed.f_add_(shift)?;
            normed.f_to_kind(kind)
        };
        // `x + out * gate` in float32, back in the model's kind.
        let gated_residual = |x: &Tensor, out: Tensor, gate: &Tensor| -> Result<Tensor, TchError> {
            let mut sum = out.f_to_kind(Kind::Float)?.f_mul(gate)?;
            drop(out);
            let _ = sum.f_add_(x)?;
            sum.f_to_kind(kind)
        };

        let attn = self
            .attn1
            .forward(&modulate(x, shift, scale)?, None, Some(rope))?;
        let x = gated_residual(x, attn, gate)?;

        let cross = {
            let normed = match &self.norm2 {
                Some((w, b)) => x
                    .f_to_kind(Kind::Float)?
                    .f_layer_norm([dim], Some(w), Some(b), eps, true)?
                    .f_to_kind(kind)?,
                None => x.shallow_clone(),
            };
            self.attn2.forward(&normed, Some(context), None)?
        };
        let x = {
            let before = x;
            before.f_add(&cross)?
        };
        drop(cross);

        let ff = {
            let mut hidden = self.ffn_in.forward(&modulate(&x, c_shift, c_scale)?)?;
            let _ = hidden.f_gelu_("tanh")?;
            self.ffn_out.forward(&hidden)?
        };
        gated_residual(&x, ff, c_gate)
    }
}

/// Rotary tables per axis: `[rope_max_seq_len, axis_dim / 2]` float32 cosines and sines of
/// `position / 10000^(2k / axis_dim)`, computed in float64 as diffusers does.
struct RopeTables {
    axes: [(Tensor, Tensor); 3],
    max_len: i64,
}

impl RopeTables {
    fn new(head_dim: i64, max_len: i64, device: Device) -> Result<RopeTables, TchError> {
        let h = 2 * (head_dim / 6);
        let axis = |dim: i64| -> Result<(Tensor, Tensor), TchError> {
            let half = (dim / 2) as usize;
            let mut cos = Vec::with_capacity(max_len as usize * half);
            let mut sin = Vec::with_capacity(max_len as usize * half);
            for pos in 0..max_len {
                for k in 0..half {
                    let freq = 1.0 / 10000f64.powf((2 * k) as f64 / dim as f64);
                    let angle = pos as f64 * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            let shape = [max_len, half as i64];
            Ok((
                Tensor::from_slice(&cos)
                    .f_view(shape)?
                    .f_to_device(device)?,
                Tensor::from_slice(&sin)
                    .f_view(shape)?
                    .f_to_device(device)?,
            ))
        };
        Ok(RopeTables {
            axes: [axis(head_dim - 2 * h)?, axis(h)?, axis(h)?],
            max_len,
        })
    }

    /// The rotation for a `frames x height x width` token grid, tokens in that order.
    fn for_grid(&self, grid: [i64; 3]) -> Result<Rotary, TchError> {
        if let Some(&too_long) = grid.iter().find(|&&n| n > self.max_len) {
            return Err(TchError::Shape(format!(
                "the latent grid {grid:?} (after patching) has an axis of {too_long} positions; \
                 this transformer's rotary table (rope_max_seq_len) holds {}",
                self.max_len
            )));
        }
        let [f, h, w] = grid;
        let expand = |table: &Tensor, axis: usize| -> Result<Tensor, TchError> {
            let mut view = [1, 1, 1, -1];
            view[axis] = grid[axis];
            table
                .f_narrow(0, 0, grid[axis])?
                .f_view(view)?
                .f_expand([f, h, w, -1], false)
        };
        let table = |pick: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor, TchError> {
            let parts = [
                expand(pick(&self.axes[0]), 0)?,
                expand(pick(&self.axes[1]), 1)?,
                expand(pick(&self.axes[2]), 2)?,
            ];
            Tensor::f_cat(&parts, -1)?.f_reshape([1, f * h * w, 1, -1])
        };
        Ok(Rotary {
            cos: table(|axis| &axis.0)?,
            sin: table(|axis| &axis.1)?,
        })
    }
}

/// `[1, tokens, 1, head_dim / 2]` cosines and sines, one per rotated pair.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// Rotates interleaved pairs `(x[2i], x[2i+1])` of `[batch, tokens, heads, head_dim]`,
    /// in float32, back to `x`'s kind.
    fn rotate(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let d = x.size()[3];
        let x1 = x.f_slice(3, 0, d, 2)?;
        let x2 = x.f_slice(3, 1, d, 2)?;
        let even = x1.f_mul(&self.cos)?.f_sub(&x2.f_mul(&self.sin)?)?;
        let odd = x1.f_mul(&self.sin)?.f_add(&x2.f_mul(&self.cos)?)?;
        Tensor::f_stack(&[even, odd], -1)?
            .f_flatten(3, 4)?
            .f_to_kind(x.kind())
    }
}

/// The transformer's parameters, as its config shapes them.
struct Weights {
    /// The patch embedding Conv3d: `[dim, in_channels, pt, ph, pw]`.
    patch_embedding: PatchEmbedding,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    blocks: Vec<Block>,
    /// `[1, 2, dim]`: shift and scale of the output norm.
    scale_shift_table: Tensor,
    proj_out: Linear,
}

impl Weights {
    fn load(loader: &mut Loader<'_>, config: &TransformerConfig) -> Result<Weights, WeightsError> {
        let dim = config.dim();
        let [pt, ph, pw] = config.patch_size;
        let patch_embedding = PatchEmbedding {
            weight: loader.tensor(
                "patch_embedding.weight".to_owned(),
                &[dim, config.in_channels, pt, ph, pw],
            )?,
            bias: loader.tensor("patch_embedding.bias".to_owned(), &[dim])?,
        };
        let embedder = "condition_embedder";
        Ok(Weights {
            patch_embedding,
            time_1: loader.linear(
                &format!("{embedder}.time_embedder.linear_1"),
                config.freq_dim,
                dim,
            )?,
            time_2: loader.linear(&format!("{embedder}.time_embedder.linear_2"), dim, dim)?,
            time_proj: loader.linear(&format!("{embedder}.time_proj"), dim, 6 * dim)?,
            text_1: loader.linear(
                &format!("{embedder}.text_embedder.linear_1"),
                config.text_dim,
                dim,
            )?,
            text_2: loader.linear(&format!("{embedder}.text_embedder.linear_2"), dim, dim)?,
            blocks: (0..config.num_layers)
                .map(|i| Block::load(loader, i, config))
                .collect::<Result<Vec<_>, _>>()?,
            scale_shift_table: loader.tensor("scale_shift_table".to_owned(), &[1, 2, dim])?,
            proj_out: loader.linear("proj_out", dim, config.out_channels() * pt * ph * pw)?,
        })
    }
}

/// A loaded Wan transformer on one device.
pub struct WanTransformer {
    config: TransformerConfig,
    kind: Kind,
    device: Device,
    weights: Weights,
    rope: RopeTables,
}

impl WanTransformer {
    /// Loads the checkpoint's weights onto `device`, computing in `storage`'s kind (float32
    /// or bfloat16; see the module doc for the parts kept in float32 and for fp8 storage).
    /// Tensors of the checkpoint that no parameter uses are refused: they belong to a variant
    /// this code does not run.
    pub fn load(
        checkpoint: &TransformerCheckpoint,
        storage: impl Into<Storage>,
        device: Device,
    ) -> Result<WanTransformer, WeightsError> {
        let storage = storage.into();
        let kind = storage.kind;
        let config = checkpoint.config().clone();
        let mut loader = Loader {
            source: Source::Checkpoint(checkpoint, device),
            storage,
            visited: Vec::new(),
        };
        let weights = Weights::load(&mut loader, &config)?;
        let used: Vec<String> = loader.visited.into_iter().map(|(name, _)| name).collect();
        checkpoint.check_no_leftovers(&used)?;
        let rope = RopeTables::new(config.attention_head_dim, config.rope_max_seq_len, device)
            .map_err(|e| checkpoint.torch_error("rotary tables", e))?;
        Ok(WanTransformer {
            config,
            kind,
            device,
            weights,
            rope,
        })
    }

    /// Reads the checkpoint's weights into host memory (as [`WanTransformer::load`] reads
    /// them, tensor by tensor), for [`WanTransformer::from_host`].
    pub fn read_host(
        checkpoint: &TransformerCheckpoint,
        storage: impl Into<Storage>,
    ) -> Result<HostWeights, WeightsError> {
        let storage = storage.into();
        let parameters = checkpoint.config().parameters();
        let mut host = HostWeights::default();
        for (name, shape) in &parameters {
            if storage.fp8 && stores_fp8(name, shape) {
                let (values, scale) = checkpoint.fp8_tensor(name, shape, Device::Cpu)?;
                host.keep(name, &values).map(drop)?;
                host.keep(&scale_name(name), &scale).map(drop)?;
                continue;
            }
            let kind = if keeps_f32(name) {
                Kind::Float
            } else {
                storage.kind
            };
            let tensor = checkpoint.tensor(name, shape, kind, Device::Cpu)?;
            host.keep(name, &tensor).map(drop)?;
        }
        let used: Vec<String> = parameters.into_iter().map(|(name, _)| name).collect();
        checkpoint.check_no_leftovers(&used)?;
        Ok(host)
    }

    /// The transformer on `device` from weights [`WanTransformer::read_host`] read.
    pub fn from_host(
        config: &TransformerConfig,
        host: &HostWeights,
        storage: impl Into<Storage>,
        device: Device,
    ) -> Result<WanTransformer, WeightsError> {
        let storage = storage.into();
        let kind = storage.kind;
        let mut loader = Loader {
            source: Source::Host(host, device),
            storage,
            visited: Vec::new(),
        };
        let weights = Weights::load(&mut loader, config)?;
        let rope = RopeTables::new(config.attention_head_dim, config.rope_max_seq_len, device)
            .map_err(|source| WeightsError::Torch {
                what: "rotary tables".to_owned(),
                files: "the host copy".to_owned(),
                source,
            })?;
        Ok(WanTransformer {
            config: config.clone(),
            kind,
            device,
            weights,
            rope,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The flow velocity for `latents` `[batch, in_channels, frames, height, width]` at
    /// `timestep` (`[batch]` or one value for all; the scheduler's timestep, 0 to 1000) given
    /// the text encoder's `context` `[batch, tokens, text_dim]`. Returns
    /// `[batch, out_channels, frames, height, width]` in the model's kind, on its device.
    /// Run it under `tch::no_grad_guard()`. Per-token timesteps (diffusers' `expand_timesteps`)
    /// belong to the 5B TI2V model only; the A14B pipelines give one timestep per item.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, TchError> {
        let grid = self.grid(latents)?;
        let [b, _, _, _, _] = size5(latents)?;
        let dim = self.config.dim();
        let rope = self.rope.for_grid(grid)?;

        let w = &self.weights;
        let x = self.patchify(
            &latents.f_to_device(self.device)?.f_to_kind(self.kind)?,
            grid,
        )?;
        let x = x.f_linear(
            &w.patch_embedding.weight.f_reshape([dim, -1])?,
            Some(&w.patch_embedding.bias),
        )?;

        let context = context.f_to_device(self.device)?.f_to_kind(self.kind)?;
        let n = timestep.numel() as i64;
        if n != 1 && n != b {
            return Err(TchError::Shape(format!(
                "timestep has {n} values for a batch of {b}; give one per batch item or one for \
                 all (per-token timesteps, Wan 2.2 TI2V's, are not implemented)"
            )));
        }
        let timestep = timestep
            .f_to_device(self.device)?
            .f_to_kind(Kind::Float)?
            .f_reshape([-1])?
            .f_expand([b], false)?;
        let temb = w
            .time_2
            .forward(
                &w.time_1
                    .forward(&timestep_embedding(&timestep, self.config.freq_dim)?)?
                    .f_silu()?,
            )?
            .f_to_kind(self.kind)?;
        let modulation = w
            .time_proj
            .forward(&temb.f_silu()?)?
            .f_unflatten(1, [6, dim])?;
        let context = w
            .text_2
            .forward(&w.text_1.forward(&context)?.f_gelu("tanh")?)?;

        let mut x = x;
        for block in &w.blocks {
            x = block.forward(&x, &context, &modulation, &rope, self.config.eps)?;
        }

        let out = w
            .scale_shift_table
            .f_add(&temb.f_unsqueeze(1)?)?
            .f_chunk(2, 1)?;
        let x = x
            .f_to_kind(Kind::Float)?
            .f_layer_norm([dim], None::<Tensor>, None::<Tensor>, self.config.eps, true)?
            .f_mul(&out[1].f_add_scalar(1.0)?)?
            .f_add(&out[0])?
            .f_to_kind(self.kind)?;
        self.unpatchify(&w.proj_out.forward(&x)?, b, grid)
    }

    /// The token grid `[frames, height, width]` after patching, checking the input's shape.
    fn grid(&self, latents: &Tensor) -> Result<[i64; 3], TchError> {
        let [_, c, f, h, w] = size5(latents)?;
        if c != self.config.in_channels {
            return Err(TchError::Shape(format!(
                "latents have {c} channels but this transformer takes {} (in_channels)",
                self.config.in_channels
            )));
        }
        let [pt, ph, pw] = self.config.patch_size;
        if f % pt != 0 || h % ph != 0 || w % pw != 0 {
            return Err(TchError::Shape(format!(
                "latent frames x height x width {f}x{h}x{w} is not a multiple of the patch size {pt}x{ph}x{pw}"
            )));
        }
        Ok([f / pt, h / ph, w / pw])
    }

    /// `[b, c, f, h, w]` to `[b, tokens, c * patch volume]`, tokens in frame, row, column
    /// order and each patch flattened as the Conv3d weight is. A linear layer over these
    /// patches is the patch embedding Conv3d (kernel = stride), without cuDNN's TF32 on GPUs.
    fn patchify(&self, x: &Tensor, [f, h, w]: [i64; 3]) -> Result<Tensor, TchError> {
        let [b, c, _, _, _] = size5(x)?;
        let [pt, ph, pw] = self.config.patch_size;
        x.f_reshape([b, c, f, pt, h, ph, w, pw])?
            .f_permute([0, 2, 4, 6, 1, 3, 5, 7])?
            .f_reshape([b, f * h * w, c * pt * ph * pw])
    }

    fn unpatchify(&self, x: &Tensor, b: i64, [f, h, w]: [i64; 3]) -> Result<Tensor, TchError> {
        let [pt, ph, pw] = self.config.patch_size;
        let c = self.config.out_channels();
        x.f_reshape([b, f, h, w, pt, ph, pw, c])?
            .f_permute([0, 7, 1, 4, 2, 5, 3, 6])?
            .f_reshape([b, c, f * pt, h * ph, w * pw])
    }
}

fn size5(x: &Tensor) -> Result<[i64; 5], TchError> {
    let size = x.size();
    size.as_slice().try_into().map_err(|_| {
        TchError::Shape(format!(
            "latents must be [batch, channels, frames, height, width], got {size:?}"
        ))
    })
}

/// diffusers' sinusoidal timestep embedding with `flip_sin_to_cos` and no frequency shift:
/// `[cos(t * f_k), sin(t * f_k)]` with `f_k = exp(-ln(10000) * k / (dim / 2))`, in float32.
fn timestep_embedding(timestep: &Tensor, dim: i64) -> Result<Tensor, TchError> {
    let half = dim / 2;
    let freqs = Tensor::f_arange(half, (Kind::Float, timestep.device()))?
        .f_mul_scalar(-(10000f64.ln()))?
        .f_div_scalar(half as f64)?
        .f_exp()?;
    let angles = timestep.f_unsqueeze(1)?.f_mul(&freqs.f_unsqueeze(0)?)?;
    Tensor::f_cat(&[angles.f_cos()?, angles.f_sin()?], -1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults_and_valid() {
        let config: TransformerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, TransformerConfig::default());
        assert_eq!(config.dim(), 5120);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn out_channels_default_to_in_channels() {
        let config: TransformerConfig =
            serde_json::from_str(r#"{"in_channels": 36, "out_channels": null}"#).unwrap();
        assert_eq!(config.out_channels(), 36);
    }

    #[test]
    fn keeps_diffusers_float32_modules() {
        assert!(keeps_f32(
            "condition_embedder.time_embedder.linear_1.weight"
        ));
        assert!(keeps_f32("blocks.3.scale_shift_table"));
        assert!(keeps_f32("scale_shift_table"));
        assert!(keeps_f32("blocks.0.norm2.bias"));
        assert!(!keeps_f32("condition_embedder.time_proj.weight"));
        assert!(!keeps_f32("blocks.0.attn1.norm_q.weight"));
    }

    #[test]
    fn parameters_count_like_diffusers() {
        // diffusers' WanTransformer3DModel has 1418996800 parameters in 825 tensors in the
        // 1.3B shape, and 14288901184 in 1095 as a Wan 2.2 A14B image-to-video expert.
        let count = |config: &TransformerConfig| {
            let parameters = config.parameters();
            let numel: i64 = parameters
                .iter()
                .map(|(_, s)| s.iter().product::<i64>())
                .sum();
            (numel, parameters.len())
        };
        let small = TransformerConfig {
            num_attention_heads: 12,
            ffn_dim: 8960,
            num_layers: 30,
            ..TransformerConfig::default()
        };
        assert_eq!(count(&small), (1_418_996_800, 825));
        let a14b = TransformerConfig {
            in_channels: 36,
            ..TransformerConfig::default()
        };
        assert_eq!(count(&a14b), (14_288_901_184, 1095));
    }

    #[test]
    fn fp8_storage_halves_an_a14b_expert() {
        let a14b = TransformerConfig {
            in_channels: 36,
            ..TransformerConfig::default()
        };
        let bf16 = Storage::from(Kind::BFloat16);
        let fp8 = Storage { fp8: true, ..bf16 };
        let stored: Vec<_> = a14b
            .parameters()
            .into_iter()
            .filter(|(name, shape)| stores_fp8(name, shape))
            .collect();
        // Per block: self- and cross-attention's four projections, the feed-forward's two.
        assert_eq!(stored.len(), 40 * 10);
        assert!(!stores_fp8("proj_out.weight", &[64, 5120]));
        assert!(!stores_fp8(
            "condition_embedder.time_proj.weight",
            &[30720, 5120]
        ));
        assert!(!stores_fp8("blocks.0.attn1.norm_q.weight", &[5120]));
        // The weights diffusers keeps in float32 (29,184,000 elements) at four bytes each.
        assert_eq!(a14b.stored_bytes(bf16), 2 * 14_288_901_184 + 58_368_000);
        // core's fp8 A14B profile (`a14b_fp8` in core/src/memory.rs's tests) predates that
        // and says 58,368,000 bytes less.
        assert_eq!(a14b.stored_bytes(fp8), 14_526_885_568 + 58_368_000);
        // The feed-forward's 13824x5120 weight, float32 then bfloat16.
        assert_eq!(a14b.upcast_bytes(fp8), 13824 * 5120 * 6);
        assert_eq!(a14b.upcast_bytes(bf16), 0);
    }

    #[test]
    fn rope_splits_head_dim_like_diffusers() {
        // 128 -> frames 44, height 42, width 42.
        let tables = RopeTables::new(128, 4, Device::Cpu).unwrap();
        let halves: Vec<i64> = tables.axes.iter().map(|(c, _)| c.size()[1]).collect();
        assert_eq!(halves, vec![22, 21, 21]);
        let rotary = tables.for_grid([2, 3, 4]).unwrap();
        assert_eq!(rotary.cos.size(), vec![1, 24, 1, 64]);
        assert!(tables.for_grid([5, 1, 1]).is_err());
    }
}
