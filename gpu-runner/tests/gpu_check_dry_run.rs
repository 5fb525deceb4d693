//! `just gpu-check`'s dry run on the CPU, as a lent GPU session would start it but at tiny
//! shapes: gpu-check.sh writes the tiny models into its default work directory, and the
//! gpu_check example runs four alternating jobs in each memory mode (resident, expert-swap,
//! model-offload) under a tiny cap the fit check admits them in, switching back to each model
//! from host memory, and times diffusers in the same mode. A second cap, 500 MB, leaves no
//! usable bytes: the fit check refuses every job, which is not run (a forced job shows the
//! refusal on a GPU only). The models must still be there afterwards: a later configuration,
//! or a second device call on a warm machine, reads them again.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn gpu_check_binary() -> PathBuf {
    // `cargo test` builds the examples too; this also covers a run of this test alone.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "framelane-runner",
            "--example",
            "gpu_check",
        ])
        .status()
        .expect("cargo runs");
    assert!(built.success(), "building the gpu_check example failed");
    // target/<profile>/deps/<this test> -> target/<profile>/examples/gpu_check
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/gpu_check")
}

#[test]
fn the_gpu_check_dry_run_passes_in_every_mode_and_keeps_its_models() {
    let binary = gpu_check_binary();
    let tmp = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    let out = Command::new(&script)
        .args([
            "--tiny",
            "--jobs",
            "4",
            "--sizes",
            "64x48x9",
            "--show-refusal",
        ])
        .args(["--caps", "600M,500M"])
        .args(["--allocs", "expandable_segments:True", "--binary"])
        .arg(&binary)
        .env("FRAMELANE_TORCH_PYTHON", common::python())
        .env("TMPDIR", tmp.path())
        .output()
        .expect("gpu-check.sh runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpu-check.sh failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["Resident", "ExpertSwap", "ModelOffload"] {
        assert!(
            text.contains(&format!("mode {mode}, 64x48x9")),
            "no configuration in {mode}:\n{text}"
        );
    }
    for mode in ["Resident", "ExpertSwap", "ModelOffload"] {
        assert!(
            text.contains(&format!(
                "cap 0.500 GB, mode {mode}, (64, 48, 9): the fit check refuses a14b: needs "
            )),
            "{text}"
        );
    }
    assert!(
        text.contains("the refusal is not shown on the CPU"),
        "{text}"
    );
    let lines = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    // Per cap: each model's first job loads its files, its second comes back from host memory.
    assert_eq!(lines("s from files,"), 6, "{text}");
    assert_eq!(lines("s from host ,"), 6, "{text}");
    // Each model's seconds per step against diffusers', under each cap.
    assert_eq!(lines(", ratio "), 6, "{text}");
    assert!(text.contains("gpu-check: passed"), "{text}");
    assert!(
        tmp.path()
            .join("framelane-gpu-check/models-tiny/.complete")
            .exists(),
        "the run removed its own models"
    );
}
