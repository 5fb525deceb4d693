//! The GPU memory check (scripts/gpu-check.sh runs it): a Shared model cache alternating
//! anisora (image to video, two experts) and phr00t (text to video, one ComfyUI file) jobs on
//! one device, with a ballast allocation that leaves room for one model but not both, so
//! every switch must really free the old model.
//!
//!     gpu_check MODELS_DIR [JOBS]
//!
//! MODELS_DIR is from tests/make_tiny_wan_models.py (with `--heavy-gib` for heavy weights); the
//! models are the default install's VideoModels (examples/videomodels.yaml) in bfloat16.
//!
//! Prints one line per job and one table row per model (memory figures exclude the ballast)
//! and fails (exit 1) on any failed job, any OOM, a model whose peak reserved memory varies by
//! more than 2 % across its jobs, or more than one model's weights reserved after a cleanup.
//! Run it once per PYTORCH_CUDA_ALLOC_CONF setting (the allocator reads it at CUDA start).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use framelane_api::VideoModel;
use framelane_runner::cache::{LOAD_HEADROOM, LaneMode, ModelCache, ModelRef};
use framelane_runner::generate::{JobRequest, run_job};
use framelane_runner::job::model_ref;
use framelane_runner::memory::RunnerDevice;
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{MemoryPlan, Mode, Precision, WanPipeline};
use serde::Deserialize;
use tch::{Kind, Tensor};

const GIB: f64 = (1u64 << 30) as f64;
/// Free memory kept beyond one model's weights for a job's activations.
const ACTIVATIONS: u64 = 4 << 30;

#[derive(Default)]
struct ModelRow {
    jobs: u32,
    peak_reserved: Vec<i64>,
    after_cleanup_reserved: i64,
    retries: i64,
    ooms: i64,
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().context("usage: gpu_check MODELS_DIR [JOBS]")?);
    let jobs: u32 = match args.next() {
        Some(n) => n.parse().context("JOBS must be a number")?,
        None => 20,
    };
    let device = RunnerDevice::detect()?;
    // gpu-check.sh sets this when Python's torch sees a GPU: a check that quietly ran on the
    // CPU would prove nothing.
    if std::env::var_os("FRAMELANE_GPU_CHECK_EXPECT_CUDA").is_some()
        && device.device == tch::Device::Cpu
    {
        let why = framelane_runner::accel::load_cuda()
            .err()
            .unwrap_or_else(|| "libtorch_cuda loaded but sees no GPU".into());
        bail!("torch sees a GPU but this binary runs on the CPU: {why}");
    }
    let yaml = include_str!("../../examples/videomodels.yaml");
    let videomodels: Vec<VideoModel> = serde_yaml::Deserializer::from_str(yaml)
        .map(VideoModel::deserialize)
        .collect::<Result<_, _>>()?;
    let refs: Vec<ModelRef> = videomodels
        .iter()
        .map(|m| model_ref(m, &root).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let models: Vec<(String, u32)> = videomodels
        .iter()
        .map(|m| {
            (
                m.metadata.name.clone().unwrap_or_default(),
                m.spec.fixed_parameters.steps as u32,
            )
        })
        .collect();
    let image = std::fs::read(root.join("inputs/first-frame.png"))
        .context("MODELS_DIR has no inputs/first-frame.png")?;
    let mut weights = 0;
    let mut both = 0;
    for r in &refs {
        let bytes = WanPipeline::weight_bytes(&r.spec, Precision::BFLOAT16)?;
        weights = weights.max(bytes);
        both += bytes;
    }
    // Ballast: leave one model (with the load headroom) plus activations, and less than two.
    let ballast = match device.free_bytes()? {
        Some(free) => {
            let keep = (weights as f64 * LOAD_HEADROOM) as u64 + ACTIVATIONS;
            ensure!(
                both > keep,
                "models of {:.1} GiB together fit beside the largest one's room ({:.1} GiB): \
                 make them larger (--weight-gib)",
                both as f64 / GIB,
                keep as f64 / GIB
            );
            let size = free.saturating_sub(keep);
            Some(Tensor::empty([size as i64], (Kind::Uint8, device.device)))
        }
        None => None,
    };
    // What the ballast holds: subtracted from every figure so the spread is the models' own.
    let baseline = device.stats()?.reserved_current;
    let conf = std::env::var("PYTORCH_CUDA_ALLOC_CONF").unwrap_or_else(|_| "(unset)".into());
    println!(
        "device {}, PYTORCH_CUDA_ALLOC_CONF={conf}, largest model {:.2} GiB, ballast {:.2} GiB, {jobs} jobs",
        device.name(),
        weights as f64 / GIB,
        ballast.as_ref().map_or(0, |b| b.numel()) as f64 / GIB
    );

    let out = std::env::temp_dir().join("framelane-gpu-check");
    let modes: Vec<Mode> = refs.iter().map(|r| r.modes[0]).collect();
    let mut cache = ModelCache::new(
        LaneMode::Shared,
        device,
        Precision::BFLOAT16,
        MemoryPlan::default(),
        refs,
    )?;
    let mut rows: BTreeMap<&str, ModelRow> = BTreeMap::new();
    for i in 0..jobs {
        let which = i as usize % models.len();
        let (model, steps) = (models[which].0.as_str(), models[which].1);
        let started = Instant::now();
        let pipeline = cache
            .get(model)
            .with_context(|| format!("job {i}: loading {model}"))?;
        let loaded = started.elapsed().as_secs_f64();
        let mode = modes[which];
        let request = JobRequest {
            namespace: "gpu-check".into(),
            name: format!("job-{i}"),
            mode,
            prompt: format!("a fox, take {i}"),
            negative_prompt: Some("blurry".into()),
            image: (mode == Mode::ImageToVideo).then(|| image.clone()),
            width: 832,
            height: 480,
            frames: 81,
            fps: 16,
            steps,
            cfg: 1.0,
            seed: i,
        };
        let outcome = run_job(pipeline, &device, &request, &out, |_| StepControl::Continue);
        if let Err(e) = outcome.result {
            bail!("job {i} ({model}) failed: {e}");
        }
        let memory = outcome.memory?;
        let peak = memory.status.peak_reserved_bytes - baseline;
        let after_cleanup = memory.status.after_cleanup_reserved_bytes - baseline;
        println!(
            "job {i:>2} {model:<8} load {loaded:5.2} s, job {:5.2} s, peak reserved {:.3} GiB, after cleanup {:.3} GiB",
            started.elapsed().as_secs_f64() - loaded,
            peak as f64 / GIB,
            after_cleanup as f64 / GIB
        );
        let row = rows.entry(model).or_default();
        row.jobs += 1;
        row.peak_reserved.push(peak);
        row.after_cleanup_reserved = row.after_cleanup_reserved.max(after_cleanup);
        row.retries += memory.alloc_retries;
        row.ooms += memory.ooms;
        row.seconds += started.elapsed().as_secs_f64();
    }
    std::fs::remove_dir_all(&out).ok();

    println!(
        "| model | jobs | peak reserved min..max GiB | spread | after cleanup max GiB | retries | OOMs | s/job |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    for (model, row) in &rows {
        let min = *row.peak_reserved.iter().min().unwrap_or(&0);
        let max = *row.peak_reserved.iter().max().unwrap_or(&0);
        let spread = if min > 0 {
            (max - min) as f64 / min as f64
        } else {
            0.0
        };
        println!(
            "| {model} | {} | {:.3}..{:.3} | {:.2} % | {:.3} | {} | {} | {:.2} |",
            row.jobs,
            min as f64 / GIB,
            max as f64 / GIB,
            spread * 100.0,
            row.after_cleanup_reserved as f64 / GIB,
            row.retries,
            row.ooms,
            row.seconds / f64::from(row.jobs)
        );
        if row.ooms > 0 {
            failures.push(format!("{model}: {} OOMs", row.ooms));
        }
        // After a job only the loaded model may stay: more means the old model survived.
        if row.after_cleanup_reserved as f64 > weights as f64 * LOAD_HEADROOM {
            failures.push(format!(
                "{model}: {:.3} GiB still reserved after cleanup, more than one model ({:.3} GiB)",
                row.after_cleanup_reserved as f64 / GIB,
                weights as f64 / GIB
            ));
        }
        if spread > 0.02 {
            failures.push(format!(
                "{model}: peak reserved varies by {:.2} % (limit 2 %)",
                spread * 100.0
            ));
        }
    }
    drop(ballast);
    if !failures.is_empty() {
        bail!("GPU check failed: {}", failures.join("; "));
    }
    println!("GPU check passed: no OOM, peak reserved flat within 2 % per model");
    Ok(())
}
