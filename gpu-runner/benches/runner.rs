//! The runner against diffusers on this machine's CPU, in one run:
//! - seconds per denoising step and end to end (prompt to decoded frames) on the tiny models
//!   of tests/make_tiny_wan_models.py, float32, the same jobs, seeds and thread count, diffusers
//!   timed by tests/wan_pipeline_timing.py, the two alternating call by call so both see the
//!   same machine load; the ratio runner / diffusers;
//! - peak host memory while loading a transformer of Wan 2.1's 1.3B shape, whose random
//!   bfloat16 weights the bench writes to safetensors first, against the file's size;
//! - H.264 + MP4 encode time per 832x480 frame (a synthetic moving pattern).
//!
//!     eval "$(gpu-runner/scripts/setup-torch.sh)"; cargo bench -p framelane-runner --bench runner

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Lines, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use framelane_runner::image::Rgb8;
use framelane_runner::sampler::StepControl;
use framelane_runner::video;
use framelane_runner::wan::pipeline::{ModelFiles, ModelSpec, Precision, Request, WanPipeline};
use framelane_runner::wan::transformer::{TransformerConfig, WanTransformer};
use framelane_runner::wan::weights::TransformerCheckpoint;
use serde_json::{Value, json};
use tch::{Device, Kind};

/// Timed calls of each side per job, after one warm-up call each.
const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The timed jobs: text to video with cfg (two transformer calls a step) and image to video
/// with two experts at cfg 1.
fn cases() -> Vec<Value> {
    let job = json!({"prompt": "a red fox running through snow", "negativePrompt": "blurry",
        "width": 256, "height": 256, "frames": 17, "seed": 7});
    let with = |extra: Value| {
        let mut case = job.clone();
        for (k, v) in extra.as_object().unwrap() {
            case[k] = v.clone();
        }
        case
    };
    vec![
        with(
            json!({"name": "t2v (wan-t2v, UniPC, cfg 3)", "kind": "t2v", "model": "wan-t2v",
            "steps": 8, "guidance": 3.0}),
        ),
        with(
            json!({"name": "i2v (anisora, 2 experts, cfg 1)", "kind": "i2v", "model": "anisora",
            "image": "inputs/first-frame.png", "steps": 8, "guidance": 1.0}),
        ),
    ]
}

/// The runner side of a job: its model, loaded once.
struct Runner {
    pipeline: WanPipeline,
    image: Option<Vec<u8>>,
}

impl Runner {
    fn load(case: &Value) -> Runner {
        let spec = ModelSpec {
            files: ModelFiles::Diffusers(common::models().join(case["model"].as_str().unwrap())),
            solver: None,
            boundary_ratio: None,
        };
        Runner {
            pipeline: WanPipeline::load(&spec, Precision::FLOAT32, common::device().device)
                .unwrap(),
            image: case["image"]
                .as_str()
                .map(|path| std::fs::read(common::models().join(path)).unwrap()),
        }
    }

    /// Seconds per step (from the first step's end to the last's, over steps - 1) and end to
    /// end of one call, measured as the Python side measures them.
    fn time(&mut self, case: &Value) -> (f64, f64) {
        let (width, height) = (
            case["width"].as_i64().unwrap(),
            case["height"].as_i64().unwrap(),
        );
        let mut ends = Vec::new();
        let started = Instant::now();
        let image = self.image.as_ref().map(|bytes| {
            Rgb8::decode(bytes)
                .unwrap()
                .resize(width as usize, height as usize)
                .to_tensor()
        });
        let request = Request {
            prompt: case["prompt"].as_str().unwrap(),
            negative_prompt: case["negativePrompt"].as_str().unwrap(),
            width,
            height,
            frames: case["frames"].as_i64().unwrap(),
            steps: case["steps"].as_u64().unwrap() as u32,
            guidance: case["guidance"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            image: image.as_ref(),
        };
        let latents = self
            .pipeline
            .denoise(&request, &mut |_, _| {
                ends.push(Instant::now());
                StepControl::Continue
            })
            .unwrap();
        let frames = self.pipeline.decode(&latents).unwrap();
        assert!(frames.rgb.iter().any(|&v| v != frames.rgb[0]));
        let whole = started.elapsed().as_secs_f64();
        let span = ends[ends.len() - 1].duration_since(ends[0]).as_secs_f64();
        (span / (ends.len() - 1) as f64, whole)
    }
}

/// diffusers' side: tests/wan_pipeline_timing.py, one case per line in and out.
struct Diffusers {
    child: Child,
    answers: Lines<BufReader<ChildStdout>>,
}

impl Diffusers {
    fn start() -> Diffusers {
        let mut child = Command::new(common::python())
            .arg(common::tests_dir().join("wan_pipeline_timing.py"))
            .arg(common::models())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the torch Python runs");
        let stdout = child.stdout.take().unwrap();
        Diffusers {
            child,
            answers: BufReader::new(stdout).lines(),
        }
    }

    /// Seconds per step and end to end of one call, and diffusers' thread count.
    fn time(&mut self, case: &Value) -> ((f64, f64), i64) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{case}").unwrap();
        stdin.flush().unwrap();
        let line = self
            .answers
            .next()
            .expect("wan_pipeline_timing.py answered nothing (it failed: run it by hand)")
            .unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap();
        let number = |field: &str| answer[field].as_f64().unwrap();
        (
            (number("secondsPerStep"), number("secondsEndToEnd")),
            answer["threads"].as_i64().unwrap(),
        )
    }
}

fn main() {
    let device = common::device();
    println!(
        "runner bench: {}, libtorch {} intra-op threads, float32, median of {RUNS} calls after a warm-up, runner and diffusers alternating",
        device.name(),
        tch::get_num_threads()
    );
    let mut diffusers = Diffusers::start();
    println!(
        "| job (256x256, 17 frames, 8 steps) | runner s/step | diffusers s/step | ratio | runner s end to end | diffusers s end to end | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for case in cases() {
        let mut runner = Runner::load(&case);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut threads = 0;
        for run in 0..=RUNS {
            let mine = runner.time(&case);
            let (python, n) = diffusers.time(&case);
            threads = n;
            if run > 0 {
                ours.push(mine);
                theirs.push(python);
            }
        }
        let column = |v: &[(f64, f64)], first: bool| {
            median(v.iter().map(|p| if first { p.0 } else { p.1 }).collect())
        };
        let (step, whole) = (column(&ours, true), column(&ours, false));
        let (py_step, py_whole) = (column(&theirs, true), column(&theirs, false));
        println!(
            "| {} (diffusers {threads} threads) | {step:.4} | {py_step:.4} | {:.3} | {whole:.2} | {py_whole:.2} | {:.3} |",
            case["name"].as_str().unwrap(),
            step / py_step,
            whole / py_whole
        );
    }
    drop(diffusers.child.stdin.take());
    diffusers.child.wait().unwrap();

    load_memory();

    let frames = moving_pattern(832, 480, 81);
    let times = (0..=RUNS)
        .map(|_| {
            let started = Instant::now();
            let mp4 = video::encode_mp4(&frames, 16).unwrap();
            assert!(!mp4.is_empty());
            started.elapsed().as_secs_f64() / f64::from(frames.count)
        })
        .collect::<Vec<_>>();
    println!(
        "H.264 + MP4 encode, {}x{}, {} frames of a moving pattern: {:.2} ms per frame",
        frames.width,
        frames.height,
        frames.count,
        median(times[1..].to_vec()) * 1000.0
    );
}

/// Frames with edges, gradients and motion in every channel (the tiny models decode to
/// noise, and decoding 81 frames of 832x480 takes minutes on a CPU).
fn moving_pattern(width: u32, height: u32, count: u32) -> video::Frames {
    let mut rgb = Vec::with_capacity((width * height * count * 3) as usize);
    for t in 0..count {
        for y in 0..height {
            for x in 0..width {
                let (xs, ys) = (x + 3 * t, y + 2 * t);
                rgb.extend([
                    (xs ^ ys) as u8,
                    ((xs / 8 + ys / 8) % 2 * 200) as u8,
                    ((x * y + t * 97) % 251) as u8,
                ]);
            }
        }
    }
    video::Frames {
        width,
        height,
        count,
        rgb,
    }
}

/// Writes a random bfloat16 transformer of Wan 2.1's 1.3B shape and loads it onto the CPU,
/// printing the process's peak resident memory during the load against the file's size.
fn load_memory() {
    let config = TransformerConfig {
        num_attention_heads: 12,
        attention_head_dim: 128,
        ffn_dim: 8960,
        num_layers: 30,
        ..TransformerConfig::default()
    };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("transformer");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let parameters = write_random_bf16(&weights, &config);
    let file_bytes = std::fs::metadata(&weights).unwrap().len();
    reset_peak();
    let before = status_kib("VmRSS");
    let started = Instant::now();
    let checkpoint = TransformerCheckpoint::diffusers(&dir).unwrap();
    let model = WanTransformer::load(&checkpoint, Kind::BFloat16, Device::Cpu).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let peak = (status_kib("VmHWM") - before) * 1024;
    drop(model);
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    println!(
        "loading a 1.3B-shape transformer ({parameters} parameters, bfloat16, {:.2} GiB file) onto \
         the CPU: {seconds:.1} s, peak RSS +{:.2} GiB, peak / file = {:.3}",
        gib(file_bytes),
        gib(peak),
        peak as f64 / file_bytes as f64
    );
}

/// Writes every parameter the config needs as bfloat16 in [-0.05, 0.05), streaming, so the
/// writer holds no tensor: the values cycle through one random 16 MiB block, which is as good
/// as fresh noise for measuring memory.
fn write_random_bf16(path: &Path, config: &TransformerConfig) -> u64 {
    let parameters = config.parameters();
    let mut header = BTreeMap::new();
    let mut offset = 0u64;
    for (name, shape) in &parameters {
        let bytes = 2 * shape.iter().product::<i64>() as u64;
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = BufWriter::with_capacity(1 << 22, File::create(path).unwrap());
    out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&json).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let block: Vec<u8> = (0..8 << 20)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = ((state >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1;
            ((value.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect();
    let mut left = offset as usize;
    while left > 0 {
        let n = left.min(block.len());
        out.write_all(&block[..n]).unwrap();
        left -= n;
    }
    out.flush().unwrap();
    offset / 2
}

/// Resets VmHWM to the current RSS (Linux 4.0+).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS");
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}
