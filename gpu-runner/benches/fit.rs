//! The fit check's estimate at Wan 14B widths, on this machine's CPU: the GPU check's two models
//! (scripts/make_full_size_wan.py: A14B image to video with two experts, a 14B AllInOne text to
//! video file with umT5-XXL and the real Wan VAE, scaled fp8 on disk) at their full widths but
//! two blocks per transformer and text encoder, run in float32 with everything resident; each
//! stage's measured peak (the counting allocator) against `framelane_core::memory`'s estimate,
//! which must lie in `[measured, measured + 20 %]` as in tests/fit_estimate.rs; without the
//! weights (which dominate), the estimate must not lie under the measured activations either.
//! The tiny models of that test have a feed-forward a quarter of the hidden size wide, where
//! Wan 14B's is 2.7 times (13,824 against 5,120), 2 attention heads where it has 40, and a VAE
//! 8 channels wide where Wan's is 96: here the estimate meets the shapes it is for, the
//! transformer at up to 7,800 tokens. Two runs store the transformers' linear weights in fp8
//! (`--transformer-weights fp8`): the upcast of the 13824x5120 feed-forward weight, 270 MiB in
//! float32, is then the largest part of denoising's activations.
//!
//!     eval "$(gpu-runner/scripts/setup-torch.sh)"; cargo bench -p framelane-runner --bench fit

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Instant;

use common::fit::{BAND, MIB, error_percent, outside_band, stage_peaks};
use framelane_api::{GenerationMode, modellane::MemoryMode};
use framelane_core::memory::JobSize;
use framelane_runner::check::check_models;
use framelane_runner::placement::VaeTiling;
use framelane_runner::profile::model_profile;
use framelane_runner::wan::pipeline::{MemoryPlan, Precision, WanPipeline};

/// One model run at one size.
struct Run {
    model: &'static str,
    size: (u64, u64, u64),
    tiled: bool,
    decode: bool,
    fp8: bool,
}

const fn run(model: &'static str, size: (u64, u64, u64), tiled: bool, decode: bool) -> Run {
    Run {
        model,
        size,
        tiled,
        decode,
        fp8: false,
    }
}

/// The same, the transformers' linear weights stored in fp8.
const fn fp8(model: &'static str, size: (u64, u64, u64)) -> Run {
    Run {
        fp8: true,
        ..run(model, size, false, false)
    }
}

/// The real VAE whole and in 256x256 tiles at small sizes (a VAE pass over 832x480 takes
/// minutes on two cores), and the text-to-video transformer at 832x480x17: 7,800 tokens.
const RUNS: [Run; 7] = [
    run("a14b", (256, 256, 5), false, true),
    run("aio", (256, 256, 5), false, true),
    run("a14b", (320, 288, 5), true, true),
    run("aio", (320, 288, 5), true, true),
    run("aio", (832, 480, 17), false, false),
    fp8("a14b", (256, 256, 5)),
    fp8("aio", (832, 480, 17)),
];

fn main() {
    let device = common::device();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let script = common::tests_dir().join("../scripts/make_full_size_wan.py");
    let status = Command::new(common::python())
        .arg(&script)
        .arg(dir.path())
        .args(["--layers", "2"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {}", script.display(), common::FIX));
    assert!(status.success(), "{} failed", script.display());
    println!(
        "models written in {:.0} s (full widths, two blocks each)",
        started.elapsed().as_secs_f64()
    );
    let mut failures = Vec::new();
    println!(
        "| model | size | VAE | stage | measured MiB | estimated MiB | error | activations: measured MiB | estimated MiB | error | s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let models = check_models(dir.path());
    for Run {
        model: name,
        size: (width, height, frames),
        tiled,
        decode,
        fp8,
    } in RUNS
    {
        let (model, _) = models.iter().find(|(_, n)| *n == name).unwrap();
        let precision = Precision {
            fp8_transformers: fp8,
            ..Precision::FLOAT32
        };
        let profile = model_profile(&model.spec.files, precision, device.device).unwrap();
        let baseline = device.stats().unwrap().allocated_current;
        let plan = MemoryPlan {
            vae_tiling: if tiled { VaeTiling::On } else { VaeTiling::Off },
            ..MemoryPlan::default()
        };
        let mut pipeline = WanPipeline::load_with(&model.spec, precision, device.device, plan)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let job = JobSize {
            width,
            height,
            frames,
            guided: false,
            mode: match name {
                "a14b" => GenerationMode::I2v,
                _ => GenerationMode::T2v,
            },
        };
        let weights = device.stats().unwrap().allocated_current - baseline;
        let estimate = profile.estimate(&job, MemoryMode::Resident, tiled);
        let resident = estimate.resident_bytes as i64;
        let tiling = match (tiled, fp8) {
            (true, _) => "tiled",
            (false, true) => "whole, fp8 weights",
            (false, false) => "whole",
        };
        for (stage, measured, seconds) in stage_peaks(&mut pipeline, &job, baseline, decode) {
            let estimated = estimate.stage(stage) as i64;
            let what = format!("{name} {width}x{height}x{frames} {tiling} {stage:?}");
            // The weights (9.8 GB for A14B in float32) would hide the activations' error.
            let (active, active_estimate) = (measured - weights, estimated - resident);
            println!(
                "| {name} | {width}x{height}x{frames} | {tiling} | {stage:?} | {:.1} | {:.1} | {:+.1} % | {:.1} | {:.1} | {:+.1} % | {seconds:.0} |",
                measured as f64 / MIB,
                estimated as f64 / MIB,
                error_percent(measured, estimated),
                active as f64 / MIB,
                active_estimate as f64 / MIB,
                error_percent(active, active_estimate),
            );
            failures.extend(outside_band(&what, measured, estimated));
            if active_estimate < active {
                failures.push(format!("{what}: activations under their measured peak"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "estimates outside [measured, measured + {:.0} %]: {failures:?}",
        BAND * 100.0
    );
    println!(
        "every estimate within [measured, measured + {:.0} %]",
        BAND * 100.0
    );
}
