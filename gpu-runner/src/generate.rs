//! One job on a loaded model: prompt -> latents -> frames -> files, then memory hygiene,
//! whether the job succeeded or not.

use std::path::Path;

use framelane_api::reasons::JobReason;
use tch::{Kind, Tensor};

use crate::accel::AccelError;
use crate::memory::{JobMemory, RunnerDevice, is_out_of_memory};
use crate::package::ModelPackage;
use crate::sampler::{self, Denoiser, Noise, SampleError, SamplingPlan, StepControl};
use crate::video::{self, Frames, VideoError, VideoOutput};

/// What a job asks for, after the controller resolved the VideoModel's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub namespace: String,
    pub name: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    /// Left out: the package's fps.
    pub fps: Option<u32>,
    /// Left out: the package's cfg.
    pub cfg: Option<f64>,
    pub seed: u32,
}

/// Where a job is; the names are `status.progress.stage` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    EncodingPrompt,
    Denoising,
    Decoding,
    Encoding,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::EncodingPrompt => "EncodingPrompt",
            Stage::Denoising => "Denoising",
            Stage::Decoding => "Decoding",
            Stage::Encoding => "Encoding",
        }
    }
}

/// Reported at each stage start and after each denoising step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: u32,
    pub total_steps: u32,
}

/// Why a job failed; [`JobError::reason`] is the VideoJob's `status.reason`.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("`{field}` {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("cancelled at a step boundary after {completed} of {total} denoising steps")]
    Cancelled { completed: u32, total: u32 },
    #[error(
        "the GPU ran out of memory while {stage}: lower width, height or frames, or run this \
         model on a lane with a larger GPU or a Dedicated lane (libtorch: {message})"
    )]
    GpuOutOfMemory {
        stage: &'static str,
        message: String,
    },
    #[error("{stage} failed: {message}")]
    Torch {
        stage: &'static str,
        message: String,
    },
    #[error("writing the video failed: {0}")]
    Output(#[from] VideoError),
}

impl JobError {
    /// The reason the job's status records.
    pub fn reason(&self) -> JobReason {
        match self {
            JobError::Cancelled { .. } => JobReason::Cancelled,
            JobError::GpuOutOfMemory { .. } => JobReason::GpuOutOfMemory,
            JobError::InvalidRequest { .. } | JobError::Torch { .. } | JobError::Output(_) => {
                JobReason::GenerationFailed
            }
        }
    }

    fn torch(stage: Stage, message: String) -> JobError {
        let stage = stage.as_str();
        if is_out_of_memory(&message) {
            JobError::GpuOutOfMemory { stage, message }
        } else {
            JobError::Torch { stage, message }
        }
    }
}

/// A finished job: its result and, always, its memory report.
#[derive(Debug)]
pub struct JobOutcome {
    pub result: Result<VideoOutput, JobError>,
    pub memory: Result<JobMemory, AccelError>,
}

/// Runs `job` on `model` and writes its files under `out_root`. `on_progress` may cancel at
/// any step boundary. Memory is cleaned up and measured however the job ends.
pub fn run_job(
    model: &ModelPackage,
    device: &RunnerDevice,
    job: &JobRequest,
    out_root: &Path,
    mut on_progress: impl FnMut(&Progress) -> StepControl,
) -> JobOutcome {
    let before = device.begin_job();
    let job_id = format!("{}/{}", job.namespace, job.name);
    // Every tensor of the job lives inside `frames_for`; libtorch errors that tch raises as
    // panics are caught so the runner stays up.
    let frames = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        frames_for(model, job, &mut on_progress)
    }))
    .unwrap_or_else(|panic| {
        Err(JobError::torch(
            Stage::Denoising,
            crate::panic_message(&panic),
        ))
    });
    let result = frames.and_then(|(frames, fps)| {
        // The frames are made; a cancel now would only throw the finished video away.
        let _ = on_progress(&Progress {
            stage: Stage::Encoding,
            step: 0,
            total_steps: 0,
        });
        Ok(video::write_outputs(
            out_root,
            &job.namespace,
            &job.name,
            &frames,
            fps,
        )?)
    });
    let memory = before.and_then(|before| {
        let after = device.clean_up()?;
        Ok(JobMemory::new(device, &before, &after))
    });
    match &memory {
        Ok(report) => report.log(&job_id),
        Err(e) => tracing::error!(job = %job_id, error = %e, "memory cleanup failed"),
    }
    if let Err(e) = &result {
        tracing::warn!(job = %job_id, reason = %e.reason(), error = %e, "job failed");
    }
    JobOutcome { result, memory }
}

/// Checks a job against the package's strides.
pub fn latent_shape(model: &ModelPackage, job: &JobRequest) -> Result<[i64; 5], JobError> {
    let m = &model.manifest;
    let invalid = |field, reason: String| JobError::InvalidRequest { field, reason };
    let (ts, ss) = (m.temporal_stride, m.spatial_stride);
    let frames = i64::from(job.frames);
    if frames < 1 || (frames - 1) % ts != 0 {
        return Err(invalid(
            "frames",
            format!("must be of the form {ts}k+1 for {}, got {frames}", m.model),
        ));
    }
    for (field, value) in [("width", job.width), ("height", job.height)] {
        let v = i64::from(value);
        if v < ss || v % ss != 0 || v % 2 != 0 {
            return Err(invalid(
                field,
                format!("must be an even multiple of {ss} for {}, got {v}", m.model),
            ));
        }
    }
    if job.prompt.trim().is_empty() {
        return Err(invalid("prompt", "must not be empty".to_owned()));
    }
    Ok([
        1,
        m.latent_channels,
        (frames - 1) / ts + 1,
        i64::from(job.height) / ss,
        i64::from(job.width) / ss,
    ])
}

/// The sampling plan of `job` on `model`.
pub fn plan_for(model: &ModelPackage, job: &JobRequest) -> SamplingPlan {
    let m = &model.manifest;
    SamplingPlan {
        sigmas: m.sigmas(),
        kind: m.sampler,
        eta: m.eta,
        cfg: job.cfg.unwrap_or(m.cfg),
        timestep_scale: m.timestep_scale,
    }
}

/// Encodes a prompt with the package's tokenizer and text encoder.
pub fn encode_prompt(model: &ModelPackage, text: &str) -> Result<Tensor, JobError> {
    let ids = model
        .tokenizer
        .encode(text)
        .map_err(|reason| JobError::InvalidRequest {
            field: "prompt",
            reason,
        })?;
    let torch = |e: tch::TchError| JobError::torch(Stage::EncodingPrompt, e.to_string());
    let ids = Tensor::from_slice(&ids)
        .f_view([1, model.manifest.text_length])
        .map_err(torch)?
        .f_to_device(model.device)
        .map_err(torch)?;
    let _guard = tch::no_grad_guard();
    model.text_encoder.forward_ts(&[ids]).map_err(torch)
}

/// Latents after the sampling loop, float32 on the device.
pub fn denoise(
    model: &ModelPackage,
    job: &JobRequest,
    on_progress: &mut dyn FnMut(&Progress) -> StepControl,
) -> Result<Tensor, JobError> {
    let shape = latent_shape(model, job)?;
    let plan = plan_for(model, job);
    let total_steps = plan.steps() as u32;
    let stage = |stage| Progress {
        stage,
        step: 0,
        total_steps,
    };
    let cancelled = |completed| JobError::Cancelled {
        completed,
        total: total_steps,
    };
    if on_progress(&stage(Stage::EncodingPrompt)) == StepControl::Cancel {
        return Err(cancelled(0));
    }
    let torch = |stage| move |e: tch::TchError| JobError::torch(stage, e.to_string());
    let cond = encode_prompt(model, &job.prompt)?;
    let uncond = if plan.uses_uncond() {
        let negative = job.negative_prompt.as_deref().unwrap_or("");
        Some(encode_prompt(model, negative)?)
    } else {
        None
    };
    let noise = Noise::draw(u64::from(job.seed), &shape, &plan).map_err(torch(Stage::Denoising))?;
    let denoiser = Denoiser {
        module: &model.denoiser,
        kind: model.manifest.dtype.kind(),
    };
    let result = sampler::sample(
        &denoiser,
        &plan,
        &noise,
        &cond,
        uncond.as_ref(),
        model.device,
        |done, total| {
            on_progress(&Progress {
                stage: Stage::Denoising,
                step: done as u32,
                total_steps: total as u32,
            })
        },
    );
    result.map_err(|e| match e {
        SampleError::Cancelled { completed, .. } => cancelled(completed as u32),
        SampleError::Torch { source, .. } => JobError::torch(Stage::Denoising, source.to_string()),
    })
}

/// Decodes latents to RGB8 frames on the CPU.
pub fn decode(model: &ModelPackage, latents: &Tensor) -> Result<Frames, tch::TchError> {
    let _guard = tch::no_grad_guard();
    let m = &model.manifest;
    let video = model
        .vae_decoder
        .forward_ts(&[latents.f_to_kind(m.dtype.kind())?])?;
    let size = video.size();
    let [_, _, count, height, width] = size[..] else {
        return Err(tch::TchError::Shape(format!(
            "vae_decoder returned shape {size:?}, expected [1, 3, T, H, W]"
        )));
    };
    // [1, 3, T, H, W] in [-1, 1] -> [T, H, W, 3] bytes.
    let rgb = video
        .f_to_kind(Kind::Float)?
        .f_squeeze_dim(0)?
        .f_permute([1, 2, 3, 0])?
        .f_add_scalar(1.0)?
        .f_mul_scalar(127.5)?
        .f_round()?
        .f_clamp(0.0, 255.0)?
        .f_to_kind(Kind::Uint8)?
        .f_to_device(tch::Device::Cpu)?
        .f_contiguous()?;
    let mut bytes = vec![0u8; rgb.numel()];
    rgb.f_copy_data_u8(&mut bytes, rgb.numel())?;
    Ok(Frames {
        width: width as u32,
        height: height as u32,
        count: count as u32,
        rgb: bytes,
    })
}

fn frames_for(
    model: &ModelPackage,
    job: &JobRequest,
    on_progress: &mut dyn FnMut(&Progress) -> StepControl,
) -> Result<(Frames, u32), JobError> {
    let latents = denoise(model, job, on_progress)?;
    let total_steps = model.manifest.steps;
    if on_progress(&Progress {
        stage: Stage::Decoding,
        step: total_steps,
        total_steps,
    }) == StepControl::Cancel
    {
        return Err(JobError::Cancelled {
            completed: total_steps,
            total: total_steps,
        });
    }
    let frames =
        decode(model, &latents).map_err(|e| JobError::torch(Stage::Decoding, e.to_string()))?;
    if frames.count != job.frames || frames.width != job.width || frames.height != job.height {
        return Err(JobError::Torch {
            stage: Stage::Decoding.as_str(),
            message: format!(
                "vae_decoder made {} frames of {}x{}, the job asked for {} of {}x{}",
                frames.count, frames.width, frames.height, job.frames, job.width, job.height
            ),
        });
    }
    Ok((frames, job.fps.unwrap_or(model.manifest.fps)))
}
