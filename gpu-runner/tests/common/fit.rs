//! The fit check's estimate against a pipeline's measured stage peaks: shared by
//! tests/fit_estimate.rs (tiny models) and benches/fit.rs (full widths).

use framelane_api::GenerationMode;
use framelane_core::memory::{JobSize, Stage};
use framelane_runner::{
    sampler::StepControl,
    wan::pipeline::{Request, WanPipeline},
};
use tch::{Kind, Tensor};

/// How far above a measured peak an estimate may be: the estimate counts the tensors alive
/// at each stage's worst moment from the code, and rounds up where libtorch's kernels keep
/// scratch (docs/fit-check.md).
pub const BAND: f64 = 0.20;

pub const MIB: f64 = (1 << 20) as f64;

/// The start image of an image-to-video job of `job`'s size.
pub fn start_image(job: &JobSize) -> Option<Tensor> {
    tch::manual_seed(0);
    (job.mode == GenerationMode::I2v).then(|| {
        Tensor::rand(
            [1, 3, job.height as i64, job.width as i64],
            (Kind::Float, super::device().device),
        ) * 2.0
            - 1.0
    })
}

pub fn request<'a>(job: &JobSize, image: Option<&'a Tensor>) -> Request<'a> {
    Request {
        prompt: "a red fox running through snow",
        negative_prompt: "blurry",
        width: job.width as i64,
        height: job.height as i64,
        frames: job.frames as i64,
        steps: 2,
        guidance: if job.guided { 5.0 } else { 1.0 },
        seed: 1,
        image,
    }
}

/// Each stage's peak as the pipeline measured it (bytes allocated on the device, above what
/// was there before the model loaded), by the estimate's name of the stage, and its seconds;
/// the decoding too when `decode`.
pub fn stage_peaks(
    pipeline: &mut WanPipeline,
    job: &JobSize,
    baseline: i64,
    decode: bool,
) -> Vec<(Stage, i64, f64)> {
    let image = start_image(job);
    let latents = pipeline
        .denoise(&request(job, image.as_ref()), &mut |_, _| {
            StepControl::Continue
        })
        .unwrap_or_else(|e| panic!("{e}"));
    if decode {
        pipeline.decode(&latents).unwrap_or_else(|e| panic!("{e}"));
    }
    drop(latents);
    pipeline
        .take_stages()
        .into_iter()
        .map(|s| {
            let stage = match s.stage.as_str() {
                "EncodingPrompt" => Stage::TextEncoding,
                "EncodingImage" => Stage::ImageEncoding,
                "Denoising" => Stage::Denoising,
                "Decoding" => Stage::Decoding,
                other => panic!("unknown stage {other}"),
            };
            (stage, s.peak_allocated_bytes - baseline, s.seconds)
        })
        .collect()
}

/// How far `estimated` lies above `measured`, in percent (negative: under it).
pub fn error_percent(measured: i64, estimated: i64) -> f64 {
    (estimated as f64 / measured as f64 - 1.0) * 100.0
}

/// Prints `what`'s measured and estimated bytes; a failure when the estimate lies outside
/// `[measured, measured + BAND]` ([`outside_band`]).
pub fn compare(what: &str, measured: i64, estimated: i64) -> Option<String> {
    println!(
        "{what}: measured {:.2} MiB, estimated {:.2} MiB ({:+.1} %)",
        measured as f64 / MIB,
        estimated as f64 / MIB,
        error_percent(measured, estimated),
    );
    outside_band(what, measured, estimated)
}

/// A failure when `what`'s estimate lies outside `[measured, measured + BAND]`.
pub fn outside_band(what: &str, measured: i64, estimated: i64) -> Option<String> {
    let error = error_percent(measured, estimated);
    (!(0.0..=BAND * 100.0).contains(&error)).then(|| format!("{what}: {error:+.1} %"))
}
