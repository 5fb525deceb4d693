//! The runner on the CPU: seconds per denoising step of the Rust loop against the same
//! TorchScript modules driven from Python (tests/reference_sampler.py), same package, seed and
//! job; and H.264/MP4 encode time per frame at Wan's default 832x480.
//!
//!     eval "$(gpu-runner/scripts/setup-torch.sh)"; cargo bench -p framelane-runner --bench runner

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use framelane_runner::generate::{JobRequest, decode, encode_prompt, latent_shape, plan_for};
use framelane_runner::package::ModelPackage;
use framelane_runner::sampler::{self, Denoiser, Noise, StepControl};
use framelane_runner::video;
use serde_json::json;
use tch::{Kind, Tensor};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per step of the Rust loop: one warm-up run, then the median of `RUNS`.
fn rust_per_step(pkg: &ModelPackage, job: &JobRequest) -> f64 {
    let plan = plan_for(pkg, job);
    let shape = latent_shape(pkg, job).unwrap();
    let cond = encode_prompt(pkg, &job.prompt).unwrap();
    let uncond = plan
        .uses_uncond()
        .then(|| encode_prompt(pkg, job.negative_prompt.as_deref().unwrap()).unwrap());
    let denoiser = Denoiser {
        module: &pkg.denoiser,
        kind: pkg.manifest.dtype.kind(),
    };
    let times = (0..=RUNS)
        .map(|_| {
            let noise = Noise::draw(u64::from(job.seed), &shape, &plan).unwrap();
            let started = Instant::now();
            let out = sampler::sample(
                &denoiser,
                &plan,
                &noise,
                &cond,
                uncond.as_ref(),
                pkg.device,
                |_, _| StepControl::Continue,
            )
            .unwrap();
            let elapsed = started.elapsed().as_secs_f64();
            assert!(out.abs().max().double_value(&[]) > 0.0);
            elapsed / plan.steps() as f64
        })
        .collect::<Vec<_>>();
    median(times[1..].to_vec())
}

/// Seconds per step of the Python loop: one warm-up case, then the median of `RUNS`.
fn python_per_step(model: &str, pkg: &ModelPackage, job: &JobRequest) -> f64 {
    let work = tempfile::tempdir().unwrap();
    let plan = plan_for(pkg, job);
    let cases: Vec<_> = (0..=RUNS)
        .map(|i| {
            json!({
                "package": pkg.dir, "prompt": job.prompt, "negativePrompt": job.negative_prompt,
                "width": job.width, "height": job.height, "frames": job.frames, "seed": job.seed,
                "sampler": if model == "anisora" { "euler" } else { "euler_ancestral" },
                "cfg": plan.cfg, "eta": plan.eta, "sigmas": plan.sigmas,
                "out": work.path().join(format!("{i}.f32")),
            })
        })
        .collect();
    let stdout = common::run_python(
        "reference_sampler.py",
        &[],
        Some(&serde_json::to_string(&cases).unwrap()),
    );
    let times: Vec<f64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["secondsPerStep"]
                .as_f64()
                .unwrap()
        })
        .collect();
    median(times[1..].to_vec())
}

fn main() {
    let device = common::cpu();
    println!(
        "runner bench: CPU, libtorch {} intra-op threads; median of {RUNS} runs after a warm-up",
        tch::get_num_threads()
    );
    println!("| model | latent | Rust s/step | Python s/step | Rust / Python |");
    println!("|---|---|---|---|---|");
    for (model, dir) in [("anisora", common::anisora()), ("phr00t", common::phr00t())] {
        let pkg = ModelPackage::load(&dir, device.device, None).unwrap();
        let job = JobRequest {
            width: 256,
            height: 256,
            frames: 33,
            ..common::job("bench", 7)
        };
        let shape = latent_shape(&pkg, &job).unwrap();
        let rust = rust_per_step(&pkg, &job);
        let python = python_per_step(model, &pkg, &job);
        println!(
            "| {model} (cfg {}, {:?}) | {shape:?} | {rust:.4} | {python:.4} | {:.3} |",
            pkg.manifest.cfg,
            pkg.manifest.sampler,
            rust / python
        );
    }

    let pkg = ModelPackage::load(&common::anisora(), device.device, None).unwrap();
    let job = JobRequest {
        width: 832,
        height: 480,
        frames: 81,
        ..common::job("encode", 7)
    };
    let shape = latent_shape(&pkg, &job).unwrap();
    tch::manual_seed(7);
    let frames = decode(&pkg, &Tensor::randn(shape, (Kind::Float, device.device))).unwrap();
    let times = (0..=RUNS)
        .map(|_| {
            let started = Instant::now();
            let mp4 = video::encode_mp4(&frames, 16).unwrap();
            assert!(!mp4.is_empty());
            started.elapsed().as_secs_f64() / f64::from(frames.count)
        })
        .collect::<Vec<_>>();
    println!(
        "H.264 + MP4 encode, {}x{}, {} frames of decoded noise: {:.2} ms per frame",
        frames.width,
        frames.height,
        frames.count,
        median(times[1..].to_vec()) * 1000.0
    );
}
