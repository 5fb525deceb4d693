//! The Wan 2.1 video VAE (16 latent channels, also the VAE of the Wan 2.2 A14B models),
//! computed as diffusers' `AutoencoderKLWan` computes it.
//!
//! Its 3D convolutions are causal in time, so a video is decoded one latent frame at a time
//! (4 video frames each, 1 for the first) and encoded the first frame first, then 4 frames at
//! a time. Each convolution keeps the last frames it saw in a feature cache for the next chunk:
//! memory depends on the frame size, not on the number of frames. Frames too large for that
//! can also be split into overlapping spatial tiles ([`Tiling`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, TchError, Tensor};

use super::tensors::{TensorSource, WeightError, Weights};
use crate::video::Frames;

/// Frames of the previous chunk a causal 3x3x3 convolution needs.
const CACHE_T: i64 = 2;

/// The model class diffusers writes into this VAE's config.json.
const CLASS_NAME: &str = "AutoencoderKLWan";

/// A VAE config.json (diffusers' `AutoencoderKLWan` fields and defaults). The field names are
/// diffusers', spelling included (`temperal_downsample`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct VaeConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub base_dim: i64,
    pub decoder_base_dim: Option<i64>,
    pub z_dim: i64,
    pub dim_mult: Vec<i64>,
    pub num_res_blocks: i64,
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    pub is_residual: bool,
    pub in_channels: i64,
    pub out_channels: i64,
    pub patch_size: Option<i64>,
    pub scale_factor_temporal: i64,
    pub scale_factor_spatial: i64,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            class_name: None,
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: Vec::new(),
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: 4,
            scale_factor_spatial: 8,
        }
    }
}

/// Why the VAE cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("{path}: {message}")]
    ConfigFile { path: PathBuf, message: String },
    #[error("VAE config field `{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("VAE weights: {0}")]
    Weights(#[from] WeightError),
    #[error("VAE input: {0}")]
    Input(String),
    #[error("VAE: {0}")]
    Torch(#[from] TchError),
}

fn config_error(field: &'static str, message: impl Into<String>) -> VaeError {
    VaeError::Config {
        field,
        message: message.into(),
    }
}

impl VaeConfig {
    /// Reads and checks a config.json.
    pub fn from_file(path: &Path) -> Result<VaeConfig, VaeError> {
        let error = |message: String| VaeError::ConfigFile {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let config: VaeConfig = serde_json::from_str(&text)
            .map_err(|e| error(format!("not a diffusers VAE config: {e}")))?;
        config.check()?;
        Ok(config)
    }

    /// Refuses what this implementation does not compute exactly as diffusers does.
    pub fn check(&self) -> Result<(), VaeError> {
        if let Some(class) = self.class_name.as_deref().filter(|c| *c != CLASS_NAME) {
            return Err(config_error(
                "_class_name",
                format!("is {class}, not {CLASS_NAME}: point the model at the Wan VAE"),
            ));
        }
        if self.is_residual || self.patch_size.is_some() {
            return Err(config_error(
                if self.is_residual {
                    "is_residual"
                } else {
                    "patch_size"
                },
                "is the Wan 2.2 TI2V-5B VAE (48 latent channels, residual blocks, patchified \
                 frames), which the runner does not implement; Wan 2.1 and Wan 2.2 A14B models \
                 use the 16-channel Wan 2.1 VAE",
            ));
        }
        if !self.attn_scales.is_empty() {
            return Err(config_error(
                "attn_scales",
                "must be empty: diffusers' Wan encoder cannot run attention in its down \
                 blocks either",
            ));
        }
        if self.dim_mult.is_empty() || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err(config_error(
                "temperal_downsample",
                format!(
                    "has {} entries; it needs one fewer than dim_mult's {}",
                    self.temperal_downsample.len(),
                    self.dim_mult.len()
                ),
            ));
        }
        for (field, stats) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if stats.len() as i64 != self.z_dim {
                return Err(config_error(
                    field,
                    format!("has {} entries, z_dim is {}", stats.len(), self.z_dim),
                ));
            }
        }
        let temporal = 1 << self.temperal_downsample.iter().filter(|&&d| d).count();
        let spatial = 1 << self.temperal_downsample.len();
        for (field, value, implied) in [
            (
                "scale_factor_temporal",
                self.scale_factor_temporal,
                temporal,
            ),
            ("scale_factor_spatial", self.scale_factor_spatial, spatial),
        ] {
            if value != implied {
                return Err(config_error(
                    field,
                    format!("is {value}, but temperal_downsample makes it {implied}"),
                ));
            }
        }
        Ok(())
    }
}

/// Spatial tiles, in video pixels, as diffusers' `enable_tiling` takes them: tiles of
/// `min_*` pixels every `stride_*` pixels, blended linearly where they overlap. Tiling starts
/// when the frames are larger than one tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub min_height: i64,
    pub min_width: i64,
    pub stride_height: i64,
    pub stride_width: i64,
}

impl Default for Tiling {
    /// diffusers' defaults.
    fn default() -> Self {
        Tiling {
            min_height: 256,
            min_width: 256,
            stride_height: 192,
            stride_width: 192,
        }
    }
}

impl Tiling {
    fn check(&self, spatial: i64) -> Result<(), VaeError> {
        let fits = |min: i64, stride: i64| stride >= spatial && min >= stride;
        if fits(self.min_height, self.stride_height) && fits(self.min_width, self.stride_width) {
            Ok(())
        } else {
            Err(VaeError::Input(format!(
                "tiling {self:?}: strides must be at least {spatial} pixels (one latent pixel) \
                 and tiles at least as large as their stride"
            )))
        }
    }
}

/// The Wan VAE on one device.
pub struct AutoencoderKLWan {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    device: Device,
}

impl AutoencoderKLWan {
    /// Builds the VAE `config` describes from `source` (diffusers' tensor names), with every
    /// weight moved to `device` as `kind`.
    pub fn from_tensors(
        config: VaeConfig,
        device: Device,
        kind: Kind,
        source: &mut TensorSource<'_>,
    ) -> Result<AutoencoderKLWan, VaeError> {
        config.check()?;
        let mut w = Weights::new(source, device, kind);
        let z = config.z_dim;
        Ok(AutoencoderKLWan {
            encoder: Encoder::load(&mut w, &config)?,
            decoder: Decoder::load(&mut w, &config)?,
            quant_conv: CausalConv3d::load(&mut w, "quant_conv", z * 2, z * 2, POINTWISE)?,
            post_quant_conv: CausalConv3d::load(&mut w, "post_quant_conv", z, z, POINTWISE)?,
            config,
            device,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Latents as the denoiser sees them to latents as the VAE decodes them, as the Wan
    /// pipelines do before decoding: `latents * std + mean`, per channel.
    pub fn unnormalize_latents(&self, latents: &Tensor) -> Result<Tensor, VaeError> {
        let (mean, inv_std) = self.latent_statistics(latents)?;
        Ok(latents.f_div(&inv_std)?.f_add(&mean)?)
    }

    /// The inverse, as the image-to-video pipeline applies it to an encoded image:
    /// `(latents - mean) / std`, per channel.
    pub fn normalize_latents(&self, latents: &Tensor) -> Result<Tensor, VaeError> {
        let (mean, inv_std) = self.latent_statistics(latents)?;
        Ok(latents.f_sub(&mean)?.f_mul(&inv_std)?)
    }

    /// `latents_mean` and `1 / latents_std`, shaped and typed for `latents` (the pipelines
    /// take the reciprocal in the latents' dtype).
    fn latent_statistics(&self, latents: &Tensor) -> Result<(Tensor, Tensor), VaeError> {
        self.check_latents(latents)?;
        let shape = [1, self.config.z_dim, 1, 1, 1];
        let stat = |values: &[f64]| {
            Tensor::f_from_slice(values)?
                .f_to_kind(Kind::Float)?
                .f_view(shape)?
                .f_to_device(latents.device())?
                .f_to_kind(latents.kind())
        };
        let mean = stat(&self.config.latents_mean)?;
        let inv_std = stat(&self.config.latents_std)?.f_reciprocal()?;
        Ok((mean, inv_std))
    }

    fn check_latents(&self, latents: &Tensor) -> Result<(), VaeError> {
        let size = latents.size();
        if size.len() != 5 || size[1] != self.config.z_dim || size[2] < 1 {
            return Err(VaeError::Input(format!(
                "latents of shape {size:?}; expected [batch, {}, frames, height, width]",
                self.config.z_dim
            )));
        }
        Ok(())
    }

    /// Decodes unnormalized latents `[B, z_dim, T, h, w]` into a video `[B, 3, 4(T-1)+1, 8h,
    /// 8w]` in [-1, 1], as diffusers' `decode(...).sample`.
    pub fn decode(&self, latents: &Tensor, tiling: Option<&Tiling>) -> Result<Tensor, VaeError> {
        let mut pieces = Vec::new();
        self.decode_pieces(latents, tiling, &mut |piece| {
            pieces.push(piece);
            Ok(())
        })?;
        Ok(Tensor::f_cat(&pieces, 2)?)
    }

    /// Decodes unnormalized latents of one video into 8-bit RGB frames, converted as the
    /// pipelines' video processor converts them to images (`[-1, 1]` to `[0, 1]`, clamped,
    /// times 255, rounded half to even). Without tiling, each latent frame's video frames are
    /// converted as soon as they are decoded, so only the bytes accumulate.
    pub fn decode_frames(
        &self,
        latents: &Tensor,
        tiling: Option<&Tiling>,
    ) -> Result<Frames, VaeError> {
        self.check_latents(latents)?;
        let size = latents.size();
        if size[0] != 1 {
            return Err(VaeError::Input(format!(
                "latents of shape {size:?}; frames come from one video at a time (batch 1)"
            )));
        }
        let mut rgb = Vec::new();
        let (mut count, mut height, mut width) = (0, 0, 0);
        self.decode_pieces(latents, tiling, &mut |piece| {
            let (_, _, t, h, w) = piece.size5()?;
            (count, height, width) = (count + t, h, w);
            append_rgb8(&piece, &mut rgb)?;
            Ok(())
        })?;
        Ok(Frames {
            width: width as u32,
            height: height as u32,
            count: count as u32,
            rgb,
        })
    }

    /// Hands consecutive pieces of the decoded video (clamped to [-1, 1]) to `sink`.
    fn decode_pieces(
        &self,
        latents: &Tensor,
        tiling: Option<&Tiling>,
        sink: &mut dyn FnMut(Tensor) -> Result<(), VaeError>,
    ) -> Result<(), VaeError> {
        self.check_latents(latents)?;
        let _no_grad = tch::no_grad_guard();
        let z = latents.f_to_device(self.device)?;
        let (_, _, frames, height, width) = z.size5()?;
        let scale = self.config.scale_factor_spatial;
        if let Some(tiling) = tiling {
            tiling.check(scale)?;
            if width > tiling.min_width / scale || height > tiling.min_height / scale {
                let mut video = self.decode_tiled(&z, tiling)?;
                let _ = video.f_clamp_(-1.0, 1.0)?;
                return sink(video);
            }
        }
        let x = self.post_quant_conv.forward(&z, None)?;
        let mut cache = FeatCache::default();
        for i in 0..frames {
            cache.rewind();
            let piece = self.decoder.forward(&x.f_narrow(2, i, 1)?, &mut cache)?;
            sink(piece.f_clamp(-1.0, 1.0)?)?;
        }
        Ok(())
    }

    fn decode_tiled(&self, z: &Tensor, tiling: &Tiling) -> Result<Tensor, TchError> {
        let (_, _, frames, height, width) = z.size5()?;
        let scale = self.config.scale_factor_spatial;
        let (tile_h, tile_w) = (tiling.min_height / scale, tiling.min_width / scale);
        let (stride_h, stride_w) = (tiling.stride_height / scale, tiling.stride_width / scale);
        let mut joiner = TileJoiner::new(
            [
                tiling.min_height - tiling.stride_height,
                tiling.min_width - tiling.stride_width,
            ],
            [tiling.stride_height, tiling.stride_width],
            [height * scale, width * scale],
        );
        for (row, i) in (0..height).step_by(stride_h as usize).enumerate() {
            for (column, j) in (0..width).step_by(stride_w as usize).enumerate() {
                let mut cache = FeatCache::default();
                let mut pieces = Vec::new();
                for k in 0..frames {
                    cache.rewind();
                    let tile = z
                        .f_narrow(2, k, 1)?
                        .f_narrow(3, i, tile_h.min(height - i))?
                        .f_narrow(4, j, tile_w.min(width - j))?;
                    let tile = self.post_quant_conv.forward(&tile, None)?;
                    pieces.push(self.decoder.forward(&tile, &mut cache)?);
                }
                let tile = Tensor::f_cat(&pieces, 2)?;
                drop(pieces);
                joiner.push(row, column, tile)?;
            }
        }
        joiner.finish()
    }

    /// Encodes a video `[B, 3, T, H, W]` in [-1, 1] into unnormalized latents `[B, z_dim,
    /// 1+(T-1)/4, H/8, W/8]`: the mean of the latent distribution, as diffusers'
    /// `encode(...).latent_dist.mode()`. Frames past the last whole group of 4 are dropped,
    /// as diffusers drops them.
    pub fn encode(&self, video: &Tensor, tiling: Option<&Tiling>) -> Result<Tensor, VaeError> {
        let size = video.size();
        if size.len() != 5 || size[1] != self.config.in_channels || size[2] < 1 {
            return Err(VaeError::Input(format!(
                "video of shape {size:?}; expected [batch, {}, frames, height, width]",
                self.config.in_channels
            )));
        }
        if let Some(tiling) = tiling {
            tiling.check(self.config.scale_factor_spatial)?;
        }
        let _no_grad = tch::no_grad_guard();
        let x = video.f_to_device(self.device)?;
        let (_, _, _, height, width) = x.size5()?;
        let moments = match tiling {
            Some(tiling) if width > tiling.min_width || height > tiling.min_height => {
                self.encode_tiled(&x, tiling)?
            }
            _ => {
                let mut cache = FeatCache::default();
                let mut pieces = Vec::new();
                for chunk in encoder_chunks(&x)? {
                    cache.rewind();
                    pieces.push(self.encoder.forward(&chunk, &mut cache)?);
                }
                self.quant_conv.forward(&Tensor::f_cat(&pieces, 2)?, None)?
            }
        };
        Ok(moments.f_narrow(1, 0, self.config.z_dim)?)
    }

    fn encode_tiled(&self, x: &Tensor, tiling: &Tiling) -> Result<Tensor, TchError> {
        let (_, _, _, height, width) = x.size5()?;
        let scale = self.config.scale_factor_spatial;
        let (tile_h, tile_w) = (tiling.min_height / scale, tiling.min_width / scale);
        let (stride_h, stride_w) = (tiling.stride_height / scale, tiling.stride_width / scale);
        let mut joiner = TileJoiner::new(
            [tile_h - stride_h, tile_w - stride_w],
            [stride_h, stride_w],
            [height / scale, width / scale],
        );
        for (row, i) in (0..height)
            .step_by(tiling.stride_height as usize)
            .enumerate()
        {
            for (column, j) in (0..width).step_by(tiling.stride_width as usize).enumerate() {
                let region = x
                    .f_narrow(3, i, tiling.min_height.min(height - i))?
                    .f_narrow(4, j, tiling.min_width.min(width - j))?;
                let mut cache = FeatCache::default();
                let mut pieces = Vec::new();
                for chunk in encoder_chunks(&region)? {
                    cache.rewind();
                    let moments = self.encoder.forward(&chunk, &mut cache)?;
                    pieces.push(self.quant_conv.forward(&moments, None)?);
                }
                let tile = Tensor::f_cat(&pieces, 2)?;
                drop(pieces);
                joiner.push(row, column, tile)?;
            }
        }
        joiner.finish()
    }
}

/// The encoder's chunks of a video: its first frame, then each whole group of 4 frames.
fn encoder_chunks(x: &Tensor) -> Result<Vec<Tensor>, TchError> {
    let frames = x.size()[2];
    let mut chunks = vec![x.f_narrow(2, 0, 1)?];
    for i in 0..(frames - 1) / 4 {
        chunks.push(x.f_narrow(2, 1 + 4 * i, 4)?);
    }
    Ok(chunks)
}

/// Joins tiles `[B, C, T, h, w]`, handed over row by row, into one video `size` large, as
/// diffusers joins them: each tile is blended into the one above and the one to its left over
/// `blend` lines, then cut to `stride` and put in its place. Blending writes into the tiles, so
/// a tile's neighbours below and to the right see it blended, as diffusers' in-place blending
/// does. Of each tile only the lines a later tile blends from are kept, and the video is
/// written in place: joining holds the video once, one tile, and the edges.
struct TileJoiner {
    blend: [i64; 2],
    stride: [i64; 2],
    size: [i64; 2],
    video: Option<Tensor>,
    /// The last `blend` rows of each tile of the row above, by column.
    above: Vec<Tensor>,
    /// The same of this row's tiles so far.
    below: Vec<Tensor>,
    /// The last `blend` columns of the tile to the left.
    left: Option<Tensor>,
}

impl TileJoiner {
    fn new(blend: [i64; 2], stride: [i64; 2], size: [i64; 2]) -> TileJoiner {
        TileJoiner {
            blend,
            stride,
            size,
            video: None,
            above: Vec::new(),
            below: Vec::new(),
            left: None,
        }
    }

    /// Adds the tile at `row`, `column`; tiles come row by row, each row left to right.
    fn push(&mut self, row: usize, column: usize, mut tile: Tensor) -> Result<(), TchError> {
        if column == 0 {
            if row > 0 {
                self.above = std::mem::take(&mut self.below);
            }
            self.left = None;
        }
        if row > 0 {
            let above = self.above.get(column).ok_or_else(|| {
                TchError::Shape(format!("tile row {row} has more tiles than the one above"))
            })?;
            blend_edge(above, &mut tile, 3, self.blend[0])?;
        }
        if let Some(left) = &self.left {
            blend_edge(left, &mut tile, 4, self.blend[1])?;
        }
        let (b, c, t, h, w) = tile.size5()?;
        let [height, width] = self.size;
        let video = match &mut self.video {
            Some(video) => video,
            None => self.video.insert(Tensor::f_zeros(
                [b, c, t, height, width],
                (tile.kind(), tile.device()),
            )?),
        };
        let (top, left) = (row as i64 * self.stride[0], column as i64 * self.stride[1]);
        let rows = self.stride[0].min(h).min(height - top);
        let columns = self.stride[1].min(w).min(width - left);
        if rows > 0 && columns > 0 {
            video
                .f_narrow(3, top, rows)?
                .f_narrow(4, left, columns)?
                .f_copy_(&tile.f_narrow(3, 0, rows)?.f_narrow(4, 0, columns)?)?;
        }
        let edge = |dim: i64, len: i64, blend: i64| {
            let n = blend.min(len);
            tile.f_narrow(dim, len - n, n)?.f_contiguous()
        };
        self.below.push(edge(3, h, self.blend[0])?);
        self.left = Some(edge(4, w, self.blend[1])?);
        Ok(())
    }

    fn finish(self) -> Result<Tensor, TchError> {
        self.video
            .ok_or_else(|| TchError::Shape("a tiled video pass made no tile".into()))
    }
}

/// Fades the first `extent` rows (`dim` 3) or columns (`dim` 4) of `tile` in from the last
/// ones of `before`, one line at a time with diffusers' weights.
fn blend_edge(before: &Tensor, tile: &mut Tensor, dim: i64, extent: i64) -> Result<(), TchError> {
    let (len_a, len_b) = (before.size()[dim as usize], tile.size()[dim as usize]);
    let extent = extent.min(len_a).min(len_b);
    for y in 0..extent {
        let weight = y as f64 / extent as f64;
        let from = before.f_select(dim, len_a - extent + y)?;
        let mut line = tile.f_select(dim, y)?;
        let blended = from
            .f_mul_scalar(1.0 - weight)?
            .f_add(&line.f_mul_scalar(weight)?)?;
        line.f_copy_(&blended)?;
    }
    Ok(())
}

/// Appends a video piece `[1, 3, t, H, W]` in [-1, 1] as `t` RGB8 frames, a few frames at a
/// time and each step in place, so that converting a whole tiled video takes little beside it.
fn append_rgb8(piece: &Tensor, rgb: &mut Vec<u8>) -> Result<(), TchError> {
    const FRAMES_AT_ONCE: i64 = 4;
    let frames = piece.size()[2];
    for start in (0..frames).step_by(FRAMES_AT_ONCE as usize) {
        let chunk = piece.f_narrow(2, start, FRAMES_AT_ONCE.min(frames - start))?;
        let mut unit = chunk.f_mul_scalar(0.5)?;
        let _ = unit.f_add_scalar_(0.5)?;
        let _ = unit.f_clamp_(0.0, 1.0)?;
        let mut scaled = unit.f_to_kind(Kind::Float)?;
        drop(unit);
        let _ = scaled.f_mul_scalar_(255.0)?;
        let _ = scaled.f_round_()?;
        let bytes = scaled
            .f_to_kind(Kind::Uint8)?
            .f_squeeze_dim(0)?
            .f_permute([1, 2, 3, 0])?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        drop(scaled);
        let at = rgb.len();
        let numel = bytes.numel();
        rgb.resize(at + numel, 0);
        bytes.f_copy_data_u8(&mut rgb[at..], numel)?;
    }
    Ok(())
}

/// What one cached layer kept of the previous chunk.
enum Slot {
    /// The first chunk has not reached this layer yet.
    Empty,
    /// A temporal upsampler after the first chunk, which it passed through unchanged.
    AfterFirstChunk,
    /// The last frames the layer saw.
    Frames(Tensor),
}

/// The feature cache: one slot per cached layer, in the order a chunk reaches them.
#[derive(Default)]
struct FeatCache {
    slots: Vec<Slot>,
    next: usize,
}

impl FeatCache {
    /// Back to the first layer, before each chunk.
    fn rewind(&mut self) {
        self.next = 0;
    }

    fn slot(&mut self) -> &mut Slot {
        if self.next == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.next += 1;
        &mut self.slots[self.next - 1]
    }

    /// A causal convolution over `x` that continues from the frames the same layer kept of
    /// the previous chunk.
    fn conv(&mut self, conv: &CausalConv3d, x: &Tensor) -> Result<Tensor, TchError> {
        let slot = self.slot();
        let before = match slot {
            Slot::Frames(kept) => Some(&*kept),
            _ => None,
        };
        let kept = last_frames(x, before)?;
        let y = conv.forward(x, before)?;
        *slot = Slot::Frames(kept);
        Ok(y)
    }
}

/// The last `CACHE_T` frames of `x`; when `x` has fewer, preceded by the last frame of
/// `before` (what the next chunk's causal convolution needs).
fn last_frames(x: &Tensor, before: Option<&Tensor>) -> Result<Tensor, TchError> {
    let frames = x.size()[2];
    let n = frames.min(CACHE_T);
    let tail = x.f_narrow(2, frames - n, n)?.f_contiguous()?;
    match before {
        Some(before) if n < CACHE_T => {
            let last = before.f_narrow(2, before.size()[2] - 1, 1)?;
            Tensor::f_cat(&[&last, &tail], 2)
        }
        _ => Ok(tail),
    }
}

/// Kernel, stride and padding (time, height, width) of a 3D convolution.
#[derive(Clone, Copy)]
struct Conv3dShape {
    kernel: [i64; 3],
    stride: [i64; 3],
    padding: [i64; 3],
}

const CUBIC: Conv3dShape = Conv3dShape {
    kernel: [3, 3, 3],
    stride: [1, 1, 1],
    padding: [1, 1, 1],
};

const POINTWISE: Conv3dShape = Conv3dShape {
    kernel: [1, 1, 1],
    stride: [1, 1, 1],
    padding: [0, 0, 0],
};

/// A 3D convolution padded only towards the past in time, so frame `t` sees no later frame.
struct CausalConv3d {
    weight: Tensor,
    bias: Tensor,
    stride: [i64; 3],
    /// `constant_pad_nd` order: width, height, then time (all of it before the first frame).
    padding: [i64; 6],
}

impl CausalConv3d {
    fn load(
        w: &mut Weights,
        name: &str,
        in_dim: i64,
        out_dim: i64,
        shape: Conv3dShape,
    ) -> Result<CausalConv3d, WeightError> {
        let [kt, kh, kw] = shape.kernel;
        let [pt, ph, pw] = shape.padding;
        Ok(CausalConv3d {
            weight: w.take(&format!("{name}.weight"), &[out_dim, in_dim, kt, kh, kw])?,
            bias: w.take(&format!("{name}.bias"), &[out_dim])?,
            stride: shape.stride,
            padding: [pw, pw, ph, ph, 2 * pt, 0],
        })
    }

    /// `before`: frames that precede `x`; they stand in for as much of the zero padding.
    fn forward(&self, x: &Tensor, before: Option<&Tensor>) -> Result<Tensor, TchError> {
        let mut padding = self.padding;
        let joined;
        let x = match before {
            Some(before) if padding[4] > 0 => {
                padding[4] -= before.size()[2];
                joined = Tensor::f_cat(&[before, x], 2)?;
                &joined
            }
            _ => x,
        };
        x.f_constant_pad_nd(padding)?.f_conv3d(
            &self.weight,
            Some(&self.bias),
            self.stride,
            [0, 0, 0],
            [1, 1, 1],
            1,
        )
    }
}

struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    fn load(
        w: &mut Weights,
        name: &str,
        in_dim: i64,
        out_dim: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Result<Conv2d, WeightError> {
        Ok(Conv2d {
            weight: w.take(
                &format!("{name}.weight"),
                &[out_dim, in_dim, kernel, kernel],
            )?,
            bias: w.take(&format!("{name}.bias"), &[out_dim])?,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// Scales each position's channel vector to unit L2 norm, then by `sqrt(dim) * gamma`.
struct RmsNorm {
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    /// `spatial_dims`: 2 for images `[N, C, H, W]`, 3 for videos `[B, C, T, H, W]`.
    fn load(
        w: &mut Weights,
        name: &str,
        dim: i64,
        spatial_dims: usize,
    ) -> Result<RmsNorm, WeightError> {
        let mut shape = vec![dim];
        shape.resize(spatial_dims + 1, 1);
        Ok(RmsNorm {
            gamma: w.take(&format!("{name}.gamma"), &shape)?,
            scale: (dim as f64).powf(0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let norm = x
            .f_norm_scalaropt_dim(2.0, [1], true)?
            .f_clamp_min(1e-12)?
            .f_expand_as(x)?;
        x.f_div(&norm)?.f_mul_scalar(self.scale)?.f_mul(&self.gamma)
    }
}

struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    /// A pointwise projection when the block changes the channel count.
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    fn load(
        w: &mut Weights,
        name: &str,
        in_dim: i64,
        out_dim: i64,
    ) -> Result<ResidualBlock, WeightError> {
        Ok(ResidualBlock {
            norm1: RmsNorm::load(w, &format!("{name}.norm1"), in_dim, 3)?,
            conv1: CausalConv3d::load(w, &format!("{name}.conv1"), in_dim, out_dim, CUBIC)?,
            norm2: RmsNorm::load(w, &format!("{name}.norm2"), out_dim, 3)?,
            conv2: CausalConv3d::load(w, &format!("{name}.conv2"), out_dim, out_dim, CUBIC)?,
            shortcut: if in_dim == out_dim {
                None
            } else {
                let name = format!("{name}.conv_shortcut");
                Some(CausalConv3d::load(w, &name, in_dim, out_dim, POINTWISE)?)
            },
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor, TchError> {
        let residual = match &self.shortcut {
            Some(conv) => conv.forward(x, None)?,
            None => x.shallow_clone(),
        };
        let y = self.norm1.forward(x)?.f_silu()?;
        let y = cache.conv(&self.conv1, &y)?;
        let y = self.norm2.forward(&y)?.f_silu()?;
        cache.conv(&self.conv2, &y)?.f_add(&residual)
    }
}

/// Single-head self-attention over the positions of each frame.
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    fn load(w: &mut Weights, name: &str, dim: i64) -> Result<AttentionBlock, WeightError> {
        Ok(AttentionBlock {
            norm: RmsNorm::load(w, &format!("{name}.norm"), dim, 2)?,
            to_qkv: Conv2d::load(w, &format!("{name}.to_qkv"), dim, dim * 3, 1, 1, 0)?,
            proj: Conv2d::load(w, &format!("{name}.proj"), dim, dim, 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let (b, c, t, h, w) = x.size5()?;
        let y = x.f_permute([0, 2, 1, 3, 4])?.f_reshape([b * t, c, h, w])?;
        let y = self.norm.forward(&y)?;
        let qkv = self
            .to_qkv
            .forward(&y)?
            .f_reshape([b * t, 1, c * 3, -1])?
            .f_permute([0, 1, 3, 2])?
            .f_contiguous()?
            .f_chunk(3, -1)?;
        let y = Tensor::f_scaled_dot_product_attention(
            &qkv[0],
            &qkv[1],
            &qkv[2],
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )?;
        let y = y
            .f_squeeze_dim(1)?
            .f_permute([0, 2, 1])?
            .f_reshape([b * t, c, h, w])?;
        self.proj
            .forward(&y)?
            .f_view([b, t, c, h, w])?
            .f_permute([0, 2, 1, 3, 4])?
            .f_add(x)
    }
}

/// Residual block, attention, residual block.
struct MidBlock {
    first: ResidualBlock,
    attention: AttentionBlock,
    second: ResidualBlock,
}

impl MidBlock {
    fn load(w: &mut Weights, name: &str, dim: i64) -> Result<MidBlock, WeightError> {
        Ok(MidBlock {
            first: ResidualBlock::load(w, &format!("{name}.resnets.0"), dim, dim)?,
            attention: AttentionBlock::load(w, &format!("{name}.attentions.0"), dim)?,
            second: ResidualBlock::load(w, &format!("{name}.resnets.1"), dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor, TchError> {
        let x = self.first.forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.second.forward(&x, cache)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ResampleMode {
    /// Twice the height and width, half the channels.
    Up2d,
    /// Also twice the frames (after the first chunk).
    Up3d,
    /// Half the height and width.
    Down2d,
    /// Also half the frames (after the first chunk).
    Down3d,
}

struct Resample {
    mode: ResampleMode,
    conv: Conv2d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    fn load(
        w: &mut Weights,
        name: &str,
        dim: i64,
        mode: ResampleMode,
    ) -> Result<Resample, WeightError> {
        let conv_name = format!("{name}.resample.1");
        let time_name = format!("{name}.time_conv");
        let time = |kernel_t, stride_t, padding_t| Conv3dShape {
            kernel: [kernel_t, 1, 1],
            stride: [stride_t, 1, 1],
            padding: [padding_t, 0, 0],
        };
        let (conv, time_conv) = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => (
                Conv2d::load(w, &conv_name, dim, dim / 2, 3, 1, 1)?,
                (mode == ResampleMode::Up3d)
                    .then(|| CausalConv3d::load(w, &time_name, dim, dim * 2, time(3, 1, 1)))
                    .transpose()?,
            ),
            ResampleMode::Down2d | ResampleMode::Down3d => (
                Conv2d::load(w, &conv_name, dim, dim, 3, 2, 0)?,
                (mode == ResampleMode::Down3d)
                    .then(|| CausalConv3d::load(w, &time_name, dim, dim, time(3, 2, 0)))
                    .transpose()?,
            ),
        };
        Ok(Resample {
            mode,
            conv,
            time_conv,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor, TchError> {
        let x = match (&self.time_conv, self.mode) {
            (Some(time_conv), ResampleMode::Up3d) => upsample_time(time_conv, x, cache)?,
            _ => x.shallow_clone(),
        };
        let (b, c, t, h, w) = x.size5()?;
        let y = x.f_permute([0, 2, 1, 3, 4])?.f_reshape([b * t, c, h, w])?;
        let y = match self.mode {
            // Nearest-neighbour upsampling in float32 whatever the weights' dtype, as diffusers.
            ResampleMode::Up2d | ResampleMode::Up3d => y
                .f_to_kind(Kind::Float)?
                .f_internal_upsample_nearest_exact2d([h * 2, w * 2], 2.0, 2.0)?
                .f_to_kind(y.kind())?,
            ResampleMode::Down2d | ResampleMode::Down3d => y.f_constant_pad_nd([0, 1, 0, 1])?,
        };
        let y = self.conv.forward(&y)?;
        let (_, c, h, w) = y.size4()?;
        let y = y.f_view([b, t, c, h, w])?.f_permute([0, 2, 1, 3, 4])?;
        match (&self.time_conv, self.mode) {
            (Some(time_conv), ResampleMode::Down3d) => downsample_time(time_conv, &y, cache),
            _ => Ok(y),
        }
    }
}

/// Doubles the frames of every chunk but the first: a causal convolution makes two frames
/// per frame (as two halves of its channels), interleaved in time.
fn upsample_time(
    time_conv: &CausalConv3d,
    x: &Tensor,
    cache: &mut FeatCache,
) -> Result<Tensor, TchError> {
    let slot = cache.slot();
    let before = match slot {
        Slot::Empty => {
            *slot = Slot::AfterFirstChunk;
            return Ok(x.shallow_clone());
        }
        Slot::AfterFirstChunk => None,
        Slot::Frames(kept) => Some(&*kept),
    };
    let (b, c, t, h, w) = x.size5()?;
    let mut kept = last_frames(x, before)?;
    if before.is_none() && kept.size()[2] < CACHE_T {
        // The first chunk passed through without this convolution: zeros stand for its frames.
        kept = Tensor::f_cat(&[&kept.f_zeros_like()?, &kept], 2)?;
    }
    let y = time_conv.forward(x, before)?;
    *slot = Slot::Frames(kept);
    let y = y.f_reshape([b, 2, c, t, h, w])?;
    Tensor::f_stack(&[y.f_select(1, 0)?, y.f_select(1, 1)?], 3)?.f_reshape([b, c, t * 2, h, w])
}

/// Halves the frames of every chunk but the first with a strided causal convolution whose
/// window starts at the previous chunk's last frame.
fn downsample_time(
    time_conv: &CausalConv3d,
    x: &Tensor,
    cache: &mut FeatCache,
) -> Result<Tensor, TchError> {
    let slot = cache.slot();
    let Slot::Frames(before) = slot else {
        *slot = Slot::Frames(x.f_contiguous()?);
        return Ok(x.shallow_clone());
    };
    let t = x.size()[2];
    let last = before.f_narrow(2, before.size()[2] - 1, 1)?;
    let y = time_conv.forward(&Tensor::f_cat(&[&last, x], 2)?, None)?;
    *slot = Slot::Frames(x.f_narrow(2, t - 1, 1)?.f_contiguous()?);
    Ok(y)
}

enum DownLayer {
    Residual(ResidualBlock),
    Resample(Resample),
}

struct Encoder {
    conv_in: CausalConv3d,
    layers: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn load(w: &mut Weights, config: &VaeConfig) -> Result<Encoder, WeightError> {
        let dims: Vec<i64> = std::iter::once(1)
            .chain(config.dim_mult.iter().copied())
            .map(|m| config.base_dim * m)
            .collect();
        let conv_in = CausalConv3d::load(w, "encoder.conv_in", config.in_channels, dims[0], CUBIC)?;
        let mut layers = Vec::new();
        let last = config.dim_mult.len() - 1;
        for (i, pair) in dims.windows(2).enumerate() {
            let (mut in_dim, out_dim) = (pair[0], pair[1]);
            for _ in 0..config.num_res_blocks {
                let name = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Residual(ResidualBlock::load(
                    w, &name, in_dim, out_dim,
                )?));
                in_dim = out_dim;
            }
            if i != last {
                let mode = if config.temperal_downsample[i] {
                    ResampleMode::Down3d
                } else {
                    ResampleMode::Down2d
                };
                let name = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Resample(Resample::load(
                    w, &name, out_dim, mode,
                )?));
            }
        }
        let dim = dims[dims.len() - 1];
        Ok(Encoder {
            conv_in,
            layers,
            mid: MidBlock::load(w, "encoder.mid_block", dim)?,
            norm_out: RmsNorm::load(w, "encoder.norm_out", dim, 3)?,
            conv_out: CausalConv3d::load(w, "encoder.conv_out", dim, config.z_dim * 2, CUBIC)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor, TchError> {
        let mut x = cache.conv(&self.conv_in, x)?;
        for layer in &self.layers {
            x = match layer {
                DownLayer::Residual(block) => block.forward(&x, cache)?,
                DownLayer::Resample(resample) => resample.forward(&x, cache)?,
            };
        }
        let x = self.mid.forward(&x, cache)?;
        let x = self.norm_out.forward(&x)?.f_silu()?;
        cache.conv(&self.conv_out, &x)
    }
}

struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn load(w: &mut Weights, config: &VaeConfig) -> Result<Decoder, WeightError> {
        let base = config.decoder_base_dim.unwrap_or(config.base_dim);
        let deepest = config.dim_mult[config.dim_mult.len() - 1];
        let dims: Vec<i64> = std::iter::once(deepest)
            .chain(config.dim_mult.iter().rev().copied())
            .map(|m| base * m)
            .collect();
        let conv_in = CausalConv3d::load(w, "decoder.conv_in", config.z_dim, dims[0], CUBIC)?;
        let mid = MidBlock::load(w, "decoder.mid_block", dims[0])?;
        let last = config.dim_mult.len() - 1;
        let mut up_blocks = Vec::new();
        for (i, pair) in dims.windows(2).enumerate() {
            // Every upsampler halves the channels, so the blocks after the first get half
            // of the previous block's width.
            let (mut in_dim, out_dim) = (if i > 0 { pair[0] / 2 } else { pair[0] }, pair[1]);
            let mut resnets = Vec::new();
            for j in 0..=config.num_res_blocks {
                let name = format!("decoder.up_blocks.{i}.resnets.{j}");
                resnets.push(ResidualBlock::load(w, &name, in_dim, out_dim)?);
                in_dim = out_dim;
            }
            let upsampler = if i == last {
                None
            } else {
                let mode = if config.temperal_downsample[last - 1 - i] {
                    ResampleMode::Up3d
                } else {
                    ResampleMode::Up2d
                };
                let name = format!("decoder.up_blocks.{i}.upsamplers.0");
                Some(Resample::load(w, &name, out_dim, mode)?)
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let dim = dims[dims.len() - 1];
        Ok(Decoder {
            conv_in,
            mid,
            up_blocks,
            norm_out: RmsNorm::load(w, "decoder.norm_out", dim, 3)?,
            conv_out: CausalConv3d::load(w, "decoder.conv_out", dim, config.out_channels, CUBIC)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor, TchError> {
        let x = cache.conv(&self.conv_in, x)?;
        let mut x = self.mid.forward(&x, cache)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, cache)?;
            }
            if let Some(upsampler) = &block.upsampler {
                x = upsampler.forward(&x, cache)?;
            }
        }
        let x = self.norm_out.forward(&x)?.f_silu()?;
        cache.conv(&self.conv_out, &x)
    }
}
