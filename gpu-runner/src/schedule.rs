//! Flow-matching noise schedules: pure arithmetic, no tensors.
//!
//! A schedule is `steps + 1` noise levels going from (close to) 1 down to 0; step `i` moves
//! the latent from `sigmas[i]` to `sigmas[i + 1]`. These are the schedules the Wan
//! checkpoints ship with, value for value as their reference computes them: diffusers' flow
//! UniPC ([`unipc_flow`]) and flow-match Euler ([`flow_match_euler`]) schedulers, and
//! ComfyUI's `beta` scheduler over its discrete flow table ([`comfy_beta`]). The references
//! keep sigmas in float32, and so do these (as `f64` holding float32 values).

use serde::Deserialize;

/// Why a schedule cannot be used for a number of steps.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("`shift` must be a finite number > 0, got {0}")]
    BadShift(f64),
    #[error("`steps` must be at least 1")]
    NoSteps,
    #[error("`num_train_timesteps` must be at least 2, got {0}")]
    BadTrainTimesteps(u32),
}

fn check_shift(shift: f64) -> Result<(), ScheduleError> {
    if !shift.is_finite() || shift <= 0.0 {
        return Err(ScheduleError::BadShift(shift));
    }
    Ok(())
}

/// The flow-matching time shift of Wan, SD3 and ComfyUI: `shift * s / (1 + (shift - 1) * s)`.
pub fn time_shift(shift: f64, s: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

/// [`time_shift`] evaluated in float32 the way a float32 tensor evaluates it: the scalars
/// `shift` and `shift - 1` are rounded to float32 first.
fn time_shift_f32(shift: f64, s: f32) -> f32 {
    (shift as f32 * s) / (1.0 + (shift - 1.0) as f32 * s)
}

/// Noise levels and the timesteps the denoiser sees.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSchedule {
    /// `steps + 1` noise levels; the last is 0 unless the schedule ends at its smallest level.
    pub sigmas: Vec<f64>,
    /// The denoiser's timestep for each of the `steps` steps.
    pub timesteps: Vec<f64>,
}

impl FlowSchedule {
    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }
}

/// Where a diffusers multistep schedule ends (`final_sigmas_type`).
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigma {
    /// At 0: the last step returns the model's clean prediction.
    #[default]
    Zero,
    /// At the smallest shifted level of the schedule.
    SigmaMin,
}

/// diffusers' `UniPCMultistepScheduler.set_timesteps` with `use_flow_sigmas`: `steps` levels
/// spread over `linspace(1, 1 / num_train_timesteps)`, shifted, the first pulled 1e-6 below 1
/// (its log would be infinite), and integer timesteps `trunc(sigma * num_train_timesteps)`.
pub fn unipc_flow(
    steps: u32,
    num_train_timesteps: u32,
    flow_shift: f64,
    final_sigma: FinalSigma,
) -> Result<FlowSchedule, ScheduleError> {
    check_counts(steps, num_train_timesteps)?;
    check_shift(flow_shift)?;
    let n = f64::from(num_train_timesteps);
    let delta = (1.0 / n - 1.0) / f64::from(steps);
    let mut sigmas: Vec<f64> = (0..steps)
        .map(|i| time_shift(flow_shift, f64::from(i) * delta + 1.0))
        .collect();
    if (sigmas[0] - 1.0).abs() < 1e-6 {
        sigmas[0] -= 1e-6;
    }
    let timesteps = sigmas.iter().map(|s| (s * n).trunc()).collect();
    let last = match final_sigma {
        FinalSigma::Zero => 0.0,
        FinalSigma::SigmaMin => sigmas[sigmas.len() - 1],
    };
    sigmas.push(last);
    Ok(FlowSchedule {
        sigmas: sigmas.into_iter().map(|s| f64::from(s as f32)).collect(),
        timesteps,
    })
}

/// diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` (no dynamic shifting): timesteps
/// spread over its training range, whose ends are already shifted, then shifted again, as
/// diffusers does.
pub fn flow_match_euler(
    steps: u32,
    num_train_timesteps: u32,
    shift: f64,
) -> Result<FlowSchedule, ScheduleError> {
    check_counts(steps, num_train_timesteps)?;
    check_shift(shift)?;
    let n = f64::from(num_train_timesteps);
    let sigma_max = f64::from(time_shift_f32(shift, 1.0));
    let sigma_min = f64::from(time_shift_f32(shift, 1.0 / num_train_timesteps as f32));
    let (start, stop) = (sigma_max * n, sigma_min * n);
    let delta = if steps > 1 {
        (stop - start) / f64::from(steps - 1)
    } else {
        0.0
    };
    let mut sigmas: Vec<f32> = (0..steps)
        .map(|i| {
            let t = if i + 1 == steps && steps > 1 {
                stop
            } else {
                f64::from(i) * delta + start
            };
            time_shift(shift, t / n) as f32
        })
        .collect();
    let timesteps = sigmas
        .iter()
        .map(|&s| f64::from(s * num_train_timesteps as f32))
        .collect();
    sigmas.push(0.0);
    Ok(FlowSchedule {
        sigmas: sigmas.into_iter().map(f64::from).collect(),
        timesteps,
    })
}

/// ComfyUI's discrete flow table (`ModelSamplingDiscreteFlow`, 1000 entries, multiplier
/// 1000): entry `i` is the shifted level of `(i + 1) / 1000`.
fn comfy_flow_sigma(shift: f64, index: usize) -> f32 {
    let t = (index as f32 + 1.0) / 1000.0 * 1000.0 / 1000.0;
    if shift == 1.0 {
        t
    } else {
        time_shift_f32(shift, t)
    }
}

/// ComfyUI's `beta` scheduler (alpha = beta = 0.6 by default) over its discrete flow table
/// with `shift`: `steps` quantiles of a Beta(alpha, beta) distribution picked as table
/// indices, repeats dropped, then 0. The denoiser's timestep is `sigma * 1000`.
pub fn comfy_beta(
    steps: u32,
    shift: f64,
    alpha: f64,
    beta: f64,
) -> Result<FlowSchedule, ScheduleError> {
    check_counts(steps, 1000)?;
    check_shift(shift)?;
    let total = 999.0;
    let step = 1.0 / f64::from(steps);
    let mut sigmas: Vec<f32> = Vec::new();
    let mut last = None;
    for i in 0..steps {
        let index = (beta_ppf(1.0 - f64::from(i) * step, alpha, beta) * total).round_ties_even();
        if last != Some(index) {
            sigmas.push(comfy_flow_sigma(shift, index as usize));
        }
        last = Some(index);
    }
    let timesteps = sigmas.iter().map(|&s| f64::from(s * 1000.0)).collect();
    sigmas.push(0.0);
    Ok(FlowSchedule {
        sigmas: sigmas.into_iter().map(f64::from).collect(),
        timesteps,
    })
}

fn check_counts(steps: u32, num_train_timesteps: u32) -> Result<(), ScheduleError> {
    if steps == 0 {
        return Err(ScheduleError::NoSteps);
    }
    if num_train_timesteps < 2 {
        return Err(ScheduleError::BadTrainTimesteps(num_train_timesteps));
    }
    Ok(())
}

/// The quantile function of the Beta(a, b) distribution: the `x` in [0, 1] with
/// `I_x(a, b) = q`, found by bisection on the regularized incomplete beta function.
pub fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    // A symmetric distribution's median is exactly 1/2. Bisection would land a rounding error
    // away from it, and ComfyUI's `rint(0.5 * 999)` then picks a different table entry.
    if a == b && q == 0.5 {
        return 0.5;
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if regularized_incomplete_beta(mid, a, b) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// `I_x(a, b)` by its continued fraction (modified Lentz), on the side where it converges fast.
fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(x, a, b) / a
    } else {
        1.0 - front * beta_continued_fraction(1.0 - x, b, a) / b
    }
}

fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let clamp = |v: f64| if v.abs() < TINY { TINY } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0));
    let mut h = d;
    for m in 1..=1000 {
        let m = f64::from(m);
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        d = 1.0 / clamp(1.0 + even * d);
        c = clamp(1.0 + even / c);
        h *= d * c;
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        d = 1.0 / clamp(1.0 + odd * d);
        c = clamp(1.0 + odd / c);
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms: about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const COEFFS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series where it is accurate.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let series = COEFFS[1..]
        .iter()
        .enumerate()
        .fold(COEFFS[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles() {
        assert_eq!(beta_ppf(0.5, 0.6, 0.6), 0.5);
        assert_eq!(beta_ppf(1.0, 0.6, 0.6), 1.0);
        assert_eq!(beta_ppf(0.0, 0.6, 0.6), 0.0);
        // Beta(1, 1) is uniform; Beta(2, 1) has CDF x^2.
        assert!((beta_ppf(0.3, 1.0, 1.0) - 0.3).abs() < 1e-14);
        assert!((beta_ppf(0.25, 2.0, 1.0) - 0.5).abs() < 1e-14);
        for q in [0.01, 0.125, 0.37, 0.875, 0.999] {
            let x = beta_ppf(q, 0.6, 0.6);
            assert!(
                (regularized_incomplete_beta(x, 0.6, 0.6) - q).abs() < 1e-13,
                "{q}"
            );
            assert!((x + beta_ppf(1.0 - q, 0.6, 0.6) - 1.0).abs() < 1e-12, "{q}");
        }
    }

    #[test]
    fn ln_gamma_known_values() {
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        assert!((ln_gamma(0.6) - 0.398_233_858_069_234_84).abs() < 1e-13);
    }

    #[test]
    fn unipc_flow_starts_just_below_one_and_truncates_timesteps() {
        let s = unipc_flow(8, 1000, 5.0, FinalSigma::Zero).unwrap();
        assert_eq!(s.steps(), 8);
        assert_eq!(s.sigmas.len(), 9);
        assert_eq!(s.sigmas[8], 0.0);
        assert_eq!(s.sigmas[0], f64::from((1.0f64 - 1e-6) as f32));
        assert_eq!(s.timesteps[0], 999.0);
        let last = unipc_flow(8, 1000, 5.0, FinalSigma::SigmaMin).unwrap();
        assert_eq!(last.sigmas[8], last.sigmas[7]);
        assert_eq!(
            unipc_flow(0, 1000, 5.0, FinalSigma::Zero),
            Err(ScheduleError::NoSteps)
        );
    }

    #[test]
    fn comfy_beta_drops_repeated_table_entries() {
        // Many steps map several quantiles to the same one of 1000 table entries.
        let s = comfy_beta(600, 8.0, 0.6, 0.6).unwrap();
        assert!(s.steps() < 600);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(s.sigmas[0], 1.0);
    }
}
