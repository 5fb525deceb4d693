//! Shared test setup: the torch venv's Python, and tiny model packages made by
//! tests/make_tiny_packages.py once per test binary.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::Command;

use framelane_runner::generate::JobRequest;
use framelane_runner::memory::RunnerDevice;

pub const FIX: &str =
    "run `eval \"$(gpu-runner/scripts/setup-torch.sh)\"` first (see gpu-runner/README.md)";

/// Tiny `anisora` and `phr00t` packages, made once per test binary.
pub use framelane_testenv::tiny_models as packages;
/// The Python with torch 2.11 that makes the packages and runs the reference loop.
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

pub fn anisora() -> PathBuf {
    packages().join("anisora")
}

pub fn phr00t() -> PathBuf {
    packages().join("phr00t")
}

pub fn cpu() -> RunnerDevice {
    RunnerDevice::cpu().expect("CPU device")
}

/// A small job: 9 frames of 32x32.
pub fn job(name: &str, seed: u32) -> JobRequest {
    JobRequest {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        prompt: "a red fox running through snow".to_owned(),
        negative_prompt: Some("blurry".to_owned()),
        width: 32,
        height: 32,
        frames: 9,
        fps: None,
        cfg: None,
        seed,
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
