//! Shared by the Wan tests: the tiny transformers and diffusers' outputs made once per test
//! binary by tests/make_tiny_wan_transformers.py, the runner's device, and comparisons.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::Path;
use std::sync::OnceLock;

use framelane_runner::memory::RunnerDevice;
use framelane_runner::wan::safetensors::TensorFiles;
use framelane_runner::wan::transformer::{Storage, WanTransformer};
use framelane_runner::wan::weights::TransformerCheckpoint;
use tch::{Device, Kind, Tensor};

/// The folder make_tiny_wan_transformers.py filled (see its doc for the layout).
pub fn transformers() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        crate::common::run_python("make_tiny_wan_transformers.py", &[dir.path()], None);
        dir
    })
    .path()
}

/// The runner's own device choice: the GPU where there is one.
pub fn device() -> Device {
    static DEVICE: OnceLock<RunnerDevice> = OnceLock::new();
    DEVICE
        .get_or_init(|| RunnerDevice::detect().expect("device"))
        .device
}

/// An input or a diffusers output from cases.safetensors, float32 on the CPU.
pub fn case(name: &str) -> Tensor {
    static FILES: OnceLock<TensorFiles> = OnceLock::new();
    FILES
        .get_or_init(|| TensorFiles::open(&[transformers().join("cases.safetensors")]).unwrap())
        .weight(name, Kind::Float, Device::Cpu)
        .unwrap()
}

/// The transformer's output for the `{prefix}.latents/timestep/context` inputs, float32 on
/// the CPU.
pub fn run(model: &WanTransformer, prefix: &str) -> Tensor {
    let _no_grad = tch::no_grad_guard();
    model
        .forward(
            &case(&format!("{prefix}.latents")),
            &case(&format!("{prefix}.timestep")),
            &case(&format!("{prefix}.context")),
        )
        .unwrap()
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
}

pub fn load(checkpoint: &TransformerCheckpoint, storage: impl Into<Storage>) -> WanTransformer {
    WanTransformer::load(checkpoint, storage, device()).unwrap()
}

pub fn diffusers(folder: &str) -> TransformerCheckpoint {
    TransformerCheckpoint::diffusers(&transformers().join(folder)).unwrap()
}

/// Max |a - b|, after checking the shapes agree and the reference is not degenerate.
pub fn max_diff(label: &str, ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "{label}: shapes");
    let scale = reference.abs().max().double_value(&[]);
    assert!(
        scale > 0.1,
        "{label}: degenerate reference (max |x| = {scale})"
    );
    let diff = (ours - reference).abs().max().double_value(&[]);
    println!("{label}: max |ours - reference| = {diff:e} (max |reference| = {scale:.3})");
    diff
}
