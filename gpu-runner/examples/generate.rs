//! Runs one job from the command line, without Kubernetes:
//!
//!     cargo run -p framelane-runner --example generate -- PACKAGE_DIR OUT_DIR "a prompt" \
//!         [WIDTH HEIGHT FRAMES SEED]
//!
//! writes OUT_DIR/default/example/{video.mp4,preview.png} and prints the output and memory.

use anyhow::{Context, bail};
use framelane_runner::generate::{JobRequest, run_job};
use framelane_runner::memory::RunnerDevice;
use framelane_runner::package::ModelPackage;
use framelane_runner::sampler::StepControl;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [package, out, prompt, rest @ ..] = args.as_slice() else {
        bail!("usage: generate PACKAGE_DIR OUT_DIR PROMPT [WIDTH HEIGHT FRAMES SEED]");
    };
    let num = |i: usize, default: u32| -> anyhow::Result<u32> {
        rest.get(i)
            .map(|s| s.parse().context("WIDTH HEIGHT FRAMES SEED are numbers"))
            .unwrap_or(Ok(default))
    };
    let device = RunnerDevice::detect()?;
    let model = ModelPackage::load(package.as_ref(), device.device, None)?;
    let job = JobRequest {
        namespace: "default".to_owned(),
        name: "example".to_owned(),
        prompt: prompt.clone(),
        negative_prompt: None,
        width: num(0, 64)?,
        height: num(1, 64)?,
        frames: num(2, 17)?,
        fps: None,
        cfg: None,
        seed: num(3, 0)?,
    };
    let outcome = run_job(&model, &device, &job, out.as_ref(), |p| {
        eprintln!("{} {}/{}", p.stage.as_str(), p.step, p.total_steps);
        StepControl::Continue
    });
    println!("memory: {:?}", outcome.memory?);
    println!("output: {:?}", outcome.result?);
    Ok(())
}
