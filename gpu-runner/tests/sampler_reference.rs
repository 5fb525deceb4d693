//! The Rust sampling loop against tests/reference_sampler.py: same TorchScript modules, same
//! seed, both samplers, both models' settings (anisora: 8 steps, shift, cfg 3; phr00t: 4
//! steps, explicit sigmas, cfg 1).

mod common;

use std::path::Path;

use framelane_runner::generate::{encode_prompt, latent_shape, plan_for};
use framelane_runner::package::ModelPackage;
use framelane_runner::sampler::{self, Denoiser, Noise, SamplerKind, StepControl};
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn rust_latents(pkg: &ModelPackage, kind: SamplerKind, seed: u32) -> Tensor {
    let job = common::job("ref", seed);
    let plan = sampler::SamplingPlan {
        kind,
        ..plan_for(pkg, &job)
    };
    let shape = latent_shape(pkg, &job).unwrap();
    let cond = encode_prompt(pkg, &job.prompt).unwrap();
    let uncond = plan
        .uses_uncond()
        .then(|| encode_prompt(pkg, job.negative_prompt.as_deref().unwrap()).unwrap());
    let noise = Noise::draw(u64::from(seed), &shape, &plan).unwrap();
    let denoiser = Denoiser {
        module: &pkg.denoiser,
        kind: Kind::Float,
    };
    sampler::sample(
        &denoiser,
        &plan,
        &noise,
        &cond,
        uncond.as_ref(),
        Device::Cpu,
        |_, _| StepControl::Continue,
    )
    .unwrap()
}

fn python_case(
    dir: &Path,
    pkg: &ModelPackage,
    kind: SamplerKind,
    seed: u32,
    out: &Path,
) -> serde_json::Value {
    let job = common::job("ref", seed);
    let plan = plan_for(pkg, &job);
    json!({
        "package": dir, "prompt": job.prompt, "negativePrompt": job.negative_prompt,
        "width": job.width, "height": job.height, "frames": job.frames, "seed": seed,
        "sampler": match kind { SamplerKind::Euler => "euler", SamplerKind::EulerAncestral => "euler_ancestral" },
        "cfg": plan.cfg, "eta": plan.eta, "sigmas": plan.sigmas, "out": out,
    })
}

#[test]
fn rust_sampler_matches_python_reference_within_1e_5() {
    let device = common::cpu();
    let work = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    let mut rust = Vec::new();
    for (model, dir) in [("anisora", common::anisora()), ("phr00t", common::phr00t())] {
        let pkg = ModelPackage::load(&dir, device.device, None).unwrap();
        for kind in [SamplerKind::Euler, SamplerKind::EulerAncestral] {
            let seed = 1234;
            let out = work.path().join(format!("{model}-{kind:?}.f32"));
            cases.push(python_case(&dir, &pkg, kind, seed, &out));
            rust.push((
                format!("{model}/{kind:?}"),
                rust_latents(&pkg, kind, seed),
                out,
            ));
        }
    }
    common::run_python(
        "reference_sampler.py",
        &[],
        Some(&serde_json::to_string(&cases).unwrap()),
    );
    for (label, latents, out) in rust {
        let bytes = std::fs::read(&out).unwrap();
        let reference: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let reference = Tensor::from_slice(&reference).view(latents.size().as_slice());
        let max_diff = (&latents - &reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]);
        println!("{label}: max |rust - python| = {max_diff:e} (max |x| = {scale:.3})");
        assert!(scale > 0.1, "{label}: degenerate latents");
        assert!(
            max_diff < 1e-5,
            "{label}: max difference {max_diff:e} >= 1e-5"
        );
    }
}

#[test]
fn different_seeds_give_different_latents() {
    let device = common::cpu();
    let pkg = ModelPackage::load(&common::phr00t(), device.device, None).unwrap();
    let a = rust_latents(&pkg, SamplerKind::Euler, 1);
    let b = rust_latents(&pkg, SamplerKind::Euler, 2);
    let c = rust_latents(&pkg, SamplerKind::Euler, 1);
    assert!((&a - &b).abs().max().double_value(&[]) > 1e-3);
    assert_eq!((&a - &c).abs().max().double_value(&[]), 0.0);
}

#[test]
fn bf16_modules_with_fp32_scheduler_math_stay_close_to_fp32() {
    let device = common::cpu();
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::anisora()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let manifest = tmp.path().join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"float32\"", "\"bfloat16\"")).unwrap();

    let f32_pkg = ModelPackage::load(&common::anisora(), device.device, None).unwrap();
    let bf16_pkg = ModelPackage::load(tmp.path(), device.device, None).unwrap();
    let (_, weight) = bf16_pkg.denoiser.named_parameters().unwrap().remove(0);
    assert_eq!(weight.kind(), Kind::BFloat16);

    let job = common::job("bf16", 5);
    let mut go = |_: &framelane_runner::generate::Progress| StepControl::Continue;
    let a = framelane_runner::generate::denoise(&f32_pkg, &job, &mut go).unwrap();
    let b = framelane_runner::generate::denoise(&bf16_pkg, &job, &mut go).unwrap();
    assert_eq!(b.kind(), Kind::Float, "latents stay float32");
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]);
    assert!(
        diff > 0.0 && diff < 0.05 * scale,
        "bf16 drift {diff} vs scale {scale}"
    );
}
