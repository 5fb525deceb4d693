//! The Wan VAE against diffusers' `AutoencoderKLWan` on a tiny random-weight model made by
//! tests/wan_vae_reference.py: chunked decoding and encoding, the pipelines' latent
//! normalization and frame conversion, tiled decoding and encoding, and the refusal of
//! weights or configs that do not fit.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use framelane_runner::wan::vae::{AutoencoderKLWan, Tiling, VaeConfig, VaeError};
use tch::{Device, Kind, Tensor};

/// The tiling the reference used for its tiled cases.
const TILING: Tiling = Tiling {
    min_height: 32,
    min_width: 32,
    stride_height: 16,
    stride_width: 24,
};

/// The reference's files, written once per test binary.
fn reference_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::run_python("wan_vae_reference.py", &[dir.path()], None);
        dir
    })
    .path()
}

fn vae_dir() -> PathBuf {
    reference_dir().join("vae")
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

struct Case {
    vae: AutoencoderKLWan,
    reference: HashMap<String, Tensor>,
    device: Device,
}

impl Case {
    fn new() -> Case {
        let device = common::device().device;
        let config = VaeConfig::from_file(&vae_dir().join("config.json")).unwrap();
        let vae = load(config, |_| {}).unwrap_or_else(|e| panic!("{e}"));
        Case {
            vae,
            reference: read_tensors(&reference_dir().join("reference.safetensors")),
            device,
        }
    }

    /// A reference tensor on the runner's device.
    fn input(&self, name: &str) -> Tensor {
        self.reference[name].to_device(self.device)
    }

    /// The largest difference from the reference tensor `name`.
    fn off(&self, ours: &Tensor, name: &str) -> f64 {
        let expected = &self.reference[name];
        assert_eq!(ours.size(), expected.size(), "shape of {name}");
        let diff = (ours.to_device(Device::Cpu) - expected).abs().max();
        let diff = diff.double_value(&[]);
        println!("{name}: max |ours - diffusers| = {diff:e}");
        diff
    }
}

/// The reference VAE on the runner's device, after `edit` changed its weights.
fn load(
    config: VaeConfig,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> Result<AutoencoderKLWan, VaeError> {
    let mut weights = read_tensors(&vae_dir().join("diffusion_pytorch_model.safetensors"));
    edit(&mut weights);
    let device = common::device().device;
    AutoencoderKLWan::from_tensors(config, device, Kind::Float, &mut |name| {
        weights.get(name).map(Tensor::shallow_clone)
    })
}

fn load_error(config: VaeConfig, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> String {
    match load(config, edit) {
        Ok(_) => panic!("the VAE loaded"),
        Err(e) => e.to_string(),
    }
}

fn config() -> VaeConfig {
    VaeConfig::from_file(&vae_dir().join("config.json")).unwrap()
}

#[test]
fn decoding_five_latent_frames_matches_diffusers() {
    let case = Case::new();
    let unnormalized = case
        .vae
        .unnormalize_latents(&case.input("latents"))
        .unwrap();
    assert!(case.off(&unnormalized, "unnormalized") < 1e-5);
    let video = case.vae.decode(&unnormalized, None).unwrap();
    assert_eq!(video.size(), [1, 3, 17, 32, 48]);
    assert!(case.off(&video, "video") < 1e-4);
    let spread = case.reference["video"].std(true).double_value(&[]);
    assert!(spread > 0.1, "the reference video is flat (std {spread})");
}

#[test]
fn frames_are_the_video_processors_rgb8() {
    let case = Case::new();
    let frames = case
        .vae
        .decode_frames(&case.input("unnormalized"), None)
        .unwrap();
    assert_eq!(
        (frames.count, frames.height, frames.width),
        (17, 32, 48),
        "frames, height, width"
    );
    let expected = &case.reference["frames"];
    assert_eq!(frames.rgb.len() as i64, expected.numel() as i64);
    let ours = Tensor::from_slice(&frames.rgb).to_kind(Kind::Int64);
    let diff = (ours - expected.flatten(0, -1).to_kind(Kind::Int64)).abs();
    let (max, differing) = (
        diff.max().int64_value(&[]),
        diff.gt(0).sum(Kind::Int64).int64_value(&[]),
    );
    println!(
        "frames: max difference {max} levels, {differing} of {} bytes differ",
        frames.rgb.len()
    );
    assert!(max <= 1, "frames differ by {max} levels");
}

#[test]
fn encoding_seventeen_frames_matches_diffusers() {
    let case = Case::new();
    let encoded = case.vae.encode(&case.input("video_in"), None).unwrap();
    assert_eq!(encoded.size(), [1, 16, 5, 4, 6]);
    assert!(case.off(&encoded, "encoded") < 1e-4);
    let normalized = case.vae.normalize_latents(&encoded).unwrap();
    assert!(case.off(&normalized, "encoded_normalized") < 1e-4);
}

#[test]
fn tiled_decoding_matches_diffusers_tiled_decode() {
    let case = Case::new();
    let latents = case.input("tiled_latents");
    let tiled = case.vae.decode(&latents, Some(&TILING)).unwrap();
    assert!(case.off(&tiled, "tiled_video") < 1e-4);
    // The tiles really were decoded apart: one pass over the whole frame differs.
    let whole = case.vae.decode(&latents, None).unwrap();
    assert!(case.off(&whole, "tiled_video") > 1e-2);
}

#[test]
fn tiled_encoding_matches_diffusers_tiled_encode() {
    let case = Case::new();
    let video = case.input("tiled_video_in");
    let tiled = case.vae.encode(&video, Some(&TILING)).unwrap();
    assert!(case.off(&tiled, "tiled_encoded") < 1e-4);
    let whole = case.vae.encode(&video, None).unwrap();
    assert!(case.off(&whole, "tiled_encoded") > 1e-2);
}

#[test]
fn frames_smaller_than_a_tile_are_decoded_whole() {
    let case = Case::new();
    let tiling = Tiling::default();
    let video = case
        .vae
        .decode(&case.input("unnormalized"), Some(&tiling))
        .unwrap();
    assert!(case.off(&video, "video") < 1e-4);
}

#[test]
fn a_missing_tensor_is_refused_with_its_name_and_expected_shape() {
    let message = load_error(config(), |weights| {
        weights.remove("decoder.up_blocks.1.resnets.0.conv1.weight");
    });
    assert_eq!(
        message,
        "VAE weights: tensor `decoder.up_blocks.1.resnets.0.conv1.weight` is missing (the \
         config implies shape [32, 16, 3, 3, 3]); the weights are incomplete or of another \
         model than config.json describes"
    );
}

#[test]
fn a_wrongly_shaped_tensor_is_refused_with_both_shapes() {
    let message = load_error(config(), |weights| {
        weights.insert(
            "encoder.conv_in.weight".to_owned(),
            Tensor::zeros([8, 3, 1, 3, 3], (Kind::Float, Device::Cpu)),
        );
    });
    assert_eq!(
        message,
        "VAE weights: tensor `encoder.conv_in.weight` has shape [8, 3, 1, 3, 3], but the \
         config implies [8, 3, 3, 3, 3]; the weights and config.json are of different models"
    );
}

#[test]
fn the_wan_2_2_five_billion_vae_is_refused() {
    let message = load_error(
        VaeConfig {
            is_residual: true,
            z_dim: 48,
            ..config()
        },
        |_| {},
    );
    assert_eq!(
        message,
        "VAE config field `is_residual`: is the Wan 2.2 TI2V-5B VAE (48 latent channels, \
         residual blocks, patchified frames), which the runner does not implement; Wan 2.1 and \
         Wan 2.2 A14B models use the 16-channel Wan 2.1 VAE"
    );
}

#[test]
fn latents_of_another_width_are_refused() {
    let case = Case::new();
    let latents = Tensor::zeros([1, 48, 2, 4, 4], (Kind::Float, case.device));
    let Err(e) = case.vae.decode(&latents, None) else {
        panic!("decoded 48-channel latents");
    };
    assert_eq!(
        e.to_string(),
        "VAE input: latents of shape [1, 48, 2, 4, 4]; expected [batch, 16, frames, height, \
         width]"
    );
}
