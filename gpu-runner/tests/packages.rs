//! Broken packages fail at load with an error that names the file and the field.

mod common;

use std::path::{Path, PathBuf};

use framelane_runner::package::{ModelPackage, PackageError};
use tch::Device;

/// A copy of the tiny phr00t package, with `edit` applied to its manifest.
fn copy_package(dst: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = common::phr00t();
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    let path = dst.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    dst.to_path_buf()
}

fn load_err(dir: &Path, expected_steps: Option<u32>) -> PackageError {
    common::cpu();
    ModelPackage::load(dir, Device::Cpu, expected_steps).unwrap_err()
}

#[test]
fn a_good_package_loads() {
    common::cpu();
    let pkg = ModelPackage::load(&common::phr00t(), Device::Cpu, Some(4)).unwrap();
    assert_eq!(pkg.manifest.model, "phr00t");
}

#[test]
fn missing_module_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_package(tmp.path(), |_| {});
    std::fs::remove_file(dir.join("denoiser.pt")).unwrap();
    let err = load_err(&dir, None);
    assert!(matches!(err, PackageError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("denoiser.pt: missing"), "{err}");
}

#[test]
fn missing_manifest_field_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_package(tmp.path(), |m| {
        m.as_object_mut().unwrap().remove("latentChannels");
    });
    let err = load_err(&dir, None).to_string();
    assert!(
        err.contains("manifest.json") && err.contains("latentChannels"),
        "{err}"
    );
}

#[test]
fn steps_contradicting_the_video_model_are_rejected() {
    let err = load_err(&common::phr00t(), Some(8));
    assert!(
        matches!(
            err,
            PackageError::StepsMismatch {
                manifest: 4,
                expected: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("manifest.json: field `steps` is 4"),
        "{err}"
    );
}

#[test]
fn schedule_not_matching_steps_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_package(tmp.path(), |m| m["steps"] = 5.into());
    let err = load_err(&dir, None).to_string();
    assert!(
        err.contains("field `schedule`") && err.contains("6 (steps + 1)"),
        "{err}"
    );
}

#[test]
fn wrong_output_shape_names_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    // The VAE upsamples by 4; a manifest claiming 8 makes its output the wrong shape.
    let dir = copy_package(tmp.path(), |m| m["spatialStride"] = 8.into());
    let err = load_err(&dir, None);
    assert!(
        matches!(err, PackageError::WrongOutputShape { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("vae_decoder.pt: wrong output shape") && msg.contains("[1, 3, 5, 16, 16]"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_not_torchscript_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_package(tmp.path(), |_| {});
    std::fs::write(dir.join("text_encoder.pt"), b"not a zip").unwrap();
    let err = load_err(&dir, None);
    assert!(matches!(err, PackageError::ModuleLoad { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("text_encoder.pt: not a loadable TorchScript module")
    );
}

#[test]
fn swapped_modules_fail_the_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_package(tmp.path(), |_| {});
    std::fs::copy(dir.join("vae_decoder.pt"), dir.join("denoiser.pt")).unwrap();
    let err = load_err(&dir, None);
    assert!(matches!(err, PackageError::ProbeFailed { .. }), "{err}");
    assert!(
        err.to_string().contains("denoiser.pt: probe run failed"),
        "{err}"
    );
}
