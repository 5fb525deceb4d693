//! Runs one job from the command line, without Kubernetes, on a Wan model in diffusers'
//! layout sampled as it was saved:
//!
//!     cargo run -p framelane-runner --example generate -- MODEL_DIR OUT_DIR "a prompt" \
//!         [WIDTH HEIGHT FRAMES STEPS SEED [IMAGE]]
//!
//! An image-to-video model needs IMAGE (a PNG or JPEG). Writes
//! OUT_DIR/default/example/{video.mp4,preview.png} and prints the output and memory. On a
//! GPU (or with FRAMELANE_DEVICE_MEMORY_BYTES), the job is weighed first as a runner weighs
//! it (memory mode and VAE tiling `auto`): one that does not fit is refused with the runner's
//! message, and its VAE tiles when only that fits.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use framelane_api::modellane::TransformerWeights;
use framelane_core::memory::fits;
use framelane_runner::cache::ModelRef;
use framelane_runner::generate::{JobRequest, run_job};
use framelane_runner::job;
use framelane_runner::memory::RunnerDevice;
use framelane_runner::placement::{MemoryMode, VaeTiling};
use framelane_runner::profile::{MemoryArgs, runner_memory};
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
    // A runner's flags with the lane defaults. Its fit check below is `None` on a CPU, which
    // checks nothing unless FRAMELANE_DEVICE_MEMORY_BYTES gives it a device memory.
    let args = MemoryArgs {
        memory_mode: MemoryMode::Auto,
        vae_tiling: VaeTiling::Auto,
        transformer_weights: TransformerWeights::Compute,
        device_memory_bytes: std::env::var("FRAMELANE_DEVICE_MEMORY_BYTES")
            .ok()
            .map(|bytes| bytes.parse())
            .transpose()
            .context("FRAMELANE_DEVICE_MEMORY_BYTES is a number of bytes")?,
        host_memory_bytes: None,
    };
    let precision = args.precision(Precision::BFLOAT16);
    let mut pipeline = WanPipeline::load(&spec, precision, device.device)?;
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
    let name = "example";
    let refs = [ModelRef {
        model: name.to_owned(),
        spec,
        modes: vec![job.mode],
    }];
    let size = job::size(&job);
    let vae_tiling = runner_memory(&args, &device, &refs, precision)?
        .map(|memory| fits(&memory, name, &size))
        .transpose()
        .map_err(|refused| anyhow!("{}", refused.message(&size, name)))?;
    let job = JobRequest { vae_tiling, ..job };
    let outcome = run_job(&mut pipeline, &device, &job, out.as_ref(), |p| {
        eprintln!("{} {}/{}", p.stage.as_str(), p.step, p.total_steps);
        StepControl::Continue
    });
    println!("memory: {:?}", outcome.memory?);
    println!("output: {:?}", outcome.result?);
    Ok(())
}
