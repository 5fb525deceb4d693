//! Does a job fit a runner's GPU? The peak device memory of each stage of a Wan job (text
//! encoding, image encoding for image-to-video, denoising, VAE decoding), estimated from the
//! model's shapes, the job's size and the lane's memory mode; the largest size that fits a
//! budget; and the `framelane.dev/memory` annotation a runner reports them in.
//!
//! The activation terms follow the runner's code (gpu-runner/src/wan/): which tensors are
//! alive together at each stage's worst moment. Each is a count of tensors of one shape, so
//! an estimate is a handful of multiplications: O(1) per stage. `docs/fit-check.md` derives
//! the counts and gives the measured error (gpu-runner/tests/fit_estimate.rs).

use std::collections::BTreeMap;

use framelane_api::{
    GenerationMode, VideoJobSpec, VideoModel,
    modellane::{MemoryMode, VaeTiling},
};
use serde::{Deserialize, Serialize};

use crate::parameters::{Cause, CauseReason};

/// The version of the annotation's JSON; a runner writes it, the operator reads only this.
pub const ANNOTATION_VERSION: u32 = 2;

const GIB: f64 = (1u64 << 30) as f64;

/// `bytes` for a message: in GiB with one decimal from 1 GiB, else in whole MiB (a CPU lane's
/// or a test's budget would read 0.0 GiB).
fn readable(bytes: u64) -> String {
    if bytes as f64 >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{} MiB", (bytes as f64 / (1 << 20) as f64).round())
    }
}

/// What a runner reports in its heartbeat Lease's `framelane.dev/memory` annotation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunnerMemory {
    /// [`ANNOTATION_VERSION`].
    pub v: u32,
    /// The device's total memory, in bytes.
    pub device_bytes: u64,
    /// What jobs may use of it: [`usable_bytes`] of the total.
    pub budget_bytes: u64,
    /// The memory mode the runner runs in (never `auto`: resolved at start).
    pub mode: MemoryMode,
    /// Whether the VAE decodes and encodes in tiles: `on`, `off`, or `auto`: a job's passes
    /// tile exactly when its untiled estimate does not fit the budget ([`RunnerMemory::tiles`]).
    pub vae_tiling: VaeTiling,
    /// The shape of each model the runner serves, by VideoModel name.
    pub models: BTreeMap<String, ModelProfile>,
}

impl RunnerMemory {
    /// The annotation value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }

    /// Reads an annotation value; an error says what is wrong with it.
    pub fn from_annotation(value: &str) -> Result<RunnerMemory, String> {
        let memory: RunnerMemory = serde_json::from_str(value).map_err(|e| e.to_string())?;
        if memory.v != ANNOTATION_VERSION {
            return Err(format!(
                "version {} (this operator reads version {ANNOTATION_VERSION})",
                memory.v
            ));
        }
        if memory.mode == MemoryMode::Auto {
            return Err("mode auto: a runner reports the mode it resolved".into());
        }
        Ok(memory)
    }

    /// Whether this runner's VAE tiles `job` of `model`: by its setting, or under `auto` when
    /// the job's untiled estimate does not fit the budget. The fit check estimates the job
    /// with it, and the runner runs the job with it.
    pub fn tiles(&self, model: &str, job: &JobSize) -> bool {
        match self.vae_tiling {
            VaeTiling::On => true,
            VaeTiling::Off => false,
            VaeTiling::Auto => self.models.get(model).is_some_and(|profile| {
                !profile.fits_in(job, self.mode, VaeTiling::Off, self.budget_bytes)
            }),
        }
    }
}

/// The device memory jobs may use: the total less 5 % and 512 MiB for the CUDA context, the
/// allocator's rounding and fragmentation.
pub fn usable_bytes(device_bytes: u64) -> u64 {
    (device_bytes - device_bytes / 20).saturating_sub(512 << 20)
}

/// A model's shapes, read from its config files: everything an estimate needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelProfile {
    /// Bytes of each transformer's weights on the device (two for a two-expert model), as
    /// the runner stores them (float8 linear weights under `transformerWeights: fp8`).
    pub transformer_bytes: Vec<u64>,
    /// Bytes a float8 weight's upcast holds while its layer runs, for the largest one (0
    /// unless the weights are stored in fp8).
    #[serde(default)]
    pub upcast_bytes: u64,
    pub text_encoder_bytes: u64,
    pub vae_bytes: u64,
    /// Bytes per element the transformers and the text encoder compute in.
    pub dtype_bytes: u64,
    /// Bytes per element the VAE computes in.
    pub vae_dtype_bytes: u64,
    pub transformer: TransformerShape,
    pub text_encoder: TextEncoderShape,
    pub vae: VaeShape,
    /// Whether the device's 3-D convolutions may unfold their input into a scratch matrix,
    /// 27 times its size: libtorch on the CPU does for a small input (see
    /// [`UNFOLD_MAX_INPUT`]); cuDNN's implicit GEMM never does.
    #[serde(default)]
    pub conv_unfold: bool,
}

/// The denoiser's dimensions (the experts of a two-expert model share them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransformerShape {
    /// Hidden size: heads times head size.
    pub dim: u64,
    pub ffn_dim: u64,
    pub heads: u64,
    pub layers: u64,
    pub in_channels: u64,
    pub out_channels: u64,
    /// Frames, height, width of a patch.
    pub patch: [u64; 3],
    pub text_dim: u64,
}

/// The umT5 text encoder's dimensions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TextEncoderShape {
    pub d_model: u64,
    pub d_ff: u64,
    pub heads: u64,
    /// Tokens every prompt is padded to.
    pub text_length: u64,
}

/// The Wan VAE's dimensions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaeShape {
    /// The decoder's base width (channels at full resolution).
    pub base_dim: u64,
    pub z_dim: u64,
    /// Channel multipliers per stage, from full resolution down.
    pub dim_mult: Vec<u64>,
    pub res_blocks: u64,
    pub temporal_compression: u64,
    pub spatial_compression: u64,
}

/// A job's size and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobSize {
    pub width: u64,
    pub height: u64,
    pub frames: u64,
    /// cfg > 1: an unconditional pass per step, and a second prompt to encode.
    pub guided: bool,
    pub mode: GenerationMode,
}

impl JobSize {
    /// The size `spec` asks of `model`, the model's defaults and fixed cfg filling what it
    /// leaves out (as the runner runs it).
    pub fn of(spec: &VideoJobSpec, model: &VideoModel) -> JobSize {
        let defaults = &model.spec.defaults;
        let cfg = spec
            .cfg
            .or(model.spec.fixed_parameters.cfg)
            .unwrap_or(crate::defaults::DEFAULT_CFG);
        let positive = |v: i32| u64::try_from(v).unwrap_or(0);
        JobSize {
            width: positive(spec.width.unwrap_or(defaults.width)),
            height: positive(spec.height.unwrap_or(defaults.height)),
            frames: positive(spec.frames.unwrap_or(defaults.frames)),
            guided: cfg > 1.0,
            mode: spec.mode,
        }
    }
}

/// A stage of a job, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    TextEncoding,
    ImageEncoding,
    Denoising,
    Decoding,
}

impl Stage {
    /// The verb the refusal message uses.
    pub fn verb(self) -> &'static str {
        match self {
            Stage::TextEncoding => "encode the prompt for",
            Stage::ImageEncoding => "encode the start image for",
            Stage::Denoising => "denoise",
            Stage::Decoding => "decode",
        }
    }
}

/// Peak device bytes per stage, and what stays on the device between jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Each stage the job runs, with its peak.
    pub stages: Vec<(Stage, u64)>,
    pub resident_bytes: u64,
}

impl Estimate {
    /// The peak of `stage`, or 0 when the job does not run it.
    pub fn stage(&self, stage: Stage) -> u64 {
        self.stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(0, |&(_, bytes)| bytes)
    }

    /// The largest stage peak and its stage.
    pub fn peak(&self) -> (Stage, u64) {
        self.stages
            .iter()
            .copied()
            .max_by_key(|&(_, bytes)| bytes)
            .expect("every job has stages")
    }
}

/// Tiles the VAE decodes and encodes in when tiling is on: diffusers' `enable_tiling`
/// defaults (256-pixel tiles every 192 pixels).
const TILE: u64 = 256;
/// The lines two neighbouring tiles share and blend over (diffusers' 256 - 192).
const TILE_BLEND: u64 = 64;
/// Frames of the previous chunk each cached causal convolution keeps (the VAE's `CACHE_T`).
const CACHE_T: u64 = 2;
/// libtorch on the CPU runs a float32 3x3x3 convolution of batch 1 through oneDNN (one copy
/// of its input in oneDNN's layout) once the input's batch x channels x frames x height
/// exceeds this; up to it, through its native kernel, which unfolds the input 27 times
/// (`use_mkldnn` in ATen's Convolution.cpp).
const UNFOLD_MAX_INPUT: u64 = 20480;
/// Positions of the transformer's rotary tables (Wan's `rope_max_seq_len`).
const ROPE_LENGTH: u64 = 1024;

impl ModelProfile {
    /// Each transformer's weights with its rotary tables (float32 cosines and sines of
    /// [`ROPE_LENGTH`] positions over the head size).
    fn experts(&self) -> impl Iterator<Item = u64> + '_ {
        let head = self.transformer.dim / self.transformer.heads.max(1);
        self.transformer_bytes
            .iter()
            .map(move |bytes| bytes + ROPE_LENGTH * head * 4)
    }

    fn largest_expert(&self) -> u64 {
        self.experts().max().unwrap_or(0)
    }

    /// What `auto` weighs for this model ([`auto_mode`]).
    pub fn mode_weights(&self) -> ModeWeights {
        ModeWeights {
            resident: self.resident(MemoryMode::Resident),
            expert_swap: self
                .swaps(MemoryMode::ExpertSwap)
                .then(|| self.weights_during(Stage::Denoising, MemoryMode::ExpertSwap)),
        }
    }

    /// Wan 2.2 A14B image-to-video in bfloat16 (two 14B experts, umT5-XXL, the Wan 2.1 VAE in
    /// float32) as a runner on a GPU reports it: the model behind the figures in
    /// docs/fit-check.md, and a reference for tests and benchmarks.
    pub fn wan22_a14b_i2v() -> ModelProfile {
        ModelProfile {
            transformer_bytes: vec![28_600_000_000, 28_600_000_000],
            upcast_bytes: 0,
            text_encoder_bytes: 11_400_000_000,
            vae_bytes: 254_000_000,
            dtype_bytes: 2,
            vae_dtype_bytes: 4,
            transformer: TransformerShape {
                dim: 5120,
                ffn_dim: 13824,
                heads: 40,
                layers: 40,
                in_channels: 36,
                out_channels: 16,
                patch: [1, 2, 2],
                text_dim: 4096,
            },
            text_encoder: TextEncoderShape {
                d_model: 4096,
                d_ff: 10240,
                heads: 64,
                text_length: 512,
            },
            vae: VaeShape {
                base_dim: 96,
                z_dim: 16,
                dim_mult: vec![1, 2, 4, 4],
                res_blocks: 2,
                temporal_compression: 4,
                spatial_compression: 8,
            },
            conv_unfold: false,
        }
    }

    /// Whether expert-swap has experts to swap (with one transformer it is resident).
    fn swaps(&self, mode: MemoryMode) -> bool {
        mode == MemoryMode::ExpertSwap && self.transformer_bytes.len() > 1
    }

    /// Bytes on the device while no job runs. Expert-swap keeps the text encoder and the VAE;
    /// its experts wait in host memory.
    fn resident(&self, mode: MemoryMode) -> u64 {
        match mode {
            MemoryMode::ExpertSwap if self.swaps(mode) => self.text_encoder_bytes + self.vae_bytes,
            MemoryMode::Auto | MemoryMode::Resident | MemoryMode::ExpertSwap => {
                self.text_encoder_bytes + self.experts().sum::<u64>() + self.vae_bytes
            }
            MemoryMode::ModelOffload => 0,
        }
    }

    /// Weights on the device while `stage` runs: with expert-swap, one expert at a time joins
    /// the text encoder and the VAE while denoising.
    fn weights_during(&self, stage: Stage, mode: MemoryMode) -> u64 {
        match (mode, stage) {
            (MemoryMode::ModelOffload, Stage::TextEncoding) => self.text_encoder_bytes,
            (MemoryMode::ModelOffload, Stage::ImageEncoding | Stage::Decoding) => self.vae_bytes,
            (MemoryMode::ModelOffload, Stage::Denoising) => self.largest_expert(),
            (_, Stage::Denoising) if self.swaps(mode) => {
                self.resident(mode) + self.largest_expert()
            }
            _ => self.resident(mode),
        }
    }

    /// Latent frames, height, width of a job.
    fn latent(&self, job: &JobSize) -> [u64; 3] {
        let (t, s) = (
            self.vae.temporal_compression.max(1),
            self.vae.spatial_compression.max(1),
        );
        [
            (job.frames.max(1) - 1) / t + 1,
            job.height / s,
            job.width / s,
        ]
    }

    /// umT5 over `text_length` tokens: the hidden state and its norm, the gated feed-forward's
    /// three `d_ff`-wide tensors, and for every head the additive position-bias mask (the
    /// model's dtype) and three float32 score-sized tensors (what scaled dot-product attention
    /// makes of them on the CPU, measured: 16 bytes a score in float32, 13 in bfloat16), for
    /// each prompt; the embeddings of both prompts stay.
    fn text_activations(&self, job: &JobSize) -> u64 {
        let t = &self.text_encoder;
        let e = self.dtype_bytes;
        let prompts = if job.guided { 2 } else { 1 };
        let one = t.text_length * (4 * t.d_model + 3 * t.d_ff) * e
            + t.heads * t.text_length * t.text_length * (e + 3 * 4);
        one + prompts * t.text_length * t.d_model * e
    }

    /// One transformer block's worst moment over `tokens`: in self-attention, the block's
    /// input and output, the modulated input, queries, keys and values with their rotated and
    /// contiguous copies, the attention output (8 token-by-dim tensors); in cross-attention,
    /// five of them (input, normed input, queries and their contiguous copy, output) and the
    /// text's keys and values with their contiguous copies (4 text-length-by-dim tensors); in
    /// the feed-forward, four with two `ffn_dim`-wide ones; plus the float32 layer norm of the
    /// modulation (three more, float32).
    fn block_activations(&self, tokens: u64) -> u64 {
        let s = &self.transformer;
        let e = self.dtype_bytes;
        let self_attention = tokens * 8 * s.dim * e;
        let cross_attention =
            tokens * 5 * s.dim * e + 4 * self.text_encoder.text_length * s.dim * e;
        let feed_forward = tokens * (4 * s.dim * e + 2 * s.ffn_dim * e);
        self_attention.max(cross_attention).max(feed_forward) + tokens * 3 * s.dim * 4
    }

    /// Denoising: what a step keeps (the latents, the solver's history of three velocities,
    /// the image condition, both prompts' projected context) plus one block at its worst,
    /// with a float8 weight's upcast beside it.
    fn denoise_activations(&self, job: &JobSize) -> u64 {
        let s = &self.transformer;
        let [f, h, w] = self.latent(job);
        let [pt, ph, pw] = s.patch.map(|p| p.max(1));
        let tokens = (f / pt) * (h / ph) * (w / pw);
        let latent_pixels = f * h * w;
        let condition = match job.mode {
            GenerationMode::I2v => s.in_channels.saturating_sub(s.out_channels),
            GenerationMode::T2v => 0,
        };
        let kept = latent_pixels * 4 * (5 * s.out_channels + 2 * condition);
        let prompts = if job.guided { 2 } else { 1 };
        let context =
            prompts * self.text_encoder.text_length * (s.dim + s.text_dim) * self.dtype_bytes;
        kept + context + self.block_activations(tokens) + self.upcast_bytes
    }

    /// The decoder's width and frames per chunk at each resolution, full resolution first
    /// (level `l` has 1/4^l of the frame's pixels). The temporal upsamplers are the deepest
    /// ones, as in every Wan VAE.
    fn vae_levels(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let v = &self.vae;
        let levels = v.dim_mult.len() as u64;
        let temporal = u64::from(v.temporal_compression.max(1).ilog2());
        (0..levels).map(move |level| {
            let frames = 1 << temporal.min(levels - 1 - level);
            (v.base_dim * v.dim_mult[level as usize], level, frames)
        })
    }

    /// VAE decoding of one chunk (the decoder runs one latent frame at a time): at each
    /// resolution the feature cache keeps `CACHE_T` frames for every cached convolution of
    /// its residual blocks (`res_blocks + 1` of them per resolution), and the widest
    /// resolution holds the working tensors of a residual block (input, norms, the padded,
    /// cache-joined convolution inputs and outputs: nine of its chunk's size), with the
    /// convolution's scratch where the device has one.
    fn decode_activations(&self, job: &JobSize, tiling: bool) -> u64 {
        let chunk = self.chunk_activations(job, tiling, 2 * (self.vae.res_blocks + 1) + 1);
        if !tiling {
            return chunk;
        }
        // Tiles decode one after another into the whole video: beside a tile's decoding, the
        // video, the tile's frames decoded so far (then their concatenation), and the lines of
        // the tiles above and to the left that it blends from.
        let e = self.vae_dtype_bytes;
        let (tile_w, tile_h) = (job.width.min(TILE), job.height.min(TILE));
        let frame = job.width * job.height + tile_w * tile_h + TILE_BLEND * (job.width + tile_h);
        chunk + 3 * job.frames * frame * e
    }

    /// A VAE pass over one chunk with `convs` cached convolutions per resolution; see
    /// [`ModelProfile::decode_activations`]. On the CPU, a 3x3x3 convolution of a small input
    /// unfolds it into a matrix 27 times its chunk, and a larger one goes through oneDNN,
    /// which copies it once into its own layout.
    fn chunk_activations(&self, job: &JobSize, tiling: bool, convs: u64) -> u64 {
        let e = self.vae_dtype_bytes;
        let (width, height) = if tiling {
            (job.width.min(TILE), job.height.min(TILE))
        } else {
            (job.width, job.height)
        };
        let pixels = width * height;
        let mut cache = 0;
        let mut working: u64 = 0;
        let mut scratch: u64 = 0;
        for (channels, level, frames) in self.vae_levels() {
            let level_pixels = pixels >> (2 * level);
            let chunk = channels * frames * level_pixels;
            cache += convs * channels * CACHE_T * level_pixels;
            working = working.max(9 * chunk);
            if self.conv_unfold {
                // The convolution's input: the chunk after the cached frames, padded by a pixel.
                let input = channels * (frames + CACHE_T) * ((height >> level) + 2);
                let copies = if input <= UNFOLD_MAX_INPUT { 27 } else { 1 };
                scratch = scratch.max(copies * chunk);
            }
        }
        (cache + working + scratch) * e
    }

    /// Image-to-video's VAE encoding of the start image followed by black frames: the whole
    /// pixel video twice (the black frames and their concatenation), then the encoder's
    /// chunk, which mirrors the decoder's with one residual block fewer per resolution.
    fn encode_activations(&self, job: &JobSize, tiling: bool) -> u64 {
        let video = 2 * 3 * job.frames * job.width * job.height * self.vae_dtype_bytes;
        video + self.chunk_activations(job, tiling, 2 * self.vae.res_blocks + 1)
    }

    /// Each stage's peak and the resident bytes of `job` in `mode` (auto counts as
    /// resident: the runner reports the mode it resolved).
    pub fn estimate(&self, job: &JobSize, mode: MemoryMode, tiling: bool) -> Estimate {
        let mut stages = vec![(
            Stage::TextEncoding,
            self.weights_during(Stage::TextEncoding, mode) + self.text_activations(job),
        )];
        if job.mode == GenerationMode::I2v {
            stages.push((
                Stage::ImageEncoding,
                self.weights_during(Stage::ImageEncoding, mode)
                    + self.encode_activations(job, tiling),
            ));
        }
        stages.push((
            Stage::Denoising,
            self.weights_during(Stage::Denoising, mode) + self.denoise_activations(job),
        ));
        stages.push((
            Stage::Decoding,
            self.weights_during(Stage::Decoding, mode) + self.decode_activations(job, tiling),
        ));
        Estimate {
            stages,
            resident_bytes: self.resident(mode),
        }
    }

    /// Whether `job`'s peak in `mode` fits `budget` with the VAE as `tiling` says: under
    /// `auto`, whole or else tiled, as a runner runs it ([`RunnerMemory::tiles`]).
    pub fn fits_in(&self, job: &JobSize, mode: MemoryMode, tiling: VaeTiling, budget: u64) -> bool {
        let fits = |tiled| self.estimate(job, mode, tiled).peak().1 <= budget;
        match tiling {
            VaeTiling::On => fits(true),
            VaeTiling::Off => fits(false),
            VaeTiling::Auto => fits(false) || fits(true),
        }
    }

    /// The most frames (of the form 4k+1, at most `job.frames`) that fit `budget` at the
    /// job's width and height ([`ModelProfile::fits_in`]); `None` if not even one frame does.
    pub fn most_frames(
        &self,
        job: &JobSize,
        mode: MemoryMode,
        tiling: VaeTiling,
        budget: u64,
    ) -> Option<u64> {
        let step = self.vae.temporal_compression.max(1);
        let fits = |frames| self.fits_in(&JobSize { frames, ..*job }, mode, tiling, budget);
        // Every stage grows with the frames, tiled or not: bisect over k in
        // frames = step * k + 1.
        let (mut lo, mut hi) = (0, (job.frames.max(1) - 1) / step);
        if !fits(1) {
            return None;
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(step * mid + 1) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(step * lo + 1)
    }

    /// The largest width x height (multiples of 16, at most the job's, in its aspect ratio
    /// as near as multiples of 16 allow) that fits `budget` at the job's frames
    /// ([`ModelProfile::fits_in`]); `None` if not even 16x16 does.
    pub fn largest_area(
        &self,
        job: &JobSize,
        mode: MemoryMode,
        tiling: VaeTiling,
        budget: u64,
    ) -> Option<(u64, u64)> {
        let scaled = |n: u64| {
            let w = (job.width * n / 64 / 16 * 16).max(16);
            let h = (job.height * n / 64 / 16 * 16).max(16);
            (w, h)
        };
        let fits = |(width, height)| {
            let size = JobSize {
                width,
                height,
                ..*job
            };
            self.fits_in(&size, mode, tiling, budget)
        };
        // Scale both sides by n/64: bisect over n.
        let (mut lo, mut hi) = (1u64, 64u64);
        if !fits(scaled(1)) {
            return None;
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(scaled(mid)) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(scaled(lo))
    }
}

/// Why a job does not fit a lane's runners.
#[derive(Clone, Debug, PartialEq)]
pub struct DoesNotFit {
    pub stage: Stage,
    pub needs: u64,
    pub budget: u64,
    pub mode: MemoryMode,
    /// Whether the estimate tiles the VAE; the message says so when the VAE's stage is the
    /// one that does not fit.
    pub tiled: bool,
    /// The most frames at the job's width and height that fit, if any (tiled or whole as the
    /// runner would run that size).
    pub frames: Option<u64>,
    /// The largest width x height at the job's frames that fits, if any (likewise).
    pub area: Option<(u64, u64)>,
}

impl DoesNotFit {
    /// The refusal, for the job `size` on lane `lane`: what it needs, the limit, and the
    /// largest sizes that fit.
    pub fn message(&self, size: &JobSize, lane: &str) -> String {
        let mut fits = Vec::new();
        if let Some(frames) = self.frames {
            fits.push(format!(
                "{}x{}x{frames} (spec.frames: {frames})",
                size.width, size.height
            ));
        }
        if let Some((w, h)) = self.area {
            fits.push(format!(
                "{w}x{h}x{} (spec.width: {w}, spec.height: {h})",
                size.frames
            ));
        }
        let fits = if fits.is_empty() {
            "no size of this model fits: use a lane with a larger GPU or another memory mode"
                .to_owned()
        } else {
            format!("the largest that fit: {}", fits.join(" or "))
        };
        format!(
            "needs {} to {} {}x{}x{} in memory mode {}{}; lane {lane}'s runners have {} usable; {fits}",
            readable(self.needs),
            self.stage.verb(),
            size.width,
            size.height,
            size.frames,
            self.mode.as_str(),
            // Only where the VAE is what runs out: tiles change nothing while denoising.
            if self.tiled && matches!(self.stage, Stage::ImageEncoding | Stage::Decoding) {
                " with the VAE tiled"
            } else {
                ""
            },
            readable(self.budget),
        )
    }
}

impl DoesNotFit {
    /// The 422's cause: the field to lower (the frames when fewer fit, else the width) and
    /// [`DoesNotFit::message`].
    pub fn cause(&self, size: &JobSize, lane: &str) -> Cause {
        Cause {
            field: if self.frames.is_some() {
                "spec.frames"
            } else {
                "spec.width"
            }
            .into(),
            reason: CauseReason::FieldValueInvalid,
            message: self.message(size, lane),
        }
    }
}

/// Whether `job` of `model` fits the runner that reported `memory`: `Ok` with whether its
/// VAE tiles ([`RunnerMemory::tiles`]) when it fits or the runner did not profile that model
/// (nothing to decide from), else what it needs and the largest sizes that fit.
pub fn fits(memory: &RunnerMemory, model: &str, job: &JobSize) -> Result<bool, DoesNotFit> {
    let tiling = memory.tiles(model, job);
    let Some(profile) = memory.models.get(model) else {
        return Ok(tiling);
    };
    let (mode, budget) = (memory.mode, memory.budget_bytes);
    let (stage, needs) = profile.estimate(job, mode, tiling).peak();
    if needs <= budget {
        return Ok(tiling);
    }
    Err(DoesNotFit {
        stage,
        needs,
        budget,
        mode,
        tiled: tiling,
        frames: profile.most_frames(job, mode, memory.vae_tiling, budget),
        // A size the VideoJob schema refuses is no fix.
        area: profile
            .largest_area(job, mode, memory.vae_tiling, budget)
            .filter(|&(w, h)| w.min(h) >= MIN_SIDE),
    })
}

/// The smallest width and height a VideoJob may ask for (its schema's minimum).
pub const MIN_SIDE: u64 = 256;

/// The mode a runner runs in when its lane says `auto`: [`auto_mode`] of its models.
pub fn resolve_mode(requested: MemoryMode, profiles: &[&ModelProfile], budget: u64) -> MemoryMode {
    if requested != MemoryMode::Auto {
        return requested;
    }
    let weights: Vec<ModeWeights> = profiles.iter().map(|p| p.mode_weights()).collect();
    auto_mode(&weights, budget)
}

/// What `auto` weighs for one model: the weight bytes on the device with everything resident,
/// and with one expert at a time (`None`: one transformer, nothing to swap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeWeights {
    pub resident: u64,
    pub expert_swap: Option<u64>,
}

/// `auto`'s choice for the models one runner serves, from its usable `budget`
/// ([`usable_bytes`]): everything resident if every model's weights take at most 60 % of it
/// (the rest is for a job's activations and the VAE's decode), else one expert at a time if a
/// model has two and every model's weights then do, else model offload. The runner's start,
/// a pipeline loaded with `auto` and the GPU check all decide with this.
pub fn auto_mode(models: &[ModeWeights], budget: u64) -> MemoryMode {
    let limit = budget / 10 * 6;
    if models.iter().all(|m| m.resident <= limit) {
        MemoryMode::Resident
    } else if models.iter().any(|m| m.expert_swap.is_some())
        && models
            .iter()
            .all(|m| m.expert_swap.unwrap_or(m.resident) <= limit)
    {
        MemoryMode::ExpertSwap
    } else {
        MemoryMode::ModelOffload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn job(width: u64, height: u64, frames: u64) -> JobSize {
        JobSize {
            width,
            height,
            frames,
            guided: true,
            mode: GenerationMode::T2v,
        }
    }

    /// Wan 2.2 A14B with `transformerWeights: fp8`: each expert's linear weights in float8,
    /// as the runner counts them (its `fp8_storage_halves_an_a14b_expert` test), and the
    /// feed-forward's weight upcast to float32 and bfloat16 while it runs.
    fn a14b_fp8() -> ModelProfile {
        ModelProfile {
            transformer_bytes: vec![14_526_885_568; 2],
            upcast_bytes: 13824 * 5120 * 6,
            ..ModelProfile::wan22_a14b_i2v()
        }
    }

    fn runner(budget: u64, mode: MemoryMode) -> RunnerMemory {
        RunnerMemory {
            v: ANNOTATION_VERSION,
            device_bytes: budget,
            budget_bytes: budget,
            mode,
            vae_tiling: VaeTiling::Off,
            models: [("anisora".to_owned(), ModelProfile::wan22_a14b_i2v())].into(),
        }
    }

    #[test]
    fn every_stage_grows_with_the_size_and_resident_holds_every_weight() {
        let p = ModelProfile::wan22_a14b_i2v();
        let i2v = |w, h, f| JobSize {
            mode: GenerationMode::I2v,
            ..job(w, h, f)
        };
        let small = p.estimate(&i2v(832, 480, 81), MemoryMode::Resident, false);
        let large = p.estimate(&i2v(1280, 720, 81), MemoryMode::Resident, false);
        let stages: Vec<Stage> = small.stages.iter().map(|s| s.0).collect();
        assert_eq!(
            stages,
            [
                Stage::TextEncoding,
                Stage::ImageEncoding,
                Stage::Denoising,
                Stage::Decoding
            ]
        );
        // Weights, and each expert's rotary tables (512 KiB).
        assert_eq!(small.resident_bytes, 68_854_000_000 + 2 * 524_288);
        for (s, l) in small.stages.iter().zip(&large.stages) {
            if s.0 != Stage::TextEncoding {
                assert!(l.1 > s.1, "{:?}: {} !> {}", s.0, l.1, s.1);
            }
            assert!(s.1 > small.resident_bytes);
        }
        // Untiled, decoding 1280x720 needs tens of GiB on top of the weights.
        let decode = large.stages[3].1 - large.resident_bytes;
        assert!(decode > 10 * GB && decode < 40 * GB, "{decode}");
    }

    #[test]
    fn modes_and_tiling_lower_the_peak_in_order() {
        let p = ModelProfile::wan22_a14b_i2v();
        let size = job(1280, 720, 81);
        let peak = |mode, tiling| p.estimate(&size, mode, tiling).peak().1;
        let resident = peak(MemoryMode::Resident, false);
        let swap = peak(MemoryMode::ExpertSwap, false);
        let offload = peak(MemoryMode::ModelOffload, false);
        let stage_bytes = |mode, stage| p.estimate(&size, mode, false).stage(stage);
        let expert = 28_600_000_000 + 524_288;
        let fewer = |stage| {
            stage_bytes(MemoryMode::Resident, stage) - stage_bytes(MemoryMode::ExpertSwap, stage)
        };
        assert_eq!(
            fewer(Stage::Denoising),
            expert,
            "one expert fewer while denoising"
        );
        assert_eq!(
            fewer(Stage::Decoding),
            2 * expert,
            "no expert while decoding"
        );
        assert!(
            swap < resident && offload < swap,
            "{resident} {swap} {offload}"
        );
        // Offloaded, the A14B runs 1280x720x81 on an 80 GB card but not a 24 GB.
        assert!(offload < 70 * GB && offload > 22 * GB, "{offload}");
        // Tiles lower the decoding peak.
        let decoding = |tiling| p.estimate(&size, MemoryMode::ModelOffload, tiling).stages[2].1;
        assert!(
            decoding(true) < decoding(false) / 2,
            "{} {}",
            decoding(true),
            decoding(false)
        );
        // cfg 1 skips the second prompt and its context.
        let unguided = JobSize {
            guided: false,
            ..size
        };
        assert!(p.estimate(&unguided, MemoryMode::Resident, false).peak().1 <= resident);
    }

    #[test]
    fn auto_tiles_only_the_jobs_that_do_not_decode_whole() {
        let p = ModelProfile::wan22_a14b_i2v();
        let (small, large) = (job(832, 480, 81), job(1280, 720, 81));
        let peak = |size, tiling| p.estimate(size, MemoryMode::Resident, tiling).peak().1;
        // A card on which the small job decodes whole and the large one only in tiles (all
        // resident, decoding is the A14B's largest stage untiled).
        let budget = peak(&small, false).max(peak(&large, true));
        assert!(peak(&large, false) > budget, "{budget}");
        let mut memory = runner(budget, MemoryMode::Resident);
        memory.vae_tiling = VaeTiling::Auto;
        assert!(!memory.tiles("anisora", &small));
        assert!(memory.tiles("anisora", &large));
        assert_eq!(fits(&memory, "anisora", &large), Ok(true));
        // An unprofiled model: nothing to estimate from, no tiles.
        assert!(!memory.tiles("other", &large));
        // `off` refuses what `auto` runs tiled, `on` tiles every job.
        memory.vae_tiling = VaeTiling::Off;
        let refused = fits(&memory, "anisora", &large).unwrap_err();
        assert_eq!((refused.stage, refused.tiled), (Stage::Decoding, false));
        assert!(!memory.tiles("anisora", &large));
        memory.vae_tiling = VaeTiling::On;
        assert!(memory.tiles("anisora", &small));
        // Refused under `auto`: estimated tiled (whole did not fit).
        memory.vae_tiling = VaeTiling::Auto;
        memory.budget_bytes = peak(&large, true) - 1;
        let refused = fits(&memory, "anisora", &large).unwrap_err();
        assert_eq!((refused.stage, refused.tiled), (Stage::Denoising, true));
        // Denoising runs out, not the VAE: the message does not talk of tiles.
        let message = refused.message(&large, "a");
        assert!(
            message.contains("to denoise 1280x720x81 in memory mode resident;"),
            "{message}"
        );
        let decoding = DoesNotFit {
            stage: Stage::Decoding,
            ..refused.clone()
        };
        assert!(
            decoding
                .message(&large, "a")
                .contains("to decode 1280x720x81 in memory mode resident with the VAE tiled;"),
            "{}",
            decoding.message(&large, "a")
        );
        let (w, h) = refused.area.expect("a smaller size fits");
        assert_eq!(
            fits(
                &memory,
                "anisora",
                &JobSize {
                    width: w,
                    height: h,
                    ..large
                }
            ),
            Ok(true)
        );
    }

    #[test]
    fn auto_suggests_the_sizes_that_fit_whole_where_tiles_cost_more() {
        // A narrow VAE over many frames: blending the tiles into the whole video costs more
        // than decoding a chunk whole, so a refused job's largest sizes are whole ones.
        let narrow = ModelProfile {
            transformer_bytes: vec![1 << 20],
            upcast_bytes: 0,
            text_encoder_bytes: 1 << 20,
            vae_bytes: 1 << 20,
            dtype_bytes: 4,
            vae_dtype_bytes: 4,
            transformer: TransformerShape {
                dim: 32,
                ffn_dim: 64,
                heads: 2,
                layers: 2,
                in_channels: 16,
                out_channels: 16,
                patch: [1, 2, 2],
                text_dim: 32,
            },
            text_encoder: TextEncoderShape {
                d_model: 32,
                d_ff: 64,
                heads: 2,
                text_length: 512,
            },
            vae: VaeShape {
                base_dim: 8,
                ..ModelProfile::wan22_a14b_i2v().vae
            },
            conv_unfold: false,
        };
        let size = job(512, 512, 161);
        let peak = |tiling| narrow.estimate(&size, MemoryMode::Resident, tiling).peak();
        assert_eq!(peak(false).0, Stage::Decoding);
        assert!(
            peak(true).1 > peak(false).1,
            "{:?} {:?}",
            peak(true),
            peak(false)
        );
        let memory = RunnerMemory {
            v: ANNOTATION_VERSION,
            device_bytes: peak(false).1,
            budget_bytes: peak(false).1 - 1,
            mode: MemoryMode::Resident,
            vae_tiling: VaeTiling::Auto,
            models: [("narrow".to_owned(), narrow.clone())].into(),
        };
        let refused = fits(&memory, "narrow", &size).unwrap_err();
        assert!(refused.tiled);
        let suggested = |tiling| {
            let budget = memory.budget_bytes;
            (
                narrow.most_frames(&size, MemoryMode::Resident, tiling, budget),
                narrow.largest_area(&size, MemoryMode::Resident, tiling, budget),
            )
        };
        // Decoding whole runs a chunk at a time: fewer frames do not help it, a smaller area
        // does, and more of it fits than tiled. Tiled, fewer frames fit. `auto` offers the
        // most of each, and the runner runs each as it was weighed.
        let (whole, tiled) = (suggested(VaeTiling::Off), suggested(VaeTiling::On));
        assert_eq!(whole.0, None);
        let (frames, (w, h)) = (tiled.0.expect("fewer frames fit tiled"), whole.1.unwrap());
        assert!(whole.1 > tiled.1, "{whole:?} {tiled:?}");
        assert_eq!((refused.frames, refused.area), (Some(frames), Some((w, h))));
        assert_eq!(fits(&memory, "narrow", &job(512, 512, frames)), Ok(true));
        assert_eq!(fits(&memory, "narrow", &job(w, h, size.frames)), Ok(false));
        assert!(fits(&memory, "narrow", &job(512, 512, frames + 4)).is_err());
        assert!(fits(&memory, "narrow", &job(w + 16, h + 16, size.frames)).is_err());
    }

    #[test]
    fn the_cpu_unfolds_a_small_convolution_input_and_copies_a_large_one() {
        let decoding = |p: &ModelProfile, side| {
            let size = JobSize {
                width: side,
                height: side,
                frames: 5,
                guided: false,
                mode: GenerationMode::T2v,
            };
            p.estimate(&size, MemoryMode::Resident, false)
                .stage(Stage::Decoding)
        };
        let gpu = ModelProfile::wan22_a14b_i2v();
        let cpu = ModelProfile {
            conv_unfold: true,
            ..gpu.clone()
        };
        // The Wan VAE's 96 channels x 6 frames x 258 rows exceed 20,480: oneDNN, which copies
        // the full resolution's 4 frames once.
        assert_eq!(
            decoding(&cpu, 256) - decoding(&gpu, 256),
            96 * 4 * 256 * 256 * 4
        );
        // 8 channels x 6 frames x 130 rows do not: full resolution's 4 frames unfold 27 times.
        let narrow = |conv_unfold| ModelProfile {
            conv_unfold,
            vae: VaeShape {
                base_dim: 8,
                ..gpu.vae.clone()
            },
            ..gpu.clone()
        };
        assert_eq!(
            decoding(&narrow(true), 128) - decoding(&narrow(false), 128),
            27 * 8 * 4 * 128 * 128 * 4
        );
    }

    #[test]
    fn a_job_that_does_not_fit_is_told_the_limit_and_the_largest_sizes_that_fit() {
        // Resident on 80 GiB, decoding 1280x720 whole does not fit. Decoding runs one latent
        // frame at a time, so fewer frames do not help: only a smaller area does.
        let memory = runner(80 * GB, MemoryMode::Resident);
        let size = job(1280, 720, 81);
        let refused = fits(&memory, "anisora", &size).unwrap_err();
        assert_eq!((refused.stage, refused.frames), (Stage::Decoding, None));
        let (w, h) = refused.area.expect("a smaller area fits");
        assert_eq!((w % 16, h % 16), (0, 0));
        assert!(w < 1280 && h < 720 && w > 640, "{w}x{h}");
        assert!(fits(&memory, "anisora", &job(w, h, 81)).is_ok());
        assert!(fits(&memory, "anisora", &job(w + 32, h + 16, 81)).is_err());
        let message = refused.message(&size, "anisora");
        assert!(
            message.starts_with("needs ")
                && message.contains(
                    "to decode 1280x720x81 in memory mode resident; lane anisora's runners have 80.0 GiB usable; the largest that fit: "
                ),
            "{message}"
        );
        assert!(message.contains(&format!("{w}x{h}x81 (spec.width: {w}, spec.height: {h})")));
        // Model offload fits what resident does not.
        assert!(fits(&runner(80 * GB, MemoryMode::ModelOffload), "anisora", &size).is_ok());

        // Offloaded on 36 GiB, denoising is the peak, and it shrinks with the frames.
        let memory = runner(36 * GB, MemoryMode::ModelOffload);
        let refused = fits(&memory, "anisora", &size).unwrap_err();
        assert_eq!(refused.stage, Stage::Denoising);
        let frames = refused.frames.expect("fewer frames fit");
        assert!(frames < 81 && (frames - 1).is_multiple_of(4), "{frames}");
        assert!(fits(&memory, "anisora", &job(1280, 720, frames)).is_ok());
        assert!(fits(&memory, "anisora", &job(1280, 720, frames + 4)).is_err());
        let message = refused.message(&size, "anisora");
        assert!(
            message.contains(&format!("1280x720x{frames} (spec.frames: {frames}) or ")),
            "{message}"
        );
    }

    #[test]
    fn no_size_under_the_schemas_minimum_is_suggested() {
        // The largest area that fits 832x480 resident at 81 frames shrinks with the budget:
        // once it would be under 256 pixels a side, none is suggested.
        let profile = ModelProfile::wan22_a14b_i2v();
        let size = job(832, 480, 81);
        let small = (60..80)
            .map(|gb| gb * GB)
            .find(|&budget| {
                profile
                    .largest_area(&size, MemoryMode::Resident, VaeTiling::Off, budget)
                    .is_some_and(|(_, h)| h < MIN_SIDE)
            })
            .expect("a budget where only a smaller size than the schema allows fits");
        let refused = fits(&runner(small, MemoryMode::Resident), "anisora", &size).unwrap_err();
        assert_eq!(refused.area, None);
    }

    #[test]
    fn a_model_that_fits_nowhere_says_so_and_an_unprofiled_model_is_admitted() {
        let memory = runner(20 * GB, MemoryMode::Resident);
        let refused = fits(&memory, "anisora", &job(832, 480, 81)).unwrap_err();
        assert_eq!((refused.frames, refused.area), (None, None));
        assert!(
            refused
                .message(&job(832, 480, 81), "a")
                .contains("no size of this model fits")
        );
        assert!(fits(&memory, "other", &job(1280, 720, 81)).is_ok());
        // A budget under 1 GiB (a CPU lane's, a test's) reads in MiB, not as 0.0 GiB.
        let small = RunnerMemory {
            budget_bytes: 600 << 20,
            ..memory
        };
        let message = fits(&small, "anisora", &job(832, 480, 81))
            .unwrap_err()
            .message(&job(832, 480, 81), "a");
        assert!(message.contains("runners have 600 MiB usable"), "{message}");
    }

    #[test]
    fn fp8_weights_run_the_a14b_on_a_24_gb_card() {
        // A 24 GB card, every part offloaded: a bfloat16 expert alone outweighs the budget
        // once denoising starts; stored in fp8 it leaves room for 832x480x81.
        let budget = usable_bytes(24_000_000_000);
        let mut memory = runner(budget, MemoryMode::ModelOffload);
        let size = JobSize {
            mode: GenerationMode::I2v,
            ..job(832, 480, 81)
        };
        let refused = fits(&memory, "anisora", &size).unwrap_err();
        assert_eq!(refused.stage, Stage::Denoising);
        memory.models.insert("anisora".into(), a14b_fp8());
        assert_eq!(fits(&memory, "anisora", &size), Ok(false));
        let fp8 = a14b_fp8().estimate(&size, MemoryMode::ModelOffload, false);
        let bf16 = ModelProfile::wan22_a14b_i2v().estimate(&size, MemoryMode::ModelOffload, false);
        // Denoising holds half the expert, and one upcast weight more.
        assert_eq!(
            bf16.stage(Stage::Denoising) - fp8.stage(Stage::Denoising),
            28_600_000_000 - 14_526_885_568 - 13824 * 5120 * 6
        );
        // 1280x720x81 still does not fit: fewer frames do.
        let large = JobSize {
            mode: GenerationMode::I2v,
            ..job(1280, 720, 81)
        };
        let refused = fits(&memory, "anisora", &large).unwrap_err();
        assert!(refused.frames.is_some_and(|f| f < 81), "{refused:?}");
        // Resident, the A14B in fp8 (two experts, umT5, the VAE: 40.7 GB) fits an 80 GB card
        // with room for 1280x720x81 whole; in bfloat16 it takes expert-swap.
        let all = [&a14b_fp8()];
        assert_eq!(
            resolve_mode(MemoryMode::Auto, &all, usable_bytes(80_000_000_000)),
            MemoryMode::Resident
        );
        let resident = RunnerMemory {
            budget_bytes: usable_bytes(80_000_000_000),
            mode: MemoryMode::Resident,
            ..memory
        };
        assert_eq!(fits(&resident, "anisora", &large), Ok(false));
    }

    #[test]
    fn the_annotation_round_trips_and_is_refused_when_malformed() {
        let m = runner(75 * GB, MemoryMode::ExpertSwap);
        let text = m.to_annotation();
        assert!(text.len() < 1024, "small: {} bytes", text.len());
        assert!(text.contains("\"mode\":\"expertSwap\""), "{text}");
        assert_eq!(RunnerMemory::from_annotation(&text), Ok(m.clone()));
        assert!(RunnerMemory::from_annotation("{").is_err());
        let old = text.replace(&format!("\"v\":{ANNOTATION_VERSION}"), "\"v\":1");
        assert!(
            RunnerMemory::from_annotation(&old)
                .unwrap_err()
                .contains("version 1")
        );
        let auto = text.replace("expertSwap", "auto");
        assert!(RunnerMemory::from_annotation(&auto).is_err());
    }

    #[test]
    fn auto_resolves_from_the_budget() {
        let p = ModelProfile::wan22_a14b_i2v();
        let all = [&p];
        let budget = |gb: u64| usable_bytes(gb * 1_000_000_000);
        assert_eq!(
            resolve_mode(MemoryMode::Auto, &all, budget(141)),
            MemoryMode::Resident
        );
        assert_eq!(
            resolve_mode(MemoryMode::Auto, &all, budget(80)),
            MemoryMode::ExpertSwap
        );
        assert_eq!(
            resolve_mode(MemoryMode::Auto, &all, budget(24)),
            MemoryMode::ModelOffload
        );
        assert_eq!(
            resolve_mode(MemoryMode::Resident, &all, budget(24)),
            MemoryMode::Resident
        );
        assert_eq!(
            usable_bytes(24 << 30),
            (24 << 30) - (24 << 30) / 20 - (512 << 20)
        );
    }
}
