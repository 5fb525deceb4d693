//! The memory modes on the CPU standing in for a GPU (the shim's counting allocator is "the
//! device"; offloaded weights wait in host memory it does not count), on the tiny two-expert
//! image-to-video model (anisora) and the one-transformer text-to-video model (phr00t):
//! - every mode gives the same video, byte for byte, as resident;
//! - parts really move: between stages the device holds only what the mode keeps, and after
//!   the job only what it keeps resident;
//! - each stage's peak falls from resident to expert-swap (denoising) and again to
//!   model-offload (prompt encoding, decoding);
//! - a tiled decode peaks lower than an untiled one and stays within 3 levels of 255 of it;
//! - fp8 storage of the transformer's linear weights holds fewer bytes by exactly what the
//!   weights' sizes say, lowers the denoising peak, and works under model offload.
//!
//! One test per binary: the live-byte count is process-wide.

mod common;

use std::collections::BTreeMap;

use framelane_api::videojob::StageMemoryReport;
use framelane_runner::generate::{JobRequest, Progress, Stage, run_job};
use framelane_runner::placement::{MemoryMode, PartBytes, Placement, VaeTiling};
use framelane_runner::sampler::StepControl;
use framelane_runner::video::Frames;
use framelane_runner::wan::pipeline::{MemoryPlan, Precision, Request, WanPipeline};
use tch::{Device, Kind, Tensor};

/// What one job left: its video's hash, its stages, and the device's live bytes at each
/// progress report (above the bytes alive before the model was loaded).
struct Run {
    sha256: String,
    stages: BTreeMap<String, StageMemoryReport>,
    live_at: Vec<(Stage, u32, i64)>,
    after_load: i64,
    after_job: i64,
    bytes: PartBytes,
    placement: Placement,
}

fn run(model: &str, mode: MemoryMode, job: &JobRequest) -> Run {
    run_in(model, mode, Precision::FLOAT32, job)
}

fn run_in(model: &str, mode: MemoryMode, precision: Precision, job: &JobRequest) -> Run {
    let device = common::device();
    let live = || device.stats().unwrap().allocated_current;
    let baseline = live();
    let plan = MemoryPlan {
        mode,
        vae_tiling: VaeTiling::Off,
        ..MemoryPlan::default()
    };
    let mut pipeline =
        WanPipeline::load_with(&common::model(model).spec, precision, device.device, plan)
            .unwrap_or_else(|e| panic!("{e}"));
    let after_load = live() - baseline;
    let out = tempfile::tempdir().unwrap();
    let mut live_at = Vec::new();
    let outcome = run_job(&mut pipeline, &device, job, out.path(), |p: &Progress| {
        live_at.push((p.stage, p.step, live() - baseline));
        StepControl::Continue
    });
    let video = outcome.result.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    let memory = outcome.memory.unwrap();
    assert_eq!(
        memory.status.memory_mode.as_deref(),
        Some(pipeline.placement().as_str())
    );
    assert_eq!(memory.status.vae_tiled, Some(false));
    let run = Run {
        sha256: video.sha256,
        stages: memory
            .status
            .stages
            .into_iter()
            .map(|s| (s.stage.clone(), s))
            .collect(),
        live_at,
        after_load,
        after_job: live() - baseline,
        bytes: pipeline.bytes(),
        placement: pipeline.placement(),
    };
    drop(pipeline);
    assert_eq!(
        live(),
        baseline,
        "{mode:?}: dropping the model frees it all"
    );
    run
}

/// Live bytes at the first progress report of `stage`.
fn live_at(run: &Run, stage: Stage) -> i64 {
    run.live_at
        .iter()
        .find(|(s, _, _)| *s == stage)
        .map(|(_, _, bytes)| *bytes)
        .unwrap_or_else(|| panic!("no {stage:?} progress"))
}

fn peak(run: &Run, stage: &str) -> i64 {
    run.stages
        .get(stage)
        .unwrap_or_else(|| panic!("no {stage} stage in {:?}", run.stages.keys()))
        .peak_allocated_bytes
}

const KIB: i64 = 1024;

/// Within `slack` bytes above `expected` (small tensors beside the weights: the latents, the
/// prompt embeddings, rotary tables), never below.
fn assert_about(label: &str, found: i64, expected: u64, slack: i64) {
    let expected = expected as i64;
    println!("{label}: {found} bytes (weights {expected})");
    assert!(
        (expected..=expected + slack).contains(&found),
        "{label}: {found} bytes live, expected {expected} (+{slack})"
    );
}

fn print_stages(label: &str, run: &Run) {
    for s in run.stages.values() {
        println!(
            "{label} {:<14} peak allocated {:>9} B, {:.3} s (load {:.3} s), retries {}",
            s.stage, s.peak_allocated_bytes, s.seconds, s.load_seconds, s.alloc_retries
        );
    }
}

#[test]
fn modes_give_the_same_video_and_keep_only_their_parts_on_the_device() {
    let job = common::job("anisora", "modes", 7);
    let resident = run("anisora", MemoryMode::Resident, &job);
    let swap = run("anisora", MemoryMode::ExpertSwap, &job);
    let offload = run("anisora", MemoryMode::ModelOffload, &job);
    let b = resident.bytes;
    let (high, low) = (b.transformer, b.transformer_2.expect("two experts"));
    println!("parts of anisora: {b:?}");
    // Beside the weights: each transformer's rotary tables, the latents, the embeddings.
    let slack = 1536 * KIB;
    assert_eq!(
        (resident.placement, swap.placement, offload.placement),
        (
            Placement::Resident,
            Placement::ExpertSwap,
            Placement::ModelOffload
        )
    );
    for (label, run) in [
        ("resident", &resident),
        ("expert-swap", &swap),
        ("model-offload", &offload),
    ] {
        print_stages(label, run);
    }

    // Same seed, same video: the weights are copied exactly, so the bytes are identical.
    assert_eq!(
        swap.sha256, resident.sha256,
        "expert-swap changed the video"
    );
    assert_eq!(
        offload.sha256, resident.sha256,
        "model-offload changed the video"
    );

    // After load and after the job, only what the mode keeps resident is on the device.
    assert_about("resident after load", resident.after_load, b.all(), slack);
    assert_about("resident after the job", resident.after_job, b.all(), slack);
    let kept = b.text_encoder + b.vae;
    assert_about("expert-swap after load", swap.after_load, kept, slack);
    assert_about("expert-swap after the job", swap.after_job, kept, slack);
    assert_about("model-offload after load", offload.after_load, 0, slack);
    assert_about("model-offload after the job", offload.after_job, 0, slack);

    // Between stages: during denoising expert-swap holds one expert beside the text
    // encoder and the VAE, model-offload one expert alone (the text encoder went back);
    // before decoding both have sent the experts back.
    let denoising = |run: &Run| -> Vec<i64> {
        run.live_at
            .iter()
            .filter(|(s, _, _)| *s == Stage::Denoising)
            .map(|(_, _, bytes)| *bytes)
            .collect()
    };
    for bytes in denoising(&swap) {
        assert!(
            bytes >= (kept + high.min(low)) as i64
                && bytes <= (kept + high.max(low)) as i64 + slack,
            "expert-swap holds {bytes} bytes during denoising; one expert is {high}"
        );
    }
    for bytes in denoising(&offload) {
        assert!(
            bytes >= high.min(low) as i64 && bytes <= high.max(low) as i64 + slack,
            "model-offload holds {bytes} bytes during denoising; one expert is {high}"
        );
    }
    assert_about(
        "expert-swap before decoding",
        live_at(&swap, Stage::Decoding),
        kept,
        slack,
    );
    assert_about(
        "model-offload before decoding",
        live_at(&offload, Stage::Decoding),
        0,
        slack,
    );

    // Peaks per stage: expert-swap below resident while denoising (one expert, not two);
    // model-offload below expert-swap while encoding the prompt, the image and decoding
    // (one part, not the text encoder and the VAE together).
    assert!(peak(&swap, "Denoising") < peak(&resident, "Denoising"));
    assert!(peak(&swap, "Denoising") + low as i64 <= peak(&resident, "Denoising") + slack);
    for stage in ["EncodingPrompt", "EncodingImage", "Decoding"] {
        assert!(
            peak(&offload, stage) < peak(&swap, stage),
            "{stage}: model-offload {} >= expert-swap {}",
            peak(&offload, stage),
            peak(&swap, stage)
        );
    }
    for run in [&resident, &swap, &offload] {
        assert_eq!(run.stages.len(), 4, "{:?}", run.stages.keys());
        assert!(run.stages.values().all(|s| s.alloc_retries == 0));
    }
    assert_eq!(resident.stages["Denoising"].load_seconds, 0.0);
    assert!(swap.stages["Denoising"].load_seconds > 0.0);
    assert!(offload.stages["EncodingPrompt"].load_seconds > 0.0);

    // A one-transformer model: expert-swap keeps it resident, model-offload does not, and
    // both make the same video.
    let text = common::job("phr00t", "modes-t2v", 5);
    let single = run("phr00t", MemoryMode::ExpertSwap, &text);
    let single_offload = run("phr00t", MemoryMode::ModelOffload, &text);
    assert_eq!(single.placement, Placement::Resident);
    assert_eq!(single_offload.sha256, single.sha256);
    assert_about(
        "one transformer, model-offload after the job",
        single_offload.after_job,
        0,
        slack,
    );

    // fp8 storage: the transformer's linear weights in float8 (rounded from the float32
    // file), resident and offloaded.
    let fp8 = Precision {
        fp8_transformers: true,
        ..Precision::FLOAT32
    };
    let stored = run_in("phr00t", MemoryMode::Resident, fp8, &text);
    let stored_offload = run_in("phr00t", MemoryMode::ModelOffload, fp8, &text);
    let saved = single.bytes.transformer - stored.bytes.transformer;
    println!(
        "fp8 storage: transformer {} B (float32: {} B); after load {} B (float32: {} B); \
         denoising peak {} B (float32: {} B)",
        stored.bytes.transformer,
        single.bytes.transformer,
        stored.after_load,
        single.after_load,
        peak(&stored, "Denoising"),
        peak(&single, "Denoising")
    );
    assert!(saved > 0);
    assert_eq!(single.after_load - stored.after_load, saved as i64);
    assert!(peak(&stored, "Denoising") < peak(&single, "Denoising"));
    assert_ne!(
        stored.sha256, single.sha256,
        "rounded weights, another video"
    );
    assert_eq!(stored_offload.sha256, stored.sha256);
    assert_about(
        "fp8 storage, model-offload after the job",
        stored_offload.after_job,
        0,
        slack,
    );

    tiled_decoding_peaks_lower_and_stays_close();
}

/// Decodes the same latents untiled and in diffusers' tiles (256 pixels every 192) on one
/// model, as the decoding stage.
fn tiled_decoding_peaks_lower_and_stays_close() {
    let device = common::device();
    let decode = |vae_tiling: VaeTiling| -> (Frames, StageMemoryReport, bool) {
        let plan = MemoryPlan {
            mode: MemoryMode::Resident,
            vae_tiling,
            ..MemoryPlan::default()
        };
        let mut pipeline = WanPipeline::load_with(
            &common::model("phr00t").spec,
            Precision::FLOAT32,
            device.device,
            plan,
        )
        .unwrap();
        let request = Request {
            prompt: "a lighthouse at night",
            negative_prompt: "",
            width: 480,
            height: 320,
            frames: 5,
            steps: 1,
            guidance: 1.0,
            seed: 11,
            image: None,
        };
        let [_, c, t, h, w] = pipeline.latent_shape(&request).unwrap();
        tch::manual_seed(3);
        let latents = Tensor::randn([1, c, t, h, w], (Kind::Float, Device::Cpu));
        pipeline.take_stages();
        let before = device.stats().unwrap().allocated_current;
        let frames = pipeline.decode(&latents).unwrap();
        let tiled = pipeline.vae_tiled();
        let mut stage = pipeline.take_stages().pop().unwrap();
        stage.peak_allocated_bytes -= before;
        (frames, stage, tiled)
    };
    let (whole, untiled, was_tiled) = decode(VaeTiling::Off);
    let (tiles, tiled, is_tiled) = decode(VaeTiling::On);
    assert!(!was_tiled && is_tiled);
    assert_eq!(tiled.stage, "Decoding");
    println!(
        "decoding 480x320x5: untiled peak {} B, tiled peak {} B above weights and latents",
        untiled.peak_allocated_bytes, tiled.peak_allocated_bytes
    );
    assert!(
        tiled.peak_allocated_bytes < untiled.peak_allocated_bytes,
        "tiled decoding peaked at {} B, untiled at {} B",
        tiled.peak_allocated_bytes,
        untiled.peak_allocated_bytes
    );
    assert_eq!(
        (tiles.count, tiles.width, tiles.height),
        (whole.count, whole.width, whole.height)
    );
    let a = Tensor::from_slice(&whole.rgb).to_kind(Kind::Float);
    let b = Tensor::from_slice(&tiles.rgb).to_kind(Kind::Float);
    let mean = (&a - &b).abs().mean(Kind::Float).double_value(&[]);
    println!("tiled vs untiled frames: mean |difference| {mean:.3} of 255");
    assert!(
        mean <= 3.0,
        "tiled frames differ by {mean:.3} levels on average"
    );
}
