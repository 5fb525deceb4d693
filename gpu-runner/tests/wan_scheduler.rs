//! The samplers against tests/wan_sampler_reference.py: diffusers' flow UniPC and flow-match
//! Euler schedulers (read from the scheduler_config.json diffusers saved), ComfyUI's `beta`
//! schedule and rectified-flow Euler ancestral (written from ComfyUI's definitions), and the
//! expert diffusers' WanImageToVideoPipeline runs at each step.
//!
//! Every sampler is driven by the same fixed model (velocity `a[i] * x + r[i]`) and every
//! step's latents must agree within 1e-5.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use framelane_runner::sampler::uses_uncond;
use framelane_runner::schedule::{self, FlowSchedule};
use framelane_runner::wan::safetensors::TensorFiles;
use framelane_runner::wan::scheduler::{
    EulerAncestralRf, Expert, Sampler, SchedulerConfig, expert_for,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn reference() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::run_python("wan_sampler_reference.py", &[dir.path()], None);
        dir
    })
    .path()
}

fn summary() -> &'static Value {
    static SUMMARY: OnceLock<Value> = OnceLock::new();
    SUMMARY.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(reference().join("summary.json")).unwrap())
            .unwrap()
    })
}

fn floats(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// The references hold float32 values; JSON carries them as shortest decimals, which
/// serde_json may read one float64 ulp off, so both sides are compared as float32.
fn as_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

fn assert_schedule(label: &str, ours: &FlowSchedule, case: &Value) {
    assert_eq!(
        as_f32(&ours.timesteps),
        as_f32(&floats(&case["timesteps"])),
        "{label}: timesteps"
    );
    assert_eq!(
        as_f32(&ours.sigmas),
        as_f32(&floats(&case["sigmas"])),
        "{label}: sigmas"
    );
}

/// Runs `sampler` with the case's fixed model and checks every step's latents.
fn assert_steps(
    label: &str,
    name: &str,
    case: &Value,
    mut step: impl FnMut(&Tensor, &Tensor) -> Tensor,
) {
    let tensors = TensorFiles::open(&[reference().join(format!("{name}.safetensors"))]).unwrap();
    let get = |n: &str| tensors.weight(n, Kind::Float, Device::Cpu).unwrap();
    let a = floats(&case["a"]);
    let mut x = get("x");
    let mut worst = 0.0f64;
    for (i, a) in a.iter().enumerate() {
        let velocity = x
            .f_mul_scalar(*a)
            .unwrap()
            .f_add(&get(&format!("r.{i}")))
            .unwrap();
        x = step(&velocity, &x);
        let expected = get(&format!("x.{i}"));
        let diff = (&x - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{label}: step {i} differs by {diff:e}");
        worst = worst.max(diff);
    }
    let scale = x.abs().max().double_value(&[]);
    assert!(scale > 0.1, "{label}: degenerate latents");
    println!(
        "{label}: {} steps, max |ours - reference| = {worst:e}",
        a.len()
    );
}

#[test]
fn diffusers_unipc_and_euler_match_step_by_step_within_1e_5() {
    let cases = summary()["diffusers"].as_object().unwrap();
    assert_eq!(cases.len(), 7);
    for (name, case) in cases {
        let config =
            SchedulerConfig::read(&reference().join(name).join("scheduler_config.json")).unwrap();
        let steps = case["steps"].as_u64().unwrap() as u32;
        let mut sampler = Sampler::from_config(&config, steps).unwrap();
        assert_schedule(name, sampler.schedule(), case);
        assert_steps(name, name, case, |v, x| sampler.step(v, x).unwrap());
        assert!(
            sampler
                .step(
                    &Tensor::zeros([1], (Kind::Float, Device::Cpu)),
                    &Tensor::zeros([1], (Kind::Float, Device::Cpu))
                )
                .is_err()
        );
    }
}

/// diffusers' UniPC runs some configs into NaN or infinity (bh1 or a high order at the last
/// step); the runner refuses exactly those.
#[test]
fn unipc_configs_are_refused_exactly_where_diffusers_goes_non_finite() {
    let cases = summary()["finite"].as_object().unwrap();
    assert_eq!(cases.len(), 16);
    let mut refused = 0;
    for (name, finite) in cases {
        let config =
            SchedulerConfig::read(&reference().join(name).join("scheduler_config.json")).unwrap();
        let result = Sampler::from_config(&config, 6);
        assert_eq!(result.is_ok(), finite.as_bool().unwrap(), "{name}");
        if let Err(err) = result {
            assert!(
                err.to_string()
                    .starts_with("this UniPC config gives a non-finite coefficient at step 5 of 6"),
                "{name}: {err}"
            );
            refused += 1;
        }
    }
    assert!(refused > 0 && refused < 16, "{refused} refused");
}

#[test]
fn comfyui_euler_ancestral_over_the_beta_schedule_matches_within_1e_5() {
    let cases = summary()["comfy"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for (label, case) in cases {
        let steps = case["steps"].as_u64().unwrap() as u32;
        let schedule =
            schedule::comfy_beta(steps, case["shift"].as_f64().unwrap(), 0.6, 0.6).unwrap();
        assert_schedule(label, &schedule, case);
        let file = match label.as_str() {
            "phr00t" => "ancestral_phr00t",
            "shift5_eta07" => "ancestral_shift5_eta07",
            _ => "ancestral_shift1_eta0",
        };
        let tensors =
            TensorFiles::open(&[reference().join(format!("{file}.safetensors"))]).unwrap();
        let noise = (0..schedule.steps())
            .map(|i| {
                tensors
                    .weight(&format!("noise.{i}"), Kind::Float, Device::Cpu)
                    .unwrap()
            })
            .collect();
        let mut sampler =
            EulerAncestralRf::new(schedule, case["eta"].as_f64().unwrap(), noise).unwrap();
        assert_steps(label, file, case, |v, x| sampler.step(v, x).unwrap());
    }
}

#[test]
fn beta_schedule_matches_comfyui_for_1_to_24_steps() {
    for (steps, sigmas) in summary()["beta_sigmas"].as_object().unwrap() {
        let ours = schedule::comfy_beta(steps.parse().unwrap(), 8.0, 0.6, 0.6).unwrap();
        assert_eq!(
            as_f32(&ours.sigmas),
            as_f32(&floats(sigmas)),
            "{steps} steps"
        );
    }
}

#[test]
fn experts_and_guidance_passes_follow_the_wan_i2v_pipeline() {
    let runs = summary()["pipeline"].as_object().unwrap();
    assert_eq!(runs.len(), 2);
    for (label, run) in runs {
        let config = SchedulerConfig::read(
            &reference()
                .join(format!("pipeline_{label}"))
                .join("scheduler_config.json"),
        )
        .unwrap();
        let steps = run["steps"].as_u64().unwrap() as u32;
        let ratio = run["boundary_ratio"].as_f64().unwrap();
        let sampler = Sampler::from_config(&config, steps).unwrap();
        let per_step = run["per_step"].as_array().unwrap();
        assert_eq!(per_step.len(), sampler.timesteps().len(), "{label}");
        let passes = 1 + usize::from(uses_uncond(run["guidance"].as_f64().unwrap()));
        for (t, seen) in sampler.timesteps().iter().zip(per_step) {
            let expected = match seen["expert"].as_str().unwrap() {
                "high" => Expert::HighNoise,
                _ => Expert::LowNoise,
            };
            assert_eq!(
                expert_for(*t, Some(ratio), config.num_train_timesteps()),
                expected,
                "{label} at {t}"
            );
            assert_eq!(
                *t as f32,
                seen["timestep"].as_f64().unwrap() as f32,
                "{label}"
            );
            assert_eq!(seen["calls"].as_u64().unwrap() as usize, passes, "{label}");
        }
        let switches = per_step
            .windows(2)
            .filter(|w| w[0]["expert"] != w[1]["expert"])
            .count();
        assert_eq!(switches, 1, "{label}: both experts run");
    }
}

#[test]
fn unsupported_scheduler_configs_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(
        &path,
        r#"{"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true,
            "prediction_type": "flow_prediction", "use_karras_sigmas": true}"#,
    )
    .unwrap();
    let config = SchedulerConfig::read(&path).unwrap();
    let err = Sampler::from_config(&config, 8).err().unwrap();
    assert_eq!(
        err.to_string(),
        "scheduler config `use_karras_sigmas` = true is not supported: only the shifted flow schedule is implemented"
    );
    std::fs::write(&path, r#"{"_class_name": "UniPCMultistepScheduler"}"#).unwrap();
    let err = Sampler::from_config(&SchedulerConfig::read(&path).unwrap(), 8)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "scheduler config `use_flow_sigmas` = false is not supported: Wan's UniPC runs on flow sigmas"
    );
    std::fs::write(&path, r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    let err = SchedulerConfig::read(&path).err().unwrap();
    assert!(
        err.to_string().starts_with(&format!(
            "{} is not a scheduler config the runner implements (UniPCMultistepScheduler or \
             FlowMatchEulerDiscreteScheduler): unknown variant `DDIMScheduler`",
            path.display()
        )),
        "{err}"
    );
}
