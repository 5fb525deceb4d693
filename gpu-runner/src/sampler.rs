//! The flow-matching sampling loop. Latents and scheduler math are float32 on the device; the
//! denoiser runs in the package's dtype. Noise comes from the job's seed on the CPU, so a seed
//! gives the same video on any device.
//!
//! Noise contract (tests/reference_sampler.py follows it too): seed the CPU generator with the
//! seed, draw the initial latent noise, then for `euler_ancestral` one tensor per step, all
//! float32 standard normal of the latent shape, before the first step.

use std::sync::Mutex;

use serde::Deserialize;
use tch::{CModule, Device, Kind, TchError, Tensor};

/// How each step moves the latent.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Deterministic Euler over the velocity field.
    Euler,
    /// Rectified-flow Euler ancestral: step down past the next sigma, then renoise to it.
    EulerAncestral,
}

/// Everything about a run's sampling that is not a tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingPlan {
    /// `steps + 1` noise levels, ending at 0.
    pub sigmas: Vec<f64>,
    pub kind: SamplerKind,
    /// Ancestral noise amount, used by `EulerAncestral` only.
    pub eta: f64,
    /// Guidance scale; 1.0 or less runs the denoiser once per step (no unconditional pass).
    pub cfg: f64,
    /// The denoiser's timestep is `sigma * timestep_scale`.
    pub timestep_scale: f64,
}

impl SamplingPlan {
    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    pub fn uses_uncond(&self) -> bool {
        uses_uncond(self.cfg)
    }
}

/// Whether guidance at `scale` needs the unconditional pass. As in diffusers, a scale of 1 or
/// less runs the denoiser once per step on the prompt alone.
pub fn uses_uncond(scale: f64) -> bool {
    scale > 1.0
}

/// Classifier-free guidance: `uncond + scale * (cond - uncond)`.
pub fn guide(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor, TchError> {
    uncond.f_add(&cond.f_sub(uncond)?.f_mul_scalar(scale)?)
}

/// What the per-step callback wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepControl {
    Continue,
    /// Stop at this step boundary; the job ends as cancelled.
    Cancel,
}

/// The job's noise, drawn on the CPU before sampling.
pub struct Noise {
    pub initial: Tensor,
    pub per_step: Vec<Tensor>,
}

/// Seeding and drawing use libtorch's process-wide CPU generator; the lock keeps two jobs'
/// draws from interleaving.
static CPU_GENERATOR: Mutex<()> = Mutex::new(());

impl Noise {
    pub fn draw(seed: u64, shape: &[i64], plan: &SamplingPlan) -> Result<Noise, TchError> {
        let _lock = CPU_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        let opts = (Kind::Float, Device::Cpu);
        let initial = Tensor::f_randn(shape, opts)?;
        let per_step = match plan.kind {
            SamplerKind::Euler => Vec::new(),
            SamplerKind::EulerAncestral => (0..plan.steps())
                .map(|_| Tensor::f_randn(shape, opts))
                .collect::<Result<_, _>>()?,
        };
        Ok(Noise { initial, per_step })
    }
}

/// The sampling loop ended early.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cancelled after {completed} of {total} steps")]
    Cancelled { completed: usize, total: usize },
    #[error("denoising step {step} failed: {source}")]
    Torch { step: usize, source: TchError },
}

/// The denoiser and how to call it.
pub struct Denoiser<'a> {
    pub module: &'a CModule,
    /// The module's dtype; the latent is cast to it and the output back to float32. The
    /// timestep stays float32: in bfloat16, 937.5 would reach the module as 936.
    pub kind: Kind,
}

impl Denoiser<'_> {
    fn velocity(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, TchError> {
        let out = if self.kind == Kind::Float {
            self.module.forward_ts(&[x, timestep, context])?
        } else {
            self.module
                .forward_ts(&[&x.f_to_kind(self.kind)?, timestep, context])?
        };
        out.f_to_kind(Kind::Float)
    }
}

/// Runs the loop from the initial noise to sigma 0 and returns the float32 latents.
/// `on_step(done, total)` runs after every step; returning `Cancel` stops there.
pub fn sample(
    denoiser: &Denoiser<'_>,
    plan: &SamplingPlan,
    noise: &Noise,
    cond: &Tensor,
    uncond: Option<&Tensor>,
    device: Device,
    mut on_step: impl FnMut(usize, usize) -> StepControl,
) -> Result<Tensor, SampleError> {
    let _guard = tch::no_grad_guard();
    let total = plan.steps();
    let torch = |step: usize| move |source: TchError| SampleError::Torch { step, source };
    let mut x = noise.initial.f_to_device(device).map_err(torch(0))?;
    for i in 0..total {
        let (s, s_next) = (plan.sigmas[i], plan.sigmas[i + 1]);
        x = step(
            denoiser,
            plan,
            &x,
            s,
            s_next,
            cond,
            uncond,
            noise.per_step.get(i),
            device,
        )
        .map_err(torch(i))?;
        if on_step(i + 1, total) == StepControl::Cancel {
            return Err(SampleError::Cancelled {
                completed: i + 1,
                total,
            });
        }
    }
    Ok(x)
}

#[allow(clippy::too_many_arguments)]
fn step(
    denoiser: &Denoiser<'_>,
    plan: &SamplingPlan,
    x: &Tensor,
    s: f64,
    s_next: f64,
    cond: &Tensor,
    uncond: Option<&Tensor>,
    step_noise: Option<&Tensor>,
    device: Device,
) -> Result<Tensor, TchError> {
    let t = Tensor::from_slice(&[(s * plan.timestep_scale) as f32]).f_to_device(device)?;
    let mut v = denoiser.velocity(x, &t, cond)?;
    if let (Some(uncond), true) = (uncond, plan.uses_uncond()) {
        v = guide(&v, &denoiser.velocity(x, &t, uncond)?, plan.cfg)?;
    }
    match plan.kind {
        SamplerKind::Euler => x.f_add(&v.f_mul_scalar(s_next - s)?),
        SamplerKind::EulerAncestral => {
            let noise = step_noise
                .expect("Noise::draw gives every ancestral step its noise")
                .f_to_device(device)?;
            euler_ancestral_rf_step(x, &v, s, s_next, plan.eta, &noise)
        }
    }
}

/// One rectified-flow Euler ancestral step (ComfyUI's `sample_euler_ancestral_RF`) from `s` to
/// `s_next`, given the velocity `v` at `x` and this step's standard normal `noise`: the clean
/// prediction `x - s * v` at 0, else a step down past `s_next` renoised back up to it.
pub fn euler_ancestral_rf_step(
    x: &Tensor,
    v: &Tensor,
    s: f64,
    s_next: f64,
    eta: f64,
    noise: &Tensor,
) -> Result<Tensor, TchError> {
    let denoised = x.f_sub(&v.f_mul_scalar(s)?)?;
    if s_next == 0.0 {
        return Ok(denoised);
    }
    let a = ancestral_coefficients(s, s_next, eta);
    let x = x
        .f_mul_scalar(a.keep)?
        .f_add(&denoised.f_mul_scalar(1.0 - a.keep)?)?
        .f_mul_scalar(a.rescale)?;
    x.f_add(&noise.f_mul_scalar(a.renoise)?)
}

/// Scalars of one rectified-flow ancestral step (ComfyUI's `sample_euler_ancestral_RF`):
/// `x' = rescale * (keep * x + (1 - keep) * denoised) + renoise * noise`.
#[derive(Debug, PartialEq)]
struct Ancestral {
    keep: f64,
    rescale: f64,
    renoise: f64,
}

fn ancestral_coefficients(s: f64, s_next: f64, eta: f64) -> Ancestral {
    let sigma_down = s_next * (1.0 + (s_next / s - 1.0) * eta);
    let (alpha_next, alpha_down) = (1.0 - s_next, 1.0 - sigma_down);
    let renoise =
        (s_next.powi(2) - sigma_down.powi(2) * alpha_next.powi(2) / alpha_down.powi(2)).sqrt();
    Ancestral {
        keep: sigma_down / s,
        rescale: alpha_next / alpha_down,
        renoise,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestral_with_eta_zero_is_plain_euler() {
        // sigma_down == s_next: no renoise, no rescale, keep == s_next / s, which is exactly
        // x + (s_next - s) * v with denoised = x - s * v.
        let a = ancestral_coefficients(0.8, 0.5, 0.0);
        assert!((a.keep - 0.625).abs() < 1e-15);
        assert!((a.rescale - 1.0).abs() < 1e-15);
        assert!(a.renoise.abs() < 1e-7);
    }

    #[test]
    fn ancestral_renoise_restores_the_marginal_noise_level() {
        // The renoised latent must have noise std s_next relative to a clean signal scaled by
        // (1 - s_next): (rescale * sigma_down)^2 + renoise^2 == s_next^2.
        let (s, s_next) = (0.9375, 0.8333333);
        let a = ancestral_coefficients(s, s_next, 1.0);
        let sigma_down = a.keep * s;
        let total = (a.rescale * sigma_down).powi(2) + a.renoise.powi(2);
        assert!((total - s_next * s_next).abs() < 1e-12);
    }

    #[test]
    fn guidance_at_or_below_one_skips_the_unconditional_pass() {
        assert!(!uses_uncond(1.0));
        assert!(!uses_uncond(0.5));
        assert!(uses_uncond(1.01));
        let cond = Tensor::from_slice(&[2.0f32]);
        let uncond = Tensor::from_slice(&[1.0f32]);
        assert_eq!(guide(&cond, &uncond, 3.0).unwrap().double_value(&[0]), 4.0);
    }

    #[test]
    fn cfg_one_skips_the_unconditional_pass() {
        let plan = SamplingPlan {
            sigmas: vec![1.0, 0.0],
            kind: SamplerKind::Euler,
            eta: 1.0,
            cfg: 1.0,
            timestep_scale: 1000.0,
        };
        assert!(!plan.uses_uncond());
        assert!(SamplingPlan { cfg: 3.0, ..plan }.uses_uncond());
    }
}
