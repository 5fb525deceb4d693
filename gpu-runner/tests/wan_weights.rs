//! Loading the same tiny image-to-video transformer from every layout the runner reads:
//! diffusers (one file; sharded with an index, as `transformer_2/`), ComfyUI names (one file
//! with its config inferred, an AllInOne file with other components beside it, split files
//! without prefix), float8 and ComfyUI's scaled float8; and the refusals of wrong files.
//!
//! The ComfyUI files come from tests/make_tiny_wan_transformers.py, which checks them against
//! diffusers' own single-file conversion, so these tests do not rely on the runner's mapping.

mod common;
mod wan_fixtures;

use std::path::{Path, PathBuf};

use framelane_runner::wan::safetensors::{SafetensorsError, TensorFiles};
use framelane_runner::wan::transformer::{Storage, WanTransformer};
use framelane_runner::wan::weights::{Layout, TransformerCheckpoint, WeightsError};
use tch::{Kind, Tensor};
use wan_fixtures::{case, diffusers, load, max_diff, run, transformers};

fn comfy_file(name: &str) -> PathBuf {
    transformers().join("comfy").join(name)
}

fn comfy(paths: &[PathBuf]) -> Result<TransformerCheckpoint, WeightsError> {
    TransformerCheckpoint::comfyui(TensorFiles::open(paths)?, None)
}

/// The diffusers-layout model's output: the same weights must give exactly this.
fn diffusers_output() -> Tensor {
    run(&load(&diffusers("i2v/transformer"), Kind::Float), "i2v")
}

fn assert_same_model(label: &str, checkpoint: &TransformerCheckpoint) {
    assert_eq!(
        checkpoint.config(),
        diffusers("i2v/transformer").config(),
        "{label}: config"
    );
    let out = run(&load(checkpoint, Kind::Float), "i2v");
    assert!(max_diff(label, &out, &case("i2v.out")) < 1e-4);
    assert_eq!(max_diff(label, &out, &diffusers_output()), 0.0);
}

#[test]
fn comfyui_single_file_with_inferred_config_gives_the_same_output() {
    let checkpoint = comfy(&[comfy_file("single.safetensors")]).unwrap();
    assert_eq!(
        checkpoint.layout(),
        &Layout::ComfyUi {
            prefix: "model.diffusion_model.".to_owned()
        }
    );
    assert_same_model("comfyui single file", &checkpoint);
}

#[test]
fn allinone_file_loads_the_transformer_and_lists_the_other_components() {
    let files = TensorFiles::open(&[comfy_file("allinone.safetensors")]).unwrap();
    assert_eq!(
        files.find_prefixes("head.modulation"),
        vec!["model.diffusion_model."]
    );
    assert_eq!(
        files.find_prefixes("decoder.middle.0.residual.0.gamma"),
        vec!["vae."]
    );
    assert_eq!(
        files.find_prefixes("shared.weight"),
        vec!["text_encoders.umt5xxl.transformer."]
    );
    let checkpoint = TransformerCheckpoint::comfyui(files.clone(), None).unwrap();
    assert_same_model("comfyui allinone", &checkpoint);
    let vae = files
        .weight(
            "vae.decoder.middle.0.residual.0.gamma",
            Kind::Float,
            tch::Device::Cpu,
        )
        .unwrap();
    assert_eq!(vae.size(), vec![8, 1, 1, 1]);
}

#[test]
fn split_files_without_prefix_give_the_same_output() {
    let checkpoint = comfy(&[
        comfy_file("split-1.safetensors"),
        comfy_file("split-2.safetensors"),
    ])
    .unwrap();
    assert_eq!(
        checkpoint.layout(),
        &Layout::ComfyUi {
            prefix: String::new()
        }
    );
    assert_same_model("comfyui split files", &checkpoint);
}

#[test]
fn sharded_diffusers_transformer_2_matches_diffusers() {
    let dir = transformers().join("i2v/transformer_2");
    assert!(
        dir.join("diffusion_pytorch_model.safetensors.index.json")
            .is_file()
    );
    let checkpoint = diffusers("i2v/transformer_2");
    let out = run(&load(&checkpoint, Kind::Float), "i2v");
    assert!(max_diff("sharded transformer_2", &out, &case("i2v.out_2")) < 1e-4);
}

/// float8 weights upcast at load reproduce diffusers run on the dequantized weights within
/// 1e-4 (both compute in float32; only the summation order differs). The printed distance to
/// the unquantized model is float8's own error, for information. Kept in float8 and upcast as
/// each layer runs (fp8 storage), plain and scaled fp8 give the same output, bit for bit.
#[test]
fn fp8_and_scaled_fp8_stay_within_1e_4_of_their_dequantized_reference() {
    for (file, reference) in [
        ("fp8.safetensors", "i2v.out_fp8"),
        ("scaled_fp8.safetensors", "i2v.out_scaled_fp8"),
    ] {
        let checkpoint = comfy(&[comfy_file(file)]).unwrap();
        let out = run(&load(&checkpoint, Kind::Float), "i2v");
        assert!(max_diff(file, &out, &case(reference)) < 1e-4);
        let quantization = max_diff(&format!("{file} vs unquantized"), &out, &case("i2v.out"));
        assert!(quantization > 1e-4, "{file}: the weights were not float8");
        let stored = Storage {
            kind: Kind::Float,
            fp8: true,
        };
        let kept = run(&load(&checkpoint, stored), "i2v");
        assert!(kept.equal(&out), "{file}: fp8 storage changed the output");
    }
    let bf16 = load(
        &comfy(&[comfy_file("fp8.safetensors")]).unwrap(),
        Kind::BFloat16,
    );
    let out = run(&bf16, "i2v");
    assert!(max_diff("fp8 into bf16", &out, &case("i2v.out_fp8")) < 5e-2);
}

/// Why the file cannot be opened or loaded.
fn error(path: &Path) -> String {
    let err = match comfy(&[path.to_path_buf()]) {
        Ok(checkpoint) => WanTransformer::load(&checkpoint, Kind::Float, wan_fixtures::device())
            .err()
            .unwrap(),
        Err(err) => err,
    };
    err.to_string()
}

#[test]
fn wrong_or_incomplete_files_are_refused_naming_the_tensor_and_file() {
    let missing = comfy_file("missing.safetensors");
    assert_eq!(
        error(&missing),
        format!(
            "tensor `model.diffusion_model.blocks.1.cross_attn.k.weight` is missing from {}: \
             the transformer config needs it with shape [256, 256]",
            missing.display()
        )
    );
    let wrong = comfy_file("wrong_shape.safetensors");
    assert_eq!(
        error(&wrong),
        format!(
            "tensor `model.diffusion_model.blocks.1.ffn.0.bias` in {} has shape [63], but the \
             transformer config needs [64]",
            wrong.display()
        )
    );
    let vace = comfy_file("vace.safetensors");
    assert_eq!(
        error(&vace),
        format!(
            "tensor `model.diffusion_model.vace_blocks.0.after_proj.bias` in {} is not part of \
             the Wan transformer the runner implements (a VACE, camera, audio or Wan 2.1 image \
             branch, or another model)",
            vace.display()
        )
    );
    let wan21 = comfy_file("wan21_i2v.safetensors");
    assert_eq!(
        error(&wan21),
        format!(
            "{}: transformer config `image_dim` is 1280: that is Wan 2.1 image-to-video with a \
             CLIP image branch, which the runner does not implement; use a Wan 2.2 \
             image-to-video checkpoint (no image encoder)",
            wan21.display()
        )
    );
}

#[test]
fn files_that_are_not_one_wan_transformer_are_refused() {
    let cases_file = transformers().join("cases.safetensors");
    assert_eq!(
        error(&cases_file),
        format!(
            "no Wan transformer in {}: no tensor is named `head.modulation` under any prefix",
            cases_file.display()
        )
    );
    let single = comfy_file("single.safetensors");
    let err = TensorFiles::open(&[single.clone(), single.clone()])
        .err()
        .unwrap();
    assert!(matches!(err, SafetensorsError::Duplicate { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "tensor `model.diffusion_model.blocks.0.cross_attn.k.bias` is in both {0} and {0}; \
             pass each file of a checkpoint once",
            single.display()
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(&single).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = TensorFiles::open(&[&truncated]).err().unwrap();
    assert!(
        err.to_string().starts_with(&format!(
            "{} is not a safetensors file: `",
            truncated.display()
        )),
        "{err}"
    );
    assert!(err.to_string().contains("(truncated?)"), "{err}");
}
