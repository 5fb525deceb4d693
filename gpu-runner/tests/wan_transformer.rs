//! The native Wan transformer against diffusers' WanTransformer3DModel: the same weights
//! (diffusers layout) and inputs, a text-to-video config (16 channels) and an image-to-video
//! shaped one (36 in, 16 out), in float32 and in bfloat16 as diffusers loads it.

mod common;
mod wan_fixtures;

use std::time::Instant;

use framelane_runner::wan::weights::{TransformerCheckpoint, WeightsError};
use tch::{Kind, Tensor};
use wan_fixtures::{case, diffusers, load, max_diff, run, transformers};

#[test]
fn text_to_video_matches_diffusers_within_1e_4() {
    let model = load(&diffusers("t2v/transformer"), Kind::Float);
    let out = run(&model, "t2v");
    assert!(max_diff("t2v fp32", &out, &case("t2v.out")) < 1e-4);

    let started = Instant::now();
    let runs = 5;
    for _ in 0..runs {
        let _out = run(&model, "t2v");
    }
    println!(
        "t2v tiny forward (batch 2, 48 tokens): {:.2} ms here, {:.2} ms in diffusers",
        started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs),
        case("t2v.diffusers_ms").double_value(&[0])
    );
}

#[test]
fn image_to_video_36_channels_matches_diffusers_within_1e_4() {
    let checkpoint = diffusers("i2v/transformer");
    assert_eq!(checkpoint.config().in_channels, 36);
    assert_eq!(checkpoint.config().out_channels(), 16);
    let out = run(&load(&checkpoint, Kind::Float), "i2v");
    assert_eq!(out.size(), vec![2, 16, 3, 8, 8]);
    assert!(max_diff("i2v fp32", &out, &case("i2v.out")) < 1e-4);
}

#[test]
fn bf16_follows_diffusers_bf16() {
    // diffusers in bf16 keeps the time embedder, modulation tables and cross-attention norm in
    // float32, and so does the runner: on the CPU the two bf16 outputs are identical. The bound
    // allows a bf16 ulp or two of the output's scale for other devices' kernels.
    let model = load(&diffusers("t2v/transformer"), Kind::BFloat16);
    let out = run(&model, "t2v");
    let vs_diffusers = max_diff("t2v bf16 vs diffusers bf16", &out, &case("t2v.out_bf16"));
    let vs_fp32 = max_diff("t2v bf16 vs fp32", &out, &case("t2v.out"));
    assert!(
        vs_diffusers < 2e-2,
        "bf16 drift from diffusers: {vs_diffusers}"
    );
    assert!(vs_fp32 > 0.0, "bf16 weights must not compute in float32");
}

#[test]
fn a_single_timestep_serves_the_whole_batch() {
    let model = load(&diffusers("t2v/transformer"), Kind::Float);
    let _no_grad = tch::no_grad_guard();
    let latents = case("t2v.latents");
    let context = case("t2v.context");
    let both = model
        .forward(&latents, &Tensor::from_slice(&[500.0f32, 500.0]), &context)
        .unwrap();
    let one = model
        .forward(&latents, &Tensor::from_slice(&[500i64]), &context)
        .unwrap();
    assert_eq!(max_diff("broadcast timestep", &one, &both), 0.0);
}

#[test]
fn wrong_inputs_are_refused_with_the_reason() {
    let model = load(&diffusers("t2v/transformer"), Kind::Float);
    let context = case("t2v.context");
    let t = case("t2v.timestep");
    let wrong_channels = Tensor::zeros([2, 36, 3, 8, 8], (Kind::Float, tch::Device::Cpu));
    let err = model.forward(&wrong_channels, &t, &context).err().unwrap();
    assert_eq!(
        err.to_string(),
        "invalid shape: latents have 36 channels but this transformer takes 16 (in_channels)"
    );
    let odd = Tensor::zeros([2, 16, 3, 7, 8], (Kind::Float, tch::Device::Cpu));
    let err = model.forward(&odd, &t, &context).err().unwrap();
    assert_eq!(
        err.to_string(),
        "invalid shape: latent frames x height x width 3x7x8 is not a multiple of the patch size 1x2x2"
    );
    let per_token = Tensor::zeros([2, 48], (Kind::Float, tch::Device::Cpu));
    let err = model
        .forward(&case("t2v.latents"), &per_token, &context)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "invalid shape: timestep has 96 values for a batch of 2; give one per batch item or one \
         for all (per-token timesteps, Wan 2.2 TI2V's, are not implemented)"
    );
    // rope_max_seq_len is 32 in this config: 33 latent frames cannot be placed.
    let long = Tensor::zeros([2, 16, 33, 2, 2], (Kind::Float, tch::Device::Cpu));
    let err = model.forward(&long, &t, &context).err().unwrap();
    assert_eq!(
        err.to_string(),
        "invalid shape: the latent grid [33, 1, 1] (after patching) has an axis of 33 positions; this \
         transformer's rotary table (rope_max_seq_len) holds 32"
    );
}

#[test]
fn unsupported_configs_are_refused_naming_the_field() {
    let source = transformers().join("t2v/transformer");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    let cases = [
        (
            "image_dim",
            serde_json::json!(1280),
            "transformer config `image_dim` is 1280: that is Wan 2.1 image-to-video with a CLIP \
             image branch, which the runner does not implement; use a Wan 2.2 image-to-video \
             checkpoint (no image encoder)",
        ),
        (
            "added_kv_proj_dim",
            serde_json::json!(32),
            "transformer config `added_kv_proj_dim` is 32: image key/value projections (Wan 2.1 \
             image-to-video) are not implemented",
        ),
        (
            "qk_norm",
            serde_json::json!("rms_norm"),
            "transformer config `qk_norm` is Some(\"rms_norm\"); only \"rms_norm_across_heads\" is implemented",
        ),
    ];
    for (field, value, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            source.join("diffusion_pytorch_model.safetensors"),
            dir.path().join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let mut edited = config.clone();
        edited[field] = value;
        std::fs::write(dir.path().join("config.json"), edited.to_string()).unwrap();
        let err = TransformerCheckpoint::diffusers(dir.path()).err().unwrap();
        assert!(matches!(err, WeightsError::Config { .. }), "{err}");
        let weights = dir.path().join("diffusion_pytorch_model.safetensors");
        assert_eq!(err.to_string(), format!("{}: {message}", weights.display()));
    }
}
