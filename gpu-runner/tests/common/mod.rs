//! Shared test setup: the torch venv's Python, the runner's device, and the tiny Wan models of
//! tests/make_tiny_wan_models.py, made once per test binary, as the default VideoModels
//! (examples/videomodels.yaml) name them.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use framelane_api::VideoModel;
use framelane_runner::accel;
use framelane_runner::cache::ModelRef;
use framelane_runner::generate::JobRequest;
use framelane_runner::job::model_ref;
use framelane_runner::memory::RunnerDevice;
use framelane_runner::wan::pipeline::Mode;
use serde::Deserialize;

pub mod fit;

pub const FIX: &str =
    "run `eval \"$(gpu-runner/scripts/setup-torch.sh)\"` first (see gpu-runner/README.md)";

/// The tiny models, made once per test binary.
pub use framelane_testenv::tiny_models as models;
/// The Python with torch 2.11 that makes the models and runs the references.
pub use framelane_testenv::torch_python as python;

pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// Runs a script from tests/ with the torch Python, panicking with its stderr on failure.
pub fn run_python(script: &str, args: &[&Path], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(tests_dir().join(script))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the torch Python: {e}; {FIX}"));
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The runner's own device choice (the GPU where there is one), with TF32 off so float32
/// comparisons stay float32.
pub fn device() -> RunnerDevice {
    static DEVICE: OnceLock<RunnerDevice> = OnceLock::new();
    *DEVICE.get_or_init(|| {
        accel::set_tf32(false).expect("TF32 off");
        RunnerDevice::detect().expect("device")
    })
}

/// The default install's VideoModel `name` (examples/videomodels.yaml) on the tiny models.
pub fn model(name: &str) -> ModelRef {
    model_at(name, models())
}

/// The VideoModel `name` on a copy of the tiny models' directory at `root`.
pub fn model_at(name: &str, root: &Path) -> ModelRef {
    let yaml = include_str!("../../../examples/videomodels.yaml");
    let model = serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| VideoModel::deserialize(doc).expect("a VideoModel"))
        .find(|m| m.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("examples/videomodels.yaml has no model {name}"));
    model_ref(&model, root).unwrap()
}

/// The tiny models' start image for image-to-video jobs.
pub fn first_frame() -> Vec<u8> {
    std::fs::read(models().join("inputs/first-frame.png")).unwrap()
}

/// A small job for `model` (`anisora`: image to video, 8 steps; `phr00t`: text to video, 4
/// steps): 9 frames of 32x32.
pub fn job(model: &str, name: &str, seed: u32) -> JobRequest {
    let (mode, image, steps) = match model {
        "anisora" => (Mode::ImageToVideo, Some(first_frame()), 8),
        _ => (Mode::TextToVideo, None, 4),
    };
    JobRequest {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        mode,
        prompt: "a red fox running through snow".to_owned(),
        negative_prompt: Some("blurry".to_owned()),
        image,
        width: 32,
        height: 32,
        frames: 9,
        fps: 16,
        steps,
        cfg: 1.0,
        seed,
        vae_tiling: None,
    }
}

/// ffprobe's JSON for the first video stream and the format.
pub fn ffprobe(path: &Path) -> Option<serde_json::Value> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}
