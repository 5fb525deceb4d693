//! The GPU memory check (scripts/gpu-check.sh runs it) on full-size Wan models with random
//! weights (scripts/make_full_size_wan.py): Wan 2.2 A14B image to video (two 14B experts) and
//! a 14B AllInOne text-to-video file with umT5-XXL and the Wan VAE.
//!
//!     gpu_check MODELS_DIR [--jobs N] [--sizes 832x480x81,1280x720x81] [--caps 80G,48G,24G]
//!               [--modes auto] [--steps N] [--diffusers PYTHON --diffusers-script PATH]
//!               [--show-refusal] [--tiny]
//!
//! For each memory cap (the GPU limited to that many bytes by a ballast allocation, standing for
//! a smaller card) and each size: N jobs alternating the two models on one Shared model cache,
//! in the memory mode `auto` picks for the cap (or in each of `--modes`), each job's VAE tiled
//! as a runner's fit check decides (`RunnerMemory::tiles`). A size the fit check refuses under a
//! cap is reported with its refusal and not run; with `--show-refusal` (on a GPU) the first such
//! job of each cap and mode is forced through anyway, in that mode, and must fail for memory.
//! Prints one line per job and one table row per model and stage: peak allocated and
//! reserved (max, and the spread of reserved across jobs), seconds, part-load seconds, retries
//! and OOMs; per model the switch time (from the files, and from host memory when the runner's
//! host budget holds both models) and seconds per denoising step, and with `--diffusers`
//! diffusers' seconds per step in the same mode (`--diffusers-script`:
//! scripts/gpu_check_diffusers.py, run with that Python) and the ratio. `--tiny` passes the
//! tiny shapes to that script (the CPU dry run). Exit 1 on any OOM or retry, a stage's peak
//! reserved varying by more than 2 % across a model's jobs, or a switch from host memory over
//! 30 s. Run it once per PYTORCH_CUDA_ALLOC_CONF setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use framelane_api::modellane::TransformerWeights;
use framelane_core::memory::{
    ANNOTATION_VERSION, ModelProfile, RunnerMemory, fits, resolve_mode, usable_bytes,
};
use framelane_runner::cache::{LaneMode, LoadedFrom, ModelCache, ModelRef};
use framelane_runner::check::check_models;
use framelane_runner::generate::{JobRequest, Stage, run_job};
use framelane_runner::job;
use framelane_runner::memory::{RunnerDevice, default_host_budget};
use framelane_runner::placement::{MemoryMode, VaeTiling};
use framelane_runner::profile::model_profile;
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{MemoryPlan, Mode, Precision};
use tch::{Kind, Tensor};

const GIB: f64 = (1u64 << 30) as f64;

/// Issue 16's target for a Shared lane's switch from pinned host memory.
const HOST_SWITCH_TARGET_SECONDS: f64 = 30.0;

struct Args {
    root: PathBuf,
    jobs: u32,
    sizes: Vec<(u32, u32, u32)>,
    caps: Vec<u64>,
    /// The memory modes run under each cap (`auto`: the one a runner picks for it).
    modes: Vec<MemoryMode>,
    steps: u32,
    /// The Python and the path of scripts/gpu_check_diffusers.py (passed in: a binary built
    /// elsewhere and carried to the GPU machine finds no source tree at its build path).
    diffusers: Option<(String, PathBuf)>,
    show_refusal: bool,
    tiny: bool,
    /// bfloat16, the experts' linear weights in fp8 under `--transformer-weights fp8`.
    precision: Precision,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        root: PathBuf::from(args.next().context(
            "usage: gpu_check MODELS_DIR [--jobs N] [--sizes WxHxF,..] [--caps 80G,..] \
             [--modes auto,..] [--steps N] [--diffusers PYTHON --diffusers-script PATH] \
             [--transformer-weights compute|fp8] [--show-refusal] [--tiny]",
        )?),
        jobs: 20,
        sizes: vec![(832, 480, 81), (1280, 720, 81)],
        caps: ["80G", "48G", "24G"]
            .iter()
            .map(|c| bytes(c))
            .collect::<anyhow::Result<_>>()?,
        modes: vec![MemoryMode::Auto],
        steps: 4,
        diffusers: None,
        show_refusal: false,
        tiny: false,
        precision: Precision::BFLOAT16,
    };
    let (mut python, mut script) = (None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--jobs" => parsed.jobs = value()?.parse().context("--jobs: a number")?,
            "--steps" => parsed.steps = value()?.parse().context("--steps: a number")?,
            "--sizes" => {
                parsed.sizes = value()?
                    .split(',')
                    .map(|s| {
                        let n: Vec<u32> = s.split('x').map(str::parse).collect::<Result<_, _>>()?;
                        ensure!(n.len() == 3, "a size is WIDTHxHEIGHTxFRAMES, got {s}");
                        Ok((n[0], n[1], n[2]))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--caps" => {
                parsed.caps = value()?
                    .split(',')
                    .map(bytes)
                    .collect::<anyhow::Result<_>>()?
            }
            "--modes" => {
                parsed.modes = value()?
                    .split(',')
                    .map(|m| {
                        MemoryMode::from_flag(m).with_context(|| {
                            let all = MemoryMode::ALL.map(MemoryMode::flag).join(", ");
                            format!("--modes: {m:?} is not one of {all}")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            "--transformer-weights" => {
                let weights = value()?;
                let weights = TransformerWeights::from_flag(&weights).with_context(|| {
                    format!("--transformer-weights: {weights:?} is not compute or fp8")
                })?;
                parsed.precision.fp8_transformers = weights == TransformerWeights::Fp8;
            }
            "--diffusers" => python = Some(value()?),
            "--diffusers-script" => script = Some(PathBuf::from(value()?)),
            "--show-refusal" => parsed.show_refusal = true,
            "--tiny" => parsed.tiny = true,
            other => bail!("unknown argument {other}"),
        }
    }
    parsed.diffusers = match (python, script) {
        (Some(python), Some(script)) => Some((python, script)),
        (None, None) => None,
        _ => bail!("--diffusers and --diffusers-script go together"),
    };
    ensure!(
        parsed.jobs >= 2 && parsed.steps >= 2,
        "--jobs and --steps must be at least 2"
    );
    Ok(parsed)
}

/// `80G` (GB, 10^9) or `12M` (MB) as bytes.
fn bytes(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let scale = match unit {
        "G" => 1e9,
        "M" => 1e6,
        _ => bail!("a cap is a number of GB or MB such as 80G or 12M, got {text:?}"),
    };
    Ok((number.parse::<f64>().context("a cap's number")? * scale) as u64)
}

/// One stage of one job; reserved bytes above the ballast.
struct StageRun {
    allocated: i64,
    reserved: i64,
    seconds: f64,
    load_seconds: f64,
    retries: i64,
}

/// One model's figures over one configuration's jobs.
#[derive(Default)]
struct Row {
    jobs: u32,
    failures: Vec<String>,
    /// Per stage, one entry per job.
    stages: BTreeMap<String, Vec<StageRun>>,
    /// Switches to the model, from its files and from host memory.
    switch_seconds: BTreeMap<LoadedFrom, Vec<f64>>,
    step_seconds: Vec<f64>,
    ooms: i64,
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
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
    let models = check_models(&args.root);
    let image = std::fs::read(args.root.join("inputs/first-frame.png"))
        .context("MODELS_DIR has no inputs/first-frame.png (make_full_size_wan.py writes it)")?;
    // What a runner reads at start, for `auto` and its fit check.
    let mut profiles = BTreeMap::new();
    for (r, _) in &models {
        profiles.insert(
            r.model.clone(),
            model_profile(&r.spec.files, args.precision, device.device)?,
        );
    }
    let all: Vec<&ModelProfile> = profiles.values().collect();
    let conf = std::env::var("PYTORCH_CUDA_ALLOC_CONF").unwrap_or_else(|_| "(unset)".into());
    let mut failed = Vec::new();
    for (&cap, &requested) in args
        .caps
        .iter()
        .flat_map(|cap| args.modes.iter().map(move |mode| (cap, mode)))
    {
        let budget = usable_bytes(cap);
        // The lane's mode (under `auto`, what a Shared runner of both models resolves it to
        // under the cap), and what that runner reports and checks each job against (its VAE
        // tiling as it decides per job).
        let fit = RunnerMemory {
            v: ANNOTATION_VERSION,
            device_bytes: cap,
            budget_bytes: budget,
            mode: resolve_mode(requested, &all, budget),
            vae_tiling: VaeTiling::Auto,
            models: profiles.clone(),
        };
        let mut shown = !args.show_refusal;
        for &size in &args.sizes {
            let refused: Vec<(&ModelRef, String)> = models
                .iter()
                .filter_map(|(r, _)| {
                    let job = job::size(&job_request(r, 0, &image, size, args.steps, &fit));
                    let refused = fits(&fit, &r.model, &job).err()?;
                    Some((r, refused.message(&job, "gpu-check")))
                })
                .collect();
            for (r, why) in &refused {
                println!(
                    "\ncap {:.3} GB, mode {:?}, {size:?}: the fit check refuses {}: {why}",
                    cap as f64 / 1e9,
                    fit.mode,
                    r.model
                );
            }
            if let Some((r, _)) = refused.first() {
                if !shown {
                    shown = true;
                    if let Err(e) = show_refusal(&args, &device, r, &image, &fit, size) {
                        failed.push(format!("cap {:.3} GB, {size:?}: {e}", cap as f64 / 1e9));
                    }
                }
                continue;
            }
            let rows = run_config(&args, &device, &models, &image, &fit, size, &conf)?;
            for (model, row) in &rows {
                failed.extend(
                    row.failures
                        .iter()
                        .map(|f| format!("cap {:.3} GB, {size:?}, {model}: {f}", cap as f64 / 1e9)),
                );
            }
            let mode = fit.mode;
            if let Some((python, script)) = &args.diffusers {
                for (r, kind) in &models {
                    let row = &rows[&r.model];
                    let theirs = diffusers_step(&args, python, script, kind, size, mode, cap)?;
                    let ours = mean(&row.step_seconds);
                    println!(
                        "{:<5} s/step: runner {ours:.3}, diffusers {theirs:.3} ({}), ratio {:.3}",
                        r.model,
                        if mode == MemoryMode::Resident {
                            "resident"
                        } else {
                            "model cpu offload"
                        },
                        ours / theirs
                    );
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("GPU check failed: {}", failed.join("; "));
    }
    println!("\nGPU check passed: no OOM, no retry, peak reserved per stage flat within 2 %");
    Ok(())
}

fn run_config(
    args: &Args,
    device: &RunnerDevice,
    models: &[(ModelRef, &'static str)],
    image: &[u8],
    fit: &RunnerMemory,
    (width, height, frames): (u32, u32, u32),
    conf: &str,
) -> anyhow::Result<BTreeMap<String, Row>> {
    let (cap, mode) = (fit.device_bytes, fit.mode);
    let ballast = ballast(device, cap)?;
    let baseline = device.stats()?.reserved_current;
    println!(
        "\ndevice {}, PYTORCH_CUDA_ALLOC_CONF={conf}, cap {:.3} GB, mode {mode:?}, {width}x{height}x{frames}, {} steps, {} jobs, transformer weights {}",
        device.name(),
        cap as f64 / 1e9,
        args.steps,
        args.jobs,
        if args.precision.fp8_transformers {
            "fp8"
        } else {
            "bf16"
        }
    );
    let plan = MemoryPlan {
        mode,
        vae_tiling: VaeTiling::Auto,
        ..MemoryPlan::default()
    };
    let refs = models.iter().map(|(r, _)| r.clone()).collect();
    let host_budget = default_host_budget().unwrap_or(0);
    let mut cache = ModelCache::new(LaneMode::Shared, *device, args.precision, plan, refs)?
        .with_host_budget(host_budget)?;
    println!(
        "host budget {:.1} GB: the models wait in host memory between switches: {}",
        host_budget as f64 / 1e9,
        cache.keeps_in_host()
    );
    // Not gpu-check.sh's default work directory (framelane-gpu-check), which holds the models.
    let out = std::env::temp_dir().join(format!("gpu-check-videos-{}", std::process::id()));
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for i in 0..args.jobs {
        let (r, _) = &models[i as usize % models.len()];
        let row = rows.entry(r.model.clone()).or_default();
        row.jobs += 1;
        if let Err(e) = cache.get(&r.model) {
            row.failures.push(format!("job {i}: loading failed: {e}"));
            continue;
        }
        let (switch, from) = (cache.last_load_seconds(), cache.last_load_from());
        let host_bytes = cache.host_bytes();
        let pipeline = cache.get(&r.model)?;
        let request = job_request(r, i, image, (width, height, frames), args.steps, fit);
        let started = Instant::now();
        let mut step_ends = Vec::new();
        let outcome = run_job(pipeline, device, &request, &out, |p| {
            if p.stage == Stage::Denoising {
                step_ends.push(Instant::now());
            }
            StepControl::Continue
        });
        let seconds = started.elapsed().as_secs_f64();
        // As diffusers' side measures it: from the first step's end to the last's.
        if let [first, .., last] = step_ends[..] {
            row.step_seconds
                .push((last - first).as_secs_f64() / (step_ends.len() - 1) as f64);
        }
        let memory = outcome.memory?;
        row.ooms += memory.ooms;
        if let Err(e) = outcome.result {
            row.failures.push(format!("job {i}: {e}"));
        }
        if switch > 0.0 {
            row.switch_seconds.entry(from).or_default().push(switch);
        }
        let mut line = format!(
            "job {i:>2} {:<5} switch {switch:6.2} s from {:<5}, host {:6.3} GB, job {seconds:6.2} s, tiled {}",
            r.model,
            from.as_str(),
            host_bytes as f64 / 1e9,
            memory.status.vae_tiled.unwrap_or(false)
        );
        for s in &memory.status.stages {
            line += &format!(
                ", {} {:.2}/{:.2} GiB {:.2} s",
                s.stage,
                s.peak_allocated_bytes as f64 / GIB,
                (s.peak_reserved_bytes - baseline) as f64 / GIB,
                s.seconds
            );
            row.stages
                .entry(s.stage.clone())
                .or_default()
                .push(StageRun {
                    allocated: s.peak_allocated_bytes,
                    reserved: s.peak_reserved_bytes - baseline,
                    seconds: s.seconds,
                    load_seconds: s.load_seconds,
                    retries: s.alloc_retries,
                });
        }
        println!("{line}");
    }
    std::fs::remove_dir_all(&out).ok();
    drop(cache);
    drop(ballast);
    println!(
        "| model | stage | jobs | peak allocated max GiB | peak reserved min..max GiB | spread | s | load s | retries | OOMs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (model, row) in rows.iter_mut() {
        for (stage, runs) in &row.stages {
            let reserved: Vec<i64> = runs.iter().map(|r| r.reserved).collect();
            let (min, max) = (
                *reserved.iter().min().unwrap_or(&0),
                *reserved.iter().max().unwrap_or(&0),
            );
            let spread = if min > 0 {
                (max - min) as f64 / min as f64
            } else {
                0.0
            };
            let retries: i64 = runs.iter().map(|r| r.retries).sum();
            println!(
                "| {model} | {stage} | {} | {:.3} | {:.3}..{:.3} | {:.2} % | {:.2} | {:.2} | {retries} | {} |",
                runs.len(),
                runs.iter().map(|r| r.allocated).max().unwrap_or(0) as f64 / GIB,
                min as f64 / GIB,
                max as f64 / GIB,
                spread * 100.0,
                mean(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>()),
                mean(&runs.iter().map(|r| r.load_seconds).collect::<Vec<_>>()),
                row.ooms
            );
            if spread > 0.02 {
                row.failures.push(format!(
                    "{stage}: peak reserved varies by {:.2} %",
                    spread * 100.0
                ));
            }
            if retries > 0 {
                row.failures
                    .push(format!("{stage}: {retries} allocator retries"));
            }
        }
        if row.ooms > 0 {
            row.failures.push(format!("{} OOMs", row.ooms));
        }
        let mut switches = String::new();
        for (from, seconds) in &row.switch_seconds {
            let slowest = seconds.iter().copied().fold(0.0, f64::max);
            switches += &format!(
                "from {} {:.2} s on average, {slowest:.2} s at most over {}; ",
                from.as_str(),
                mean(seconds),
                seconds.len()
            );
            if *from == LoadedFrom::Host && slowest > HOST_SWITCH_TARGET_SECONDS {
                row.failures.push(format!(
                    "a switch from host memory took {slowest:.2} s (target {HOST_SWITCH_TARGET_SECONDS} s)"
                ));
            }
        }
        println!(
            "{model}: switch {switches}{:.3} s per denoising step",
            mean(&row.step_seconds)
        );
    }
    Ok(rows)
}

/// A ballast that leaves `cap` bytes of the GPU free, as a card of that size would have
/// (`None` on the CPU).
fn ballast(device: &RunnerDevice, cap: u64) -> anyhow::Result<Option<Tensor>> {
    let Some(free) = device.free_bytes()? else {
        return Ok(None);
    };
    ensure!(
        free > cap,
        "the GPU has {free} bytes free, less than the cap {cap}"
    );
    Ok(Some(Tensor::empty(
        [(free - cap) as i64],
        (Kind::Uint8, device.device),
    )))
}

/// Job `i` of `r`, its VAE tiled as a runner reporting `fit` would tile it.
fn job_request(
    r: &ModelRef,
    i: u32,
    image: &[u8],
    (width, height, frames): (u32, u32, u32),
    steps: u32,
    fit: &RunnerMemory,
) -> JobRequest {
    let request = JobRequest {
        namespace: "gpu-check".into(),
        name: format!("job-{i}"),
        mode: r.modes[0],
        prompt: format!("a fox, take {i}"),
        negative_prompt: None,
        image: (r.modes[0] == Mode::ImageToVideo).then(|| image.to_vec()),
        width,
        height,
        frames,
        fps: 16,
        steps,
        cfg: 1.0,
        seed: i,
        vae_tiling: None,
    };
    JobRequest {
        vae_tiling: Some(fit.tiles(&r.model, &job::size(&request))),
        ..request
    }
}

/// A job of `r` the fit check refuses under a runner reporting `fit`, forced: one job in
/// that runner's mode and tiling under the ballast, which must fail for memory. Not shown on
/// the CPU (no ballast).
fn show_refusal(
    args: &Args,
    device: &RunnerDevice,
    r: &ModelRef,
    image: &[u8],
    fit: &RunnerMemory,
    size: (u32, u32, u32),
) -> anyhow::Result<()> {
    let Some(ballast) = ballast(device, fit.device_bytes)? else {
        println!("  the refusal is not shown on the CPU (no ballast to stand for a smaller card)");
        return Ok(());
    };
    let plan = MemoryPlan {
        mode: fit.mode,
        vae_tiling: VaeTiling::Auto,
        ..MemoryPlan::default()
    };
    let mut cache = ModelCache::new(
        LaneMode::Dedicated,
        *device,
        args.precision,
        plan,
        vec![r.clone()],
    )?;
    let out = std::env::temp_dir().join(format!("gpu-check-refusal-{}", std::process::id()));
    let outcome = cache.get(&r.model).map(|pipeline| {
        run_job(
            pipeline,
            device,
            &job_request(r, 0, image, size, args.steps, fit),
            &out,
            |_| StepControl::Continue,
        )
    });
    std::fs::remove_dir_all(&out).ok();
    drop(cache);
    drop(ballast);
    let (failure, ooms) = match outcome {
        Err(e) => (Some(e.to_string()), 0),
        Ok(job) => (
            job.result.err().map(|e| e.to_string()),
            job.memory.map_or(0, |m| m.ooms),
        ),
    };
    match failure {
        Some(why) if ooms > 0 || why.contains("out of memory") => {
            println!(
                "  forced in {}, {} fails as refused ({ooms} OOMs): {why}",
                fit.mode.as_str(),
                r.model
            );
            Ok(())
        }
        Some(why) => bail!(
            "{} forced where the fit check refuses it failed, not for memory: {why}",
            r.model
        ),
        None => bail!(
            "{} ran in {} where the fit check refuses it",
            r.model,
            fit.mode.as_str()
        ),
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// diffusers' seconds per step for the same model shape, size and mode.
#[allow(clippy::too_many_arguments)]
fn diffusers_step(
    args: &Args,
    python: &str,
    script: &Path,
    kind: &str,
    (width, height, frames): (u32, u32, u32),
    mode: MemoryMode,
    cap: u64,
) -> anyhow::Result<f64> {
    let mode = if mode == MemoryMode::Resident {
        "resident"
    } else {
        "offload"
    };
    let mut command = Command::new(python);
    command.arg(script).arg(&args.root).arg(kind);
    for n in [width, height, frames, args.steps] {
        command.arg(n.to_string());
    }
    command.arg(mode).arg(cap.to_string());
    if args.tiny {
        command.arg("--tiny");
    }
    if args.precision.fp8_transformers {
        command.arg("--fp8");
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))
        .with_context(|| format!("diffusers printed {line:?}"))?;
    json["sPerStep"]
        .as_f64()
        .context("no sPerStep in diffusers' answer")
}
