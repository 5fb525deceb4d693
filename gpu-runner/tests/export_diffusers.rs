//! scripts/export_diffusers.py on a tiny random-weight diffusers WanPipeline (the real
//! diffusers and transformers classes, saved with save_pretrained): the package it writes
//! loads in the runner, tokenizes like the pipeline, reproduces the pipeline's latents and
//! frames from the same noise and sigmas, and becomes an MP4.

mod common;

use std::path::{Path, PathBuf};

use framelane_runner::generate::{self, JobRequest, Progress, decode, run_job};
use framelane_runner::package::ModelPackage;
use framelane_runner::sampler::StepControl;
use serde_json::json;
use tch::{Kind, Tensor};

/// The tiny pipeline and its float32 and bfloat16 exports, made once.
struct Fixture {
    _dir: tempfile::TempDir,
    pipeline: PathBuf,
    float32: PathBuf,
    bfloat16: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = dir.path().join("pipeline");
        common::run_python("make_tiny_wan_pipeline.py", &[&pipeline], None);
        let export = |dtype: &str| {
            let out = dir.path().join(dtype);
            let args = [
                "--model",
                "anisora",
                "--steps",
                "8",
                "--shift",
                "5.0",
                "--cfg",
                "3.0",
                "--text-length",
                "16",
                "--fps",
                "8",
                "--dtype",
                dtype,
            ];
            let mut all: Vec<&Path> = vec![&pipeline, &out];
            all.extend(args.iter().map(Path::new));
            common::run_python("../scripts/export_diffusers.py", &all, None);
            out
        };
        Fixture {
            float32: export("float32"),
            bfloat16: export("bfloat16"),
            pipeline,
            _dir: dir,
        }
    })
}

fn job(prompt: &str) -> JobRequest {
    JobRequest {
        prompt: prompt.to_owned(),
        negative_prompt: Some("blurry".to_owned()),
        width: 32,
        height: 48,
        frames: 9,
        ..common::job("exported", 42)
    }
}

fn read_f32(path: &Path, shape: &[i64]) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_slice(&values).view(shape)
}

#[test]
fn the_exported_package_reproduces_the_diffusers_pipeline() {
    let device = common::cpu();
    let fx = fixture();
    let pkg = ModelPackage::load(&fx.float32, device.device, Some(8)).unwrap();
    let m = &pkg.manifest;
    assert_eq!(
        (m.latent_channels, m.temporal_stride, m.spatial_stride),
        (16, 4, 8)
    );

    let prompts = [
        "a red fox running through snow",
        "  a   cat\tsurfing at\n dusk  ",
        "Ünïcode: the dog, on the beach!",
        "a fox and a dog and a cat on the beach at dusk in the snow with the red fox",
        "",
    ];
    let request = job("a red fox running through snow");
    let work = tempfile::tempdir().unwrap();
    let (latents_out, frames_out) = (work.path().join("latents"), work.path().join("frames"));
    let case = json!({
        "prompts": prompts, "textLength": m.text_length, "prompt": request.prompt,
        "negativePrompt": request.negative_prompt, "width": request.width, "height": request.height,
        "frames": request.frames, "seed": request.seed, "sigmas": m.sigmas(), "cfg": m.cfg,
        "latentsOut": latents_out, "framesOut": frames_out,
    });
    let reference: serde_json::Value = serde_json::from_str(&common::run_python(
        "diffusers_reference.py",
        &[&fx.pipeline],
        Some(&case.to_string()),
    ))
    .unwrap();

    for (prompt, ids) in prompts.iter().zip(reference["ids"].as_array().unwrap()) {
        let expected: Vec<i64> = serde_json::from_value(ids.clone()).unwrap();
        assert_eq!(
            pkg.tokenizer.encode(prompt).unwrap(),
            expected,
            "token ids of {prompt:?}"
        );
    }

    let mut go = |_: &Progress| StepControl::Continue;
    let latents = generate::denoise(&pkg, &request, &mut go).unwrap();
    let expected = read_f32(&latents_out, &latents.size());
    let diff = (&latents - &expected).abs().max().double_value(&[]);
    let scale = expected.abs().max().double_value(&[]);
    println!("latents: max |runner - diffusers| = {diff:e} (max |x| = {scale:.3})");
    assert!(scale > 0.1, "degenerate latents");
    assert!(
        diff < 1e-4,
        "latents differ from the pipeline's by {diff:e}"
    );

    let frames = decode(&pkg, &latents).unwrap();
    assert_eq!(
        (frames.count, frames.height, frames.width),
        (request.frames, request.height, request.width)
    );
    let ours = Tensor::from_slice(&frames.rgb).to_kind(Kind::Float);
    let pipeline = read_f32(&frames_out, &[frames.rgb.len() as i64]) * 255.0;
    let off = (&ours - &pipeline).abs().max().double_value(&[]);
    assert!(
        off <= 1.0 + 1e-3,
        "frames differ from the pipeline's video by {off} levels"
    );
    let spread = pipeline.std(true).double_value(&[]);
    assert!(spread > 5.0, "the pipeline's video is flat (std {spread})");
}

#[test]
fn the_exported_package_becomes_an_mp4_in_bfloat16_and_float32() {
    let device = common::cpu();
    let fx = fixture();
    let out = tempfile::tempdir().unwrap();
    let mut latents = Vec::new();
    for dir in [&fx.float32, &fx.bfloat16] {
        let pkg = ModelPackage::load(dir, device.device, Some(8)).unwrap();
        // Loaded as exported: the manifest's dtype, except the layers diffusers keeps in
        // float32 (the time embedder, norms, modulation tables).
        let params = pkg.denoiser.named_parameters().unwrap();
        let kind_of = |name: &str| {
            params
                .iter()
                .find(|(n, _)| n.ends_with(name))
                .unwrap()
                .1
                .kind()
        };
        assert_eq!(kind_of("patch_embedding.weight"), pkg.manifest.dtype.kind());
        assert_eq!(kind_of("scale_shift_table"), Kind::Float);
        let mut go = |_: &Progress| StepControl::Continue;
        latents.push(generate::denoise(&pkg, &job("a fox"), &mut go).unwrap());

        let name = dir.file_name().unwrap().to_str().unwrap();
        let outcome = run_job(
            &pkg,
            &device,
            &JobRequest {
                name: name.to_owned(),
                ..job("a fox on the beach")
            },
            out.path(),
            |_| StepControl::Continue,
        );
        let video = outcome.result.unwrap();
        let probe = common::ffprobe(&out.path().join(&video.path))
            .expect("ffprobe is missing: install it (apt-get install ffmpeg); .ci/run does");
        let stream = &probe["streams"][0];
        assert_eq!(stream["codec_name"], "h264");
        assert_eq!(stream["nb_read_frames"], "9");
        assert_eq!(
            (stream["width"].as_i64(), stream["height"].as_i64()),
            (Some(32), Some(48))
        );
        assert_eq!(stream["r_frame_rate"], "8/1");
    }
    // bfloat16 weights with float32 scheduler math stay near the float32 export.
    let diff = (&latents[0] - &latents[1]).abs().max().double_value(&[]);
    let scale = latents[0].abs().max().double_value(&[]);
    println!("bfloat16 vs float32 latents: max diff {diff:e} (max |x| = {scale:.3})");
    assert!(
        diff > 0.0 && diff < 0.1 * scale,
        "bf16 drift {diff} vs {scale}"
    );
}

#[test]
fn image_to_video_pipelines_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "WanImageToVideoPipeline"}"#,
    )
    .unwrap();
    let out = std::process::Command::new(common::python())
        .arg(common::tests_dir().join("../scripts/export_diffusers.py"))
        .arg(dir.path())
        .arg(dir.path().join("pkg"))
        .args([
            "--model", "anisora", "--steps", "8", "--shift", "5", "--cfg", "3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model_index.json") && stderr.contains("WanImageToVideoPipeline"),
        "{stderr}"
    );
}
