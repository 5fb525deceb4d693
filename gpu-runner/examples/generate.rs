//! Runs one job from the command line, without Kubernetes, on a Wan model in diffusers'
//! layout sampled as it was saved:
//!
//!     cargo run -p framelane-runner --example generate -- MODEL_DIR OUT_DIR "a prompt" \
//!         [WIDTH HEIGHT FRAMES STEPS SEED [IMAGE]]
//!
//! An image-to-video model needs IMAGE (a PNG or JPEG). Writes
//! OUT_DIR/default/example/{video.mp4,preview.png} and prints the output and memory.

use std::path::PathBuf;

use anyhow::{Context, bail};
use framelane_runner::generate::{JobRequest, run_job};
use framelane_runner::memory::RunnerDevice;
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{ModelFiles, ModelSpec, Precision, WanPipeline};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, out, prompt, rest @ ..] = args.as_slice() else {
        bail!("usage: generate MODEL_DIR OUT_DIR PROMPT [WIDTH HEIGHT FRAMES STEPS SEED [IMAGE]]");
    };
    let num = |i: usize, default: u32| -> anyhow::Result<u32> {
        rest.get(i)
            .map(|s| {
                s.parse()
                    .context("WIDTH HEIGHT FRAMES STEPS SEED are numbers")
            })
            .unwrap_or(Ok(default))
    };
    let device = RunnerDevice::detect()?;
    let spec = ModelSpec {
        files: ModelFiles::Diffusers(PathBuf::from(model)),
        solver: None,
        boundary_ratio: None,
    };
    let mut pipeline = WanPipeline::load(&spec, Precision::BFLOAT16, device.device)?;
    let image = rest
        .get(5)
        .map(|path| std::fs::read(path).with_context(|| format!("reading {path}")))
        .transpose()?;
    let job = JobRequest {
        namespace: "default".to_owned(),
        name: "example".to_owned(),
        mode: pipeline.mode(),
        prompt: prompt.clone(),
        negative_prompt: None,
        image,
        width: num(0, 64)?,
        height: num(1, 64)?,
        frames: num(2, 17)?,
        fps: 16,
        steps: num(3, 8)?,
        cfg: 1.0,
        seed: num(4, 0)?,
        vae_tiling: None,
    };
    let outcome = run_job(&mut pipeline, &device, &job, out.as_ref(), |p| {
        eprintln!("{} {}/{}", p.stage.as_str(), p.step, p.total_steps);
        StepControl::Continue
    });
    println!("memory: {:?}", outcome.memory?);
    println!("output: {:?}", outcome.result?);
    Ok(())
}
