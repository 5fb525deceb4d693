//! Whole Wan models against diffusers' own pipelines (tests/wan_pipeline_reference.py) on the
//! tiny random-weight models of tests/make_tiny_wan_models.py, in float32:
//! - text to video: `WanPipeline` with the UniPC scheduler it was saved with;
//! - image to video: `WanImageToVideoPipeline` in the Wan 2.2 A14B shape (two experts, a
//!   boundary, no image encoder) from the same picture, resized as its image processor does;
//! - the text-to-video model as one ComfyUI AllInOne file, and as scaled fp8, its linear
//!   weights stored in fp8 on the device or upcast at load;
//! - Euler ancestral on ComfyUI's `beta` schedule through the whole pipeline;
//! - the refusals of files and requests that do not fit.
//!
//! Tolerances: latents within 1e-4 of diffusers', decoded frames within one level of 255,
//! token ids exact. On CUDA, TF32 is turned off so float32 stays float32.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use framelane_runner::image::Rgb8;
use framelane_runner::placement::MemoryMode;
use framelane_runner::sampler::StepControl;
use framelane_runner::wan::pipeline::{
    ComfyUiFiles, MemoryPlan, Mode, ModelFiles, ModelSpec, PipelineError, Precision, Request,
    WanPipeline,
};
use framelane_runner::wan::recipe::{AncestralSchedule, Solver};
use framelane_runner::wan::safetensors::TensorFiles;
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

const LATENT_TOLERANCE: f64 = 1e-4;

fn models() -> &'static Path {
    common::models()
}

fn device() -> Device {
    common::device().device
}

/// The jobs every test compares, as the reference script takes them.
fn cases() -> Value {
    let job = |name: &str, kind: &str, model: &str, extra: Value| {
        let mut case = json!({"name": name, "kind": kind, "model": model,
            "prompt": "a red fox running through snow", "negativePrompt": "blurry, the dog",
            "width": 64, "height": 48, "frames": 9, "steps": 6, "guidance": 3.0, "seed": 7});
        for (k, v) in extra.as_object().unwrap() {
            case[k] = v.clone();
        }
        case
    };
    json!([
        job("t2v", "t2v", "wan-t2v", json!({})),
        job("t2v_fp8", "t2v", "wan-t2v",
            json!({"transformer": "phr00t/fp8-dequantized-transformer.safetensors"})),
        job("i2v", "i2v", "anisora", json!({"image": "inputs/first-frame.png",
            "prompt": "a cat surfing at dusk", "negativePrompt": "", "steps": 8,
            "guidance": 1.0, "seed": 3})),
        job("comfy", "comfy", "wan-t2v", json!({"prompt": "a dog on the beach",
            "negativePrompt": "", "steps": 4, "guidance": 1.0, "seed": 5, "shift": 8.0,
            "eta": 1.0})),
        {"name": "resize", "kind": "resize", "image": "inputs/first-frame.png",
         "sizes": [[64, 48], [32, 48], [200, 120], [80, 16], [7, 5]]},
        {"name": "upright", "kind": "upright",
         "images": (1..=8).map(|n| format!("inputs/orientation-{n}.jpg")).collect::<Vec<_>>()},
    ])
}

struct Reference {
    tensors: TensorFiles,
    ids: Value,
}

impl Reference {
    /// A reference tensor, float32 on the CPU.
    fn tensor(&self, name: &str) -> Tensor {
        self.tensors
            .weight(name, Kind::Float, Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<(tempfile::TempDir, Reference)> = OnceLock::new();
    &REFERENCE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("reference.safetensors");
            let out = common::run_python(
                "wan_pipeline_reference.py",
                &[models(), &file],
                Some(&cases().to_string()),
            );
            let tensors = TensorFiles::open(&[&file]).unwrap();
            let ids = serde_json::from_str(&out).unwrap();
            (dir, Reference { tensors, ids })
        })
        .1
}

fn case(name: &str) -> Value {
    cases()
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn diffusers(folder: &str) -> ModelSpec {
    ModelSpec {
        files: ModelFiles::Diffusers(models().join(folder)),
        solver: None,
        boundary_ratio: None,
    }
}

fn allinone(file: &str, solver: Solver) -> ModelSpec {
    ModelSpec {
        files: ModelFiles::ComfyUi(ComfyUiFiles {
            transformer: vec![models().join("phr00t").join(file)],
            transformer_2: Vec::new(),
            text_encoder: Vec::new(),
            vae: Vec::new(),
            tokenizer: models().join("phr00t/tokenizer"),
        }),
        solver: Some(solver),
        boundary_ratio: None,
    }
}

fn load(spec: &ModelSpec) -> WanPipeline {
    WanPipeline::load(spec, Precision::FLOAT32, device()).unwrap_or_else(|e| panic!("{e}"))
}

/// The case's first frame, prepared as the runner prepares `spec.image`.
fn first_frame(case: &Value) -> Option<Tensor> {
    let path = case["image"].as_str()?;
    let bytes = std::fs::read(models().join(path)).unwrap();
    let (w, h) = (case["width"].as_u64()?, case["height"].as_u64()?);
    Some(
        Rgb8::decode(&bytes)
            .unwrap()
            .resize(w as usize, h as usize)
            .to_tensor(),
    )
}

/// Runs the case on `pipeline`: its latents (float32, CPU) and frames.
fn generate(pipeline: &mut WanPipeline, case: &Value) -> (Tensor, framelane_runner::video::Frames) {
    let image = first_frame(case);
    let request = Request {
        prompt: case["prompt"].as_str().unwrap(),
        negative_prompt: case["negativePrompt"].as_str().unwrap(),
        width: case["width"].as_i64().unwrap(),
        height: case["height"].as_i64().unwrap(),
        frames: case["frames"].as_i64().unwrap(),
        steps: case["steps"].as_u64().unwrap() as u32,
        guidance: case["guidance"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        image: image.as_ref(),
    };
    let mut steps = Vec::new();
    let latents = pipeline
        .denoise(&request, &mut |done, total| {
            steps.push((done, total));
            StepControl::Continue
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let total = steps.len();
    assert_eq!(
        steps.last(),
        Some(&(total, total)),
        "progress after every step"
    );
    let frames = pipeline.decode(&latents).unwrap();
    (latents.to_kind(Kind::Float).to_device(Device::Cpu), frames)
}

/// Compares latents and frames with the reference case `name`.
fn assert_matches(
    label: &str,
    name: &str,
    latents: &Tensor,
    frames: &framelane_runner::video::Frames,
) {
    let reference = reference();
    let expected = &reference.tensor(&format!("{name}.latents"));
    assert_eq!(latents.size(), expected.size(), "{label}: latent shape");
    let scale = expected.abs().max().double_value(&[]);
    let diff = (latents - expected).abs().max().double_value(&[]);
    println!("{label}: latents max |ours - diffusers| = {diff:e} (max |diffusers| = {scale:.3})");
    assert!(scale > 0.1, "{label}: degenerate reference");
    assert!(
        diff <= LATENT_TOLERANCE,
        "{label}: latents differ by {diff:e}"
    );

    let video = &reference.tensor(&format!("{name}.frames"));
    let [count, height, width, _] = video.size()[..] else {
        panic!("reference frames of shape {:?}", video.size())
    };
    assert_eq!(
        (frames.count, frames.height, frames.width),
        (count as u32, height as u32, width as u32),
        "{label}: video shape"
    );
    let ours = Tensor::from_slice(&frames.rgb)
        .view([count, height, width, 3])
        .to_kind(Kind::Float);
    let level = (ours - video * 255.0).abs().max().double_value(&[]);
    println!("{label}: frames max |ours - diffusers| = {level:.3} of 255");
    assert!(level <= 1.0, "{label}: frames differ by {level:.3} levels");
    let spread = video.std(false).double_value(&[]);
    assert!(spread > 0.05, "{label}: flat reference video");
}

fn ids(name: &str, field: &str) -> Vec<i64> {
    serde_json::from_value(reference().ids[name][field].clone()).unwrap()
}

#[test]
fn text_to_video_matches_wan_pipeline_with_its_saved_unipc_scheduler() {
    let mut pipeline = load(&diffusers("wan-t2v"));
    assert_eq!(pipeline.mode(), Mode::TextToVideo);
    let case = case("t2v");
    assert_eq!(
        pipeline
            .token_ids(case["prompt"].as_str().unwrap())
            .unwrap(),
        ids("t2v", "ids")
    );
    assert_eq!(
        pipeline
            .token_ids(case["negativePrompt"].as_str().unwrap())
            .unwrap(),
        ids("t2v", "negativeIds")
    );
    let (latents, frames) = generate(&mut pipeline, &case);
    assert_matches("t2v", "t2v", &latents, &frames);
}

#[test]
fn image_to_video_matches_the_two_expert_image_to_video_pipeline() {
    let mut pipeline = load(&diffusers("anisora"));
    assert_eq!(pipeline.mode(), Mode::ImageToVideo);
    assert_eq!(pipeline.boundary_ratio(), Some(0.9));
    let case = case("i2v");
    assert_eq!(
        pipeline
            .token_ids(case["prompt"].as_str().unwrap())
            .unwrap(),
        ids("i2v", "ids")
    );
    let (latents, frames) = generate(&mut pipeline, &case);
    assert_matches("i2v", "i2v", &latents, &frames);
}

#[test]
fn the_first_frame_is_resized_as_pils_lanczos_resizes_it() {
    let bytes = std::fs::read(models().join("inputs/first-frame.png")).unwrap();
    let image = Rgb8::decode(&bytes).unwrap();
    assert_eq!((image.width, image.height), (80, 56));
    for size in case("resize")["sizes"].as_array().unwrap() {
        let (w, h) = (size[0].as_u64().unwrap(), size[1].as_u64().unwrap());
        let ours = image.resize(w as usize, h as usize);
        let expected = &reference().tensor(&format!("resize.{w}x{h}"));
        let expected = Vec::<u8>::try_from(expected.to_kind(Kind::Uint8).flatten(0, -1)).unwrap();
        assert_eq!(ours.pixels, expected, "{w}x{h}");
    }
}

/// A JPEG stored sideways or mirrored, as cameras store pictures, is turned upright as its EXIF
/// orientation says, as diffusers' `load_image` turns it (`ImageOps.exif_transpose`).
#[test]
fn a_jpeg_is_turned_upright_as_its_exif_orientation_says() {
    for n in 1..=8 {
        let bytes = std::fs::read(models().join(format!("inputs/orientation-{n}.jpg"))).unwrap();
        let ours = Rgb8::decode(&bytes).unwrap();
        assert_eq!((ours.width, ours.height), (80, 56), "orientation {n}");
        let pil = reference().tensor(&format!("upright.{}", n - 1));
        let pil = Vec::<u8>::try_from(pil.to_kind(Kind::Uint8).flatten(0, -1)).unwrap();
        // Two JPEG decoders differ by a level or two in places (their IDCT and chroma
        // upsampling); a picture the wrong way round differs everywhere.
        let mean = ours
            .pixels
            .iter()
            .zip(&pil)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / pil.len() as f64;
        assert!(
            mean < 2.0,
            "orientation {n}: mean difference {mean} from PIL"
        );
    }
}

#[test]
fn the_model_as_one_comfyui_allinone_file_gives_the_same_video() {
    let mut pipeline = load(&allinone("phr00t-aio.safetensors", Solver::wan_unipc(3.0)));
    let case = case("t2v");
    assert_eq!(
        pipeline
            .token_ids(case["prompt"].as_str().unwrap())
            .unwrap(),
        ids("t2v", "ids")
    );
    let (latents, frames) = generate(&mut pipeline, &case);
    assert_matches("comfyui allinone", "t2v", &latents, &frames);
}

/// fp8 weights are upcast exactly, so the scaled-fp8 file gives what diffusers gives with the
/// dequantized weights, within the same tolerance.
#[test]
fn a_scaled_fp8_allinone_file_matches_its_dequantized_weights() {
    let mut pipeline = load(&allinone(
        "phr00t-aio-fp8.safetensors",
        Solver::wan_unipc(3.0),
    ));
    let (latents, frames) = generate(&mut pipeline, &case("t2v"));
    assert_matches("comfyui scaled fp8", "t2v_fp8", &latents, &frames);
    let full = &reference().tensor("t2v.latents");
    let quantization = (&latents - full).abs().max().double_value(&[]);
    println!("fp8 vs full-precision weights: latents max diff {quantization:e}");
    assert!(quantization > LATENT_TOLERANCE, "fp8 changed nothing?");
}

/// float32 with the transformers' linear weights stored in fp8.
const FP8_STORAGE: Precision = Precision {
    fp8_transformers: true,
    ..Precision::FLOAT32
};

/// A pipeline of `spec` loaded in `precision` and `mode`, and its video of the `t2v` case.
fn loaded(
    spec: &ModelSpec,
    precision: Precision,
    mode: MemoryMode,
) -> (WanPipeline, Tensor, framelane_runner::video::Frames) {
    let plan = MemoryPlan {
        mode,
        ..MemoryPlan::default()
    };
    let mut pipeline =
        WanPipeline::load_with(spec, precision, device(), plan).unwrap_or_else(|e| panic!("{e}"));
    let (latents, frames) = generate(&mut pipeline, &case("t2v"));
    (pipeline, latents, frames)
}

/// fp8 storage keeps an fp8 file's own values and scales and upcasts each weight as its layer
/// runs, as a load would: the same video, bit for bit, from fewer bytes (tests/memory_modes.rs
/// measures them on the device); under model offload the host copies are fp8 too.
#[test]
fn an_fp8_file_stored_in_fp8_makes_the_same_video_from_fewer_bytes() {
    let spec = allinone("phr00t-aio-fp8.safetensors", Solver::wan_unipc(3.0));
    let (upcast, upcast_latents, upcast_frames) =
        loaded(&spec, Precision::FLOAT32, MemoryMode::Resident);
    let (fp8, latents, frames) = loaded(&spec, FP8_STORAGE, MemoryMode::Resident);
    assert!(
        latents.equal(&upcast_latents),
        "fp8 storage changed the latents"
    );
    assert_eq!(frames.rgb, upcast_frames.rgb);
    assert_matches("fp8 storage", "t2v_fp8", &latents, &frames);
    let (upcast_bytes, fp8_bytes) = (upcast.bytes().transformer, fp8.bytes().transformer);
    println!("transformer: {upcast_bytes} B upcast at load, {fp8_bytes} B stored in fp8");
    assert!(fp8_bytes < upcast_bytes, "{fp8_bytes} {upcast_bytes}");

    // Model offload: the transformer waits in host memory in fp8 and comes back the same.
    let (offloaded, offloaded_latents, _) = loaded(&spec, FP8_STORAGE, MemoryMode::ModelOffload);
    assert!(offloaded_latents.equal(&latents));
    assert_eq!(offloaded.host_bytes(), offloaded.bytes().all());
    assert_eq!(offloaded.bytes().transformer, fp8_bytes);
}

/// A float32 file stored in fp8 is rounded at load, each block's linear weight scaled so its
/// largest magnitude is fp8's largest (as ComfyUI's scaled fp8 is made): the video moves away
/// from full precision, but less than the scaled-fp8 file's, which rounds the embeddings and
/// the output projection too (fp8 storage leaves them as diffusers' layerwise casting does).
#[test]
fn a_full_precision_file_stored_in_fp8_is_rounded_in_its_blocks_only() {
    let spec = allinone("phr00t-aio.safetensors", Solver::wan_unipc(3.0));
    let (_, latents, _) = loaded(&spec, FP8_STORAGE, MemoryMode::Resident);
    let reference = reference();
    let full = reference.tensor("t2v.latents");
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let (rounded, file) = (
        max_diff(&latents, &full),
        max_diff(&reference.tensor("t2v_fp8.latents"), &full),
    );
    println!(
        "latents max diff from full precision: {rounded:e} rounded at load, {file:e} from the scaled-fp8 file"
    );
    assert!(rounded > LATENT_TOLERANCE, "rounding changed nothing?");
    assert!(rounded < file, "{rounded} {file}");
}

#[test]
fn euler_ancestral_on_the_beta_schedule_matches_comfyuis_definitions() {
    let solver = Solver::EulerAncestral {
        schedule: AncestralSchedule::Beta,
        shift: 8.0,
        eta: 1.0,
    };
    let mut pipeline = load(&allinone("phr00t-aio.safetensors", solver));
    let (latents, frames) = generate(&mut pipeline, &case("comfy"));
    assert_matches("euler ancestral + beta", "comfy", &latents, &frames);
}

fn load_error(spec: &ModelSpec) -> String {
    match WanPipeline::load(spec, Precision::FLOAT32, Device::Cpu) {
        Ok(_) => panic!("the model loaded"),
        Err(e) => e.to_string(),
    }
}

/// A copy of the AllInOne file with `edit` applied to its tensors.
fn edited_allinone(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let source = models().join("phr00t/phr00t-aio.safetensors");
    let mut tensors = Tensor::read_safetensors(&source).unwrap();
    edit(&mut tensors);
    let path = dir.join("edited.safetensors");
    Tensor::write_safetensors(&tensors, &path).unwrap();
    path
}

fn comfy_spec(file: PathBuf) -> ModelSpec {
    let mut spec = allinone("phr00t-aio.safetensors", Solver::wan_unipc(3.0));
    if let ModelFiles::ComfyUi(files) = &mut spec.files {
        files.transformer = vec![file];
    }
    spec
}

#[test]
fn a_missing_or_misshapen_tensor_is_refused_by_its_name_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = edited_allinone(dir.path(), |t| {
        t.retain(|(name, _)| name != "vae.decoder.upsamples.4.shortcut.weight")
    });
    let err = load_error(&comfy_spec(missing));
    assert!(
        err.contains("tensor `vae.decoder.upsamples.4.shortcut.weight` is missing")
            && err.contains("the VAE needs it with shape [32, 16, 1, 1, 1]"),
        "{err}"
    );

    let misshapen = edited_allinone(dir.path(), |t| {
        for (name, tensor) in t.iter_mut() {
            if name
                == "text_encoders.umt5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight"
            {
                *tensor = tensor.narrow(1, 0, 60).contiguous();
            }
        }
    });
    let err = load_error(&comfy_spec(misshapen));
    assert!(
        err.contains("DenseReluDense.wo.weight` in ")
            && err.contains("has shape [32, 60], but the text encoder config needs [32, 64]"),
        "{err}"
    );

    let extra = edited_allinone(dir.path(), |t| {
        t.push((
            "vae.decoder.upsamples.15.residual.0.gamma".to_owned(),
            Tensor::ones([8, 1, 1, 1], (Kind::Float, Device::Cpu)),
        ));
    });
    let err = load_error(&comfy_spec(extra));
    assert!(
        err.contains("tensor `vae.decoder.upsamples.15.residual.0.gamma`")
            && err.contains("is not part of the VAE the runner implements"),
        "{err}"
    );
}

#[test]
fn sampling_that_does_not_fit_the_model_is_refused() {
    let mut no_boundary = diffusers("anisora");
    no_boundary.boundary_ratio = None;
    let dir = tempfile::tempdir().unwrap();
    // A copy of the pipeline whose index lost its boundary_ratio.
    copy_dir(&models().join("anisora"), dir.path());
    let index = dir.path().join("model_index.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("boundary_ratio");
    std::fs::write(&index, json.to_string()).unwrap();
    no_boundary.files = ModelFiles::Diffusers(dir.path().to_path_buf());
    assert!(
        load_error(&no_boundary).contains("two transformers but no expert boundary"),
        "{}",
        load_error(&no_boundary)
    );
    no_boundary.boundary_ratio = Some(0.9);
    assert_eq!(
        WanPipeline::load(&no_boundary, Precision::FLOAT32, Device::Cpu)
            .unwrap()
            .boundary_ratio(),
        Some(0.9)
    );

    let mut one_expert = diffusers("wan-t2v");
    one_expert.boundary_ratio = Some(0.875);
    assert!(load_error(&one_expert).contains("the model has one transformer"));

    let mut no_solver = allinone("phr00t-aio.safetensors", Solver::wan_unipc(3.0));
    no_solver.solver = None;
    assert!(load_error(&no_solver).contains("ComfyUI files carry no scheduler"));
}

#[test]
fn a_request_for_the_other_mode_is_refused() {
    let mut text = load(&diffusers("wan-t2v"));
    let image = first_frame(&case("i2v")).unwrap();
    let request = Request {
        prompt: "a fox",
        negative_prompt: "",
        width: 64,
        height: 48,
        frames: 9,
        steps: 2,
        guidance: 1.0,
        seed: 0,
        image: Some(&image),
    };
    let refuse = |p: &mut WanPipeline, r: &Request<'_>| match p
        .denoise(r, &mut |_, _| StepControl::Continue)
    {
        Err(PipelineError::InvalidRequest { field, reason }) => format!("{field} {reason}"),
        other => panic!("not refused: {:?}", other.map(|t| t.size())),
    };
    assert_eq!(
        refuse(&mut text, &request),
        "image is for image to video; this model makes videos from text only"
    );
    let mut video = load(&diffusers("anisora"));
    let without = Request {
        image: None,
        ..request
    };
    assert_eq!(
        refuse(&mut video, &without),
        "image is required: this model makes videos from an image"
    );
    let odd = Request {
        frames: 8,
        ..request
    };
    assert_eq!(
        refuse(&mut video, &odd),
        "frames must be of the form 4k+1, got 8"
    );
}

#[test]
fn cancelling_stops_at_the_step_boundary() {
    let mut pipeline = load(&diffusers("anisora"));
    let image = first_frame(&case("i2v")).unwrap();
    let request = Request {
        prompt: "a fox",
        negative_prompt: "",
        width: 64,
        height: 48,
        frames: 9,
        steps: 8,
        guidance: 1.0,
        seed: 0,
        image: Some(&image),
    };
    let mut seen = 0;
    let err = pipeline
        .denoise(&request, &mut |done, _| {
            seen = done;
            if done == 3 {
                StepControl::Cancel
            } else {
                StepControl::Continue
            }
        })
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            PipelineError::Cancelled {
                completed: 3,
                total: 8
            }
        ),
        "{err}"
    );
    assert_eq!(seen, 3);
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
