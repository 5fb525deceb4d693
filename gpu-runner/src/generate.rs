//! One job on a loaded model: prompt (and start image) -> latents -> frames -> files, then
//! memory hygiene, whether the job succeeded or not.

use std::path::Path;

use framelane_api::reasons::JobReason;

use crate::accel::AccelError;
use crate::image::{ImageError, Rgb8};
use crate::memory::{JobMemory, RunnerDevice, is_out_of_memory};
use crate::sampler::StepControl;
use crate::video::{self, Frames, VideoError, VideoOutput};
use crate::wan::pipeline::{Mode, PipelineError, Request, WanPipeline};

/// What a job asks for, with the VideoModel's defaults and fixed values filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub namespace: String,
    pub name: String,
    pub mode: Mode,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// Image to video: the start image's file bytes (PNG or JPEG), read before the job runs.
    pub image: Option<Vec<u8>>,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: u32,
    pub steps: u32,
    /// Classifier-free guidance; 1.0 skips the unconditional pass.
    pub cfg: f64,
    pub seed: u32,
    /// Whether the VAE tiles this job, as the runner's fit check decided
    /// (`framelane_core::memory::RunnerMemory::tiles`); `None`: the model's
    /// `MemoryPlan::vae_tiling` decides per pass.
    pub vae_tiling: Option<bool>,
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
    #[error("spec.image {0}")]
    Image(#[from] ImageError),
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
            JobError::InvalidRequest { .. }
            | JobError::Image(_)
            | JobError::Torch { .. }
            | JobError::Output(_) => JobReason::GenerationFailed,
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

    fn pipeline(stage: Stage, error: PipelineError) -> JobError {
        match error {
            PipelineError::InvalidRequest { field, reason } => {
                JobError::InvalidRequest { field, reason }
            }
            PipelineError::Cancelled { completed, total } => JobError::Cancelled {
                completed: completed as u32,
                total: total as u32,
            },
            other => JobError::torch(stage, other.to_string()),
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
    model: &mut WanPipeline,
    device: &RunnerDevice,
    job: &JobRequest,
    out_root: &Path,
    mut on_progress: impl FnMut(&Progress) -> StepControl,
) -> JobOutcome {
    let before = device.begin_job();
    let job_id = format!("{}/{}", job.namespace, job.name);
    // Every tensor of the job lives inside `frames_for`; libtorch errors that tch raises as
    // panics are caught so the runner stays up.
    model.take_stages();
    model.set_job_tiling(job.vae_tiling);
    // The stage a panic (an out-of-memory error among them) is reported in: the last one
    // begun.
    let stage = std::cell::Cell::new(Stage::EncodingPrompt);
    let frames = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        frames_for(model, job, &mut |p: &Progress| {
            stage.set(p.stage);
            on_progress(p)
        })
    }))
    .unwrap_or_else(|panic| Err(JobError::torch(stage.get(), crate::panic_message(&panic))));
    let result = frames.and_then(|frames| {
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
            job.fps,
        )?)
    });
    model.release_offloaded();
    let tiled = model.vae_tiled();
    let stages = model.take_stages();
    let memory = before.and_then(|before| {
        let after = device.clean_up()?;
        let mut memory = JobMemory::new(device, &before, &after, stages);
        memory.status.memory_mode = Some(model.placement().as_str().to_owned());
        memory.status.vae_tiled = Some(tiled);
        Ok(memory)
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

/// The job's start image, resized to its frames.
fn first_frame(job: &JobRequest) -> Result<Option<tch::Tensor>, JobError> {
    let Some(bytes) = &job.image else {
        return Ok(None);
    };
    let image = Rgb8::decode(bytes)?;
    Ok(Some(
        image
            .resize(job.width as usize, job.height as usize)
            .to_tensor(),
    ))
}

fn frames_for(
    model: &mut WanPipeline,
    job: &JobRequest,
    on_progress: &mut dyn FnMut(&Progress) -> StepControl,
) -> Result<Frames, JobError> {
    if job.mode != model.mode() {
        return Err(JobError::InvalidRequest {
            field: "mode",
            reason: format!(
                "is {} but this model runs {} only",
                job.mode.as_str(),
                model.mode().as_str()
            ),
        });
    }
    if job.prompt.trim().is_empty() {
        return Err(JobError::InvalidRequest {
            field: "prompt",
            reason: "must not be empty".to_owned(),
        });
    }
    let image = first_frame(job)?;
    let request = Request {
        prompt: &job.prompt,
        negative_prompt: job.negative_prompt.as_deref().unwrap_or(""),
        width: i64::from(job.width),
        height: i64::from(job.height),
        frames: i64::from(job.frames),
        steps: job.steps,
        guidance: job.cfg,
        seed: u64::from(job.seed),
        image: image.as_ref(),
    };
    model
        .latent_shape(&request)
        .map_err(|e| JobError::pipeline(Stage::EncodingPrompt, e))?;
    let stage = |stage, step| Progress {
        stage,
        step,
        total_steps: job.steps,
    };
    if on_progress(&stage(Stage::EncodingPrompt, 0)) == StepControl::Cancel {
        return Err(JobError::Cancelled {
            completed: 0,
            total: job.steps,
        });
    }
    let latents = model
        .denoise(&request, &mut |done, total| {
            on_progress(&Progress {
                stage: Stage::Denoising,
                step: done as u32,
                total_steps: total as u32,
            })
        })
        .map_err(|e| JobError::pipeline(Stage::Denoising, e))?;
    if on_progress(&stage(Stage::Decoding, job.steps)) == StepControl::Cancel {
        return Err(JobError::Cancelled {
            completed: job.steps,
            total: job.steps,
        });
    }
    let frames = model
        .decode(&latents)
        .map_err(|e| JobError::pipeline(Stage::Decoding, e))?;
    if frames.count != job.frames || frames.width != job.width || frames.height != job.height {
        return Err(JobError::Torch {
            stage: Stage::Decoding.as_str(),
            message: format!(
                "the VAE made {} frames of {}x{}, the job asked for {} of {}x{}",
                frames.count, frames.width, frames.height, job.frames, job.width, job.height
            ),
        });
    }
    Ok(frames)
}
