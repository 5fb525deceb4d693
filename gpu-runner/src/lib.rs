//! Framelane's GPU runner core: Wan 2.x natively on libtorch, loaded straight from safetensors,
//! memory hygiene around every job, H.264/MP4 output, and the model cache of a lane.
//!
//! - [`wan`]: Wan 2.x natively on tch (transformer, umT5 text encoder, VAE, weights, samplers,
//!   the whole pipeline).
//! - [`tokenizer`]: prompts to input ids (a model's Hugging Face `tokenizer.json`).
//! - [`schedule`], [`sampler`]: noise schedules and the step arithmetic they share.
//! - [`image`], [`inputs`]: a job's start image: read, decoded, resized.
//! - [`generate`]: one job end to end, with progress, cancellation and cleanup.
//! - [`video`]: frames to MP4 + preview PNG.
//! - [`cache`]: Dedicated / Shared model switching.
//! - [`check`]: the full-size random-weight models of the GPU check and the fit bench.
//! - [`job`]: a claimed VideoJob to a request, and the outcome back to its status.
//! - [`memory`], [`accel`]: device selection, allocator statistics, emptying the cache.
//! - [`placement`]: memory modes (what stays on the device), VAE tiling, host copies.
//! - [`metrics`]: the runner's Prometheus metrics.
//! - [`profile`]: the fit check's runner side: model shapes, device memory, refusing a job
//!   that does not fit.

pub mod accel;
pub mod cache;
pub mod check;
pub mod generate;
pub mod image;
pub mod inputs;
pub mod job;
pub mod memory;
pub mod metrics;
pub mod placement;
pub mod profile;
pub mod sampler;
pub mod schedule;
pub mod tokenizer;
pub mod video;
pub mod wan;

/// The text of a caught panic (tch raises some libtorch errors as panics).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "libtorch raised an error".to_owned()
    }
}
