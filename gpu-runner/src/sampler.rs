//! Step arithmetic the solvers share: classifier-free guidance (and when it is skipped), one
//! rectified-flow Euler ancestral step, and the per-step callback's answer.

use tch::{TchError, Tensor};

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
}
