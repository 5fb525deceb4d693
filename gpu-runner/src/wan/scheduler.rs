//! Sampling as Wan checkpoints ship it, one step at a time: diffusers' flow UniPC multistep
//! and flow-match Euler schedulers as a pipeline's `scheduler/scheduler_config.json`
//! describes them, ComfyUI's rectified-flow Euler ancestral over any schedule (its `beta`
//! schedule for Phr00t's checkpoints), and Wan 2.2's switch from the high-noise to the
//! low-noise expert.
//!
//! A sampler owns its schedule: [`Sampler::timesteps`] gives the denoiser's timestep for each
//! step, and [`Sampler::step`] takes the velocity the denoiser predicted for the current
//! latents and returns the next latents. Coefficients are computed in float64 from the
//! float32 noise levels the references keep.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{TchError, Tensor};

use crate::sampler::euler_ancestral_rf_step;
use crate::schedule::{self, FinalSigma, FlowSchedule, ScheduleError};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a scheduler config the runner implements \
         (UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler): {source}"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("scheduler config `{field}` = {value} is not supported: {why}")]
    Unsupported {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("ancestral sampling needs one noise tensor per step: {steps} steps, {noise} tensors")]
    NoiseCount { steps: usize, noise: usize },
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(
        "this UniPC config gives a non-finite coefficient at step {step} of {steps}, where \
         diffusers returns NaN or infinite latents; check solver_type, final_sigmas_type and \
         lower_order_final"
    )]
    NotFinite { step: usize, steps: usize },
    #[error("the sampler has already taken all of its {0} steps")]
    Finished(usize),
    #[error(transparent)]
    Torch(#[from] TchError),
}

/// A diffusers `scheduler_config.json`, by its `_class_name`.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "_class_name")]
pub enum SchedulerConfig {
    #[serde(rename = "UniPCMultistepScheduler")]
    UniPc(UniPcConfig),
    #[serde(rename = "FlowMatchEulerDiscreteScheduler")]
    FlowMatchEuler(FlowMatchEulerConfig),
}

impl SchedulerConfig {
    pub fn read(path: &Path) -> Result<SchedulerConfig, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| SchedulerError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The timestep range the expert boundary is a fraction of.
    pub fn num_train_timesteps(&self) -> u32 {
        match self {
            SchedulerConfig::UniPc(c) => c.num_train_timesteps,
            SchedulerConfig::FlowMatchEuler(c) => c.num_train_timesteps,
        }
    }
}

/// `UniPCMultistepScheduler`'s fields that matter with flow sigmas; absent ones take
/// diffusers' defaults.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct UniPcConfig {
    pub num_train_timesteps: u32,
    pub solver_order: usize,
    pub prediction_type: String,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub disable_corrector: Vec<usize>,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigma,
    pub thresholding: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_dynamic_shifting: bool,
    pub shift_terminal: Option<f64>,
    pub solver_p: Option<serde_json::Value>,
}

impl Default for UniPcConfig {
    fn default() -> UniPcConfig {
        UniPcConfig {
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: "epsilon".to_owned(),
            predict_x0: true,
            solver_type: "bh2".to_owned(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigma::Zero,
            thresholding: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_dynamic_shifting: false,
            shift_terminal: None,
            solver_p: None,
        }
    }
}

/// `FlowMatchEulerDiscreteScheduler`'s fields; absent ones take diffusers' defaults.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    pub num_train_timesteps: u32,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerConfig {
    fn default() -> FlowMatchEulerConfig {
        FlowMatchEulerConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }
}

fn refuse<T>(
    field: &'static str,
    value: impl std::fmt::Debug,
    why: &'static str,
) -> Result<T, SchedulerError> {
    Err(SchedulerError::Unsupported {
        field,
        value: format!("{value:?}"),
        why,
    })
}

/// The sigma options other than plain flow sigmas; none is implemented.
fn refuse_other_sigmas(karras: bool, exponential: bool, beta: bool) -> Result<(), SchedulerError> {
    for (field, on) in [
        ("use_karras_sigmas", karras),
        ("use_exponential_sigmas", exponential),
        ("use_beta_sigmas", beta),
    ] {
        if on {
            return refuse(field, on, "only the shifted flow schedule is implemented");
        }
    }
    Ok(())
}

/// A sampler with its schedule and its state between steps.
pub enum Sampler {
    UniPc(FlowUniPc),
    Euler(FlowEuler),
    EulerAncestral(EulerAncestralRf),
}

impl Sampler {
    /// The diffusers scheduler a pipeline was saved with, for `steps` steps.
    pub fn from_config(config: &SchedulerConfig, steps: u32) -> Result<Sampler, SchedulerError> {
        Ok(match config {
            SchedulerConfig::UniPc(c) => Sampler::UniPc(FlowUniPc::new(c, steps)?),
            SchedulerConfig::FlowMatchEuler(c) => Sampler::Euler(FlowEuler::new(c, steps)?),
        })
    }

    pub fn schedule(&self) -> &FlowSchedule {
        match self {
            Sampler::UniPc(s) => &s.schedule,
            Sampler::Euler(s) => &s.schedule,
            Sampler::EulerAncestral(s) => &s.schedule,
        }
    }

    /// The denoiser's timestep at each step.
    pub fn timesteps(&self) -> &[f64] {
        &self.schedule().timesteps
    }

    /// Takes the next step from `sample` given the denoiser's velocity at it.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        match self {
            Sampler::UniPc(s) => s.step(model_output, sample),
            Sampler::Euler(s) => s.step(model_output, sample),
            Sampler::EulerAncestral(s) => s.step(model_output, sample),
        }
    }
}

/// diffusers' `UniPCMultistepScheduler` with `use_flow_sigmas` and `flow_prediction`: a
/// multistep predictor (UniP) and corrector (UniC) on the model's clean predictions
/// `x0 = x - sigma * v`, in the B(h) variant `solver_type` names. Every coefficient depends only
/// on the schedule, so all of them are computed up front.
pub struct FlowUniPc {
    schedule: FlowSchedule,
    plan: Vec<StepPlan>,
    /// The last `solver_order` clean predictions, oldest first.
    outputs: Vec<Option<Tensor>>,
    last_sample: Option<Tensor>,
    index: usize,
}

/// The updates of one step: UniC on the previous step's result, then UniP to the next level.
struct StepPlan {
    correct: Option<Update>,
    predict: Update,
}

/// `x * x_scale - m0 * m0_scale - res_scale * (sum_k rhos[k] * (m_k - m0) / rks[k]
/// [+ rhos[last] * (x0 - m0) for UniC])`, with `m0` the newest clean prediction and `m_k` the
/// one `k` steps older.
struct Update {
    x_scale: f64,
    m0_scale: f64,
    res_scale: f64,
    rks: Vec<f64>,
    rhos: Vec<f64>,
}

impl Update {
    /// From `sigma_s0` to `sigma_t` using the predictions at `history` (newest first, after
    /// `sigma_s0`'s own); `corrector` adds the weight of the new prediction.
    fn new(sigma_t: f64, sigma_s0: f64, history: &[f64], corrector: bool, bh2: bool) -> Update {
        let order = history.len() + 1;
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let rks: Vec<f64> = history
            .iter()
            .map(|&s| (lambda(s) - lambda(sigma_s0)) / h)
            .collect();
        let mut all = rks.clone();
        all.push(1.0);
        let c = Coefficients::new(h, &all, bh2);
        let rhos = match (corrector, order) {
            (true, 1) | (false, 2) => vec![0.5],
            (true, _) => c.solve(order),
            (false, 1) => Vec::new(),
            (false, _) => c.solve(order - 1),
        };
        let alpha_t = 1.0 - sigma_t;
        Update {
            x_scale: sigma_t / sigma_s0,
            m0_scale: alpha_t * c.h_phi_1,
            res_scale: alpha_t * c.b_h,
            rks,
            rhos,
        }
    }

    /// Whether the update stays finite, as in diffusers: a ratio `rk` of 0 divides by zero
    /// (an infinite one only zeroes its term), and B(h) multiplies even a zero residual.
    fn is_finite(&self) -> bool {
        [self.x_scale, self.m0_scale, self.res_scale]
            .iter()
            .chain(&self.rhos)
            .all(|v| v.is_finite())
            && self.rks.iter().all(|rk| *rk != 0.0 && !rk.is_nan())
    }
}

impl FlowUniPc {
    pub fn new(config: &UniPcConfig, steps: u32) -> Result<FlowUniPc, SchedulerError> {
        if !config.use_flow_sigmas {
            return refuse("use_flow_sigmas", false, "Wan's UniPC runs on flow sigmas");
        }
        if config.prediction_type != "flow_prediction" {
            return refuse(
                "prediction_type",
                &config.prediction_type,
                "Wan predicts flow velocities (flow_prediction)",
            );
        }
        if !config.predict_x0 {
            return refuse(
                "predict_x0",
                false,
                "diffusers supports flow_prediction only with predict_x0",
            );
        }
        let bh2 = match config.solver_type.as_str() {
            "bh1" => false,
            // diffusers runs these names as bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            other => return refuse("solver_type", other, "UniPC solvers are bh1 and bh2"),
        };
        if config.solver_order == 0 {
            return refuse("solver_order", 0, "the order must be at least 1");
        }
        if config.thresholding {
            return refuse(
                "thresholding",
                true,
                "dynamic thresholding is not implemented",
            );
        }
        if config.use_dynamic_shifting {
            return refuse(
                "use_dynamic_shifting",
                true,
                "only a fixed flow_shift is implemented",
            );
        }
        if let Some(terminal) = config.shift_terminal {
            return refuse(
                "shift_terminal",
                terminal,
                "terminal stretching is not implemented",
            );
        }
        if let Some(solver) = &config.solver_p {
            return refuse(
                "solver_p",
                solver,
                "an external predictor is not implemented",
            );
        }
        refuse_other_sigmas(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        let schedule = schedule::unipc_flow(
            steps,
            config.num_train_timesteps,
            config.flow_shift,
            config.final_sigmas_type,
        )?;
        let plan = plan(&schedule.sigmas, config, bh2);
        if let Some(step) = plan.iter().position(|p| {
            !p.predict.is_finite() || p.correct.as_ref().is_some_and(|c| !c.is_finite())
        }) {
            return Err(SchedulerError::NotFinite {
                step,
                steps: schedule.steps(),
            });
        }
        Ok(FlowUniPc {
            schedule,
            plan,
            outputs: (0..config.solver_order).map(|_| None).collect(),
            last_sample: None,
            index: 0,
        })
    }

    pub fn schedule(&self) -> &FlowSchedule {
        &self.schedule
    }

    pub fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let i = self.index;
        let Some(plan) = self.plan.get(i) else {
            return Err(SchedulerError::Finished(self.plan.len()));
        };
        let x0 = sample.f_sub(&model_output.f_mul_scalar(self.schedule.sigmas[i])?)?;
        let sample = match (&plan.correct, &self.last_sample) {
            (Some(update), Some(last)) => self.apply(update, last, Some(&x0))?,
            _ => sample.shallow_clone(),
        };
        self.outputs.remove(0);
        self.outputs.push(Some(x0));
        let next = self.apply(&self.plan[i].predict, &sample, None)?;
        self.last_sample = Some(sample);
        self.index += 1;
        Ok(next)
    }

    fn output(&self, back: usize) -> &Tensor {
        self.outputs[self.outputs.len() - 1 - back]
            .as_ref()
            .expect("the plan's orders never reach past the predictions taken so far")
    }

    fn apply(&self, u: &Update, x: &Tensor, x0: Option<&Tensor>) -> Result<Tensor, TchError> {
        let m0 = self.output(0);
        let out = x
            .f_mul_scalar(u.x_scale)?
            .f_sub(&m0.f_mul_scalar(u.m0_scale)?)?;
        let mut terms = Vec::with_capacity(u.rhos.len());
        for (k, rk) in u.rks.iter().enumerate() {
            terms.push(self.output(k + 1).f_sub(m0)?.f_div_scalar(*rk)?);
        }
        if let Some(x0) = x0 {
            terms.push(x0.f_sub(m0)?);
        }
        if terms.is_empty() {
            return Ok(out);
        }
        out.f_sub(&weighted_sum(&u.rhos, &terms)?.f_mul_scalar(u.res_scale)?)
    }
}

/// Each step's updates, with diffusers' order schedule: warming up one order per step, and
/// with `lower_order_final` no higher than the steps left. A step's corrector runs at the
/// order of the step before.
fn plan(sigmas: &[f64], config: &UniPcConfig, bh2: bool) -> Vec<StepPlan> {
    let steps = sigmas.len() - 1;
    let history =
        |i: usize, order: usize| -> Vec<f64> { (1..order).map(|k| sigmas[i - k]).collect() };
    let mut plans: Vec<StepPlan> = Vec::with_capacity(steps);
    let mut previous_order = 0;
    for i in 0..steps {
        let correct = (i > 0 && !config.disable_corrector.contains(&(i - 1))).then(|| {
            Update::new(
                sigmas[i],
                sigmas[i - 1],
                &history(i - 1, previous_order),
                true,
                bh2,
            )
        });
        let cap = if config.lower_order_final {
            config.solver_order.min(steps - i)
        } else {
            config.solver_order
        };
        let order = cap.min(i + 1);
        plans.push(StepPlan {
            correct,
            predict: Update::new(sigmas[i + 1], sigmas[i], &history(i, order), false, bh2),
        });
        previous_order = order;
    }
    plans
}

/// The flow log-SNR `ln(alpha / sigma)` with `alpha = 1 - sigma` (infinite at sigma 0).
fn lambda(sigma: f64) -> f64 {
    (1.0 - sigma).ln() - sigma.ln()
}

fn weighted_sum(weights: &[f64], tensors: &[Tensor]) -> Result<Tensor, TchError> {
    let mut sum = tensors[0].f_mul_scalar(weights[0])?;
    for (w, t) in weights.iter().zip(tensors).skip(1) {
        sum = sum.f_add(&t.f_mul_scalar(*w)?)?;
    }
    Ok(sum)
}

/// UniPC's `R` (powers of the step ratios) and `b` (phi-function terms over `B(h)`).
struct Coefficients {
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
    h_phi_1: f64,
    b_h: f64,
}

impl Coefficients {
    fn new(h: f64, rks: &[f64], bh2: bool) -> Coefficients {
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut r = Vec::with_capacity(rks.len());
        let mut b = Vec::with_capacity(rks.len());
        for i in 1..=rks.len() {
            r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { r, b, h_phi_1, b_h }
    }

    /// Solves the leading `n x n` block of `R rho = b` (Gaussian elimination, partial pivots).
    fn solve(&self, n: usize) -> Vec<f64> {
        let mut a: Vec<Vec<f64>> = (0..n)
            .map(|row| {
                let mut line = self.r[row][..n].to_vec();
                line.push(self.b[row]);
                line
            })
            .collect();
        for col in 0..n {
            let pivot = (col..n)
                .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
                .unwrap_or(col);
            a.swap(col, pivot);
            let pivot_row = a[col].clone();
            for row in a.iter_mut().skip(col + 1) {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
        let mut x = vec![0.0; n];
        for row in (0..n).rev() {
            let tail: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
            x[row] = (a[row][n] - tail) / a[row][row];
        }
        x
    }
}

/// diffusers' `FlowMatchEulerDiscreteScheduler`: `x + (sigma_next - sigma) * v`, the step
/// size taken in float32 and the result cast to the velocity's kind, as diffusers does.
pub struct FlowEuler {
    schedule: FlowSchedule,
    index: usize,
}

impl FlowEuler {
    pub fn new(config: &FlowMatchEulerConfig, steps: u32) -> Result<FlowEuler, SchedulerError> {
        if config.use_dynamic_shifting {
            return refuse(
                "use_dynamic_shifting",
                true,
                "only a fixed shift is implemented",
            );
        }
        if config.invert_sigmas {
            return refuse("invert_sigmas", true, "inverted sigmas are not implemented");
        }
        if let Some(terminal) = config.shift_terminal {
            return refuse(
                "shift_terminal",
                terminal,
                "terminal stretching is not implemented",
            );
        }
        if config.stochastic_sampling {
            return refuse(
                "stochastic_sampling",
                true,
                "use the Euler ancestral sampler for stochastic steps",
            );
        }
        refuse_other_sigmas(
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        )?;
        Ok(FlowEuler {
            schedule: schedule::flow_match_euler(steps, config.num_train_timesteps, config.shift)?,
            index: 0,
        })
    }

    /// Flow Euler on another schedule (its timesteps are the schedule's).
    pub fn on_schedule(schedule: FlowSchedule) -> FlowEuler {
        FlowEuler { schedule, index: 0 }
    }

    pub fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let i = self.index;
        if i >= self.schedule.steps() {
            return Err(SchedulerError::Finished(self.schedule.steps()));
        }
        let dt = self.schedule.sigmas[i + 1] as f32 - self.schedule.sigmas[i] as f32;
        let next = sample
            .f_to_kind(tch::Kind::Float)?
            .f_add(&model_output.f_mul_scalar(f64::from(dt))?)?
            .f_to_kind(model_output.kind())?;
        self.index += 1;
        Ok(next)
    }
}

/// ComfyUI's `sample_euler_ancestral_RF` over a given schedule, with one standard normal
/// noise tensor per step. ComfyUI's denoiser timestep is `sigma * 1000`.
pub struct EulerAncestralRf {
    schedule: FlowSchedule,
    eta: f64,
    noise: Vec<Tensor>,
    index: usize,
}

impl EulerAncestralRf {
    pub fn new(
        schedule: FlowSchedule,
        eta: f64,
        noise: Vec<Tensor>,
    ) -> Result<EulerAncestralRf, SchedulerError> {
        if noise.len() != schedule.steps() {
            return Err(SchedulerError::NoiseCount {
                steps: schedule.steps(),
                noise: noise.len(),
            });
        }
        Ok(EulerAncestralRf {
            schedule,
            eta,
            noise,
            index: 0,
        })
    }

    pub fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let i = self.index;
        if i >= self.schedule.steps() {
            return Err(SchedulerError::Finished(self.schedule.steps()));
        }
        let noise = self.noise[i].f_to_device(sample.device())?;
        let (s, s_next) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let next = euler_ancestral_rf_step(sample, model_output, s, s_next, self.eta, &noise)?;
        self.index += 1;
        Ok(next)
    }
}

/// Which of Wan 2.2's two transformers denoises a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expert {
    /// `transformer`: the early, high-noise steps (and every step of a one-expert model).
    HighNoise,
    /// `transformer_2`: the steps below the boundary.
    LowNoise,
}

/// diffusers' Wan 2.2 rule: the high-noise expert while `timestep >= boundary_ratio *
/// num_train_timesteps`, compared in float32 as the pipeline's tensors compare them; always
/// the high-noise one without a boundary.
pub fn expert_for(timestep: f64, boundary_ratio: Option<f64>, num_train_timesteps: u32) -> Expert {
    match boundary_ratio {
        Some(ratio) if (timestep as f32) < (ratio * f64::from(num_train_timesteps)) as f32 => {
            Expert::LowNoise
        }
        _ => Expert::HighNoise,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_anisora_scheduler_config_parses() {
        let json = r#"{"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.35.0",
            "beta_end": 0.02, "disable_corrector": [], "final_sigmas_type": "zero",
            "flow_shift": 5.0, "lower_order_final": true, "num_train_timesteps": 1000,
            "predict_x0": true, "prediction_type": "flow_prediction", "solver_order": 2,
            "solver_p": null, "solver_type": "bh2", "use_flow_sigmas": true}"#;
        let config: SchedulerConfig = serde_json::from_str(json).unwrap();
        let sampler = Sampler::from_config(&config, 8).unwrap();
        assert_eq!(sampler.timesteps().len(), 8);
        assert_eq!(sampler.timesteps()[0], 999.0);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let config = UniPcConfig {
            use_flow_sigmas: true,
            prediction_type: "flow_prediction".to_owned(),
            thresholding: true,
            ..UniPcConfig::default()
        };
        let err = FlowUniPc::new(&config, 8).err().unwrap();
        assert_eq!(
            err.to_string(),
            "scheduler config `thresholding` = true is not supported: dynamic thresholding is not implemented"
        );
    }

    #[test]
    fn expert_switches_below_the_boundary() {
        assert_eq!(expert_for(900.0, Some(0.9), 1000), Expert::HighNoise);
        assert_eq!(expert_for(899.0, Some(0.9), 1000), Expert::LowNoise);
        assert_eq!(expert_for(1.0, None, 1000), Expert::HighNoise);
    }

    #[test]
    fn uni_coefficients_solve_their_system() {
        let c = Coefficients::new(0.7, &[-1.3, -0.6, 1.0], true);
        let rho = c.solve(3);
        for row in 0..3 {
            let lhs: f64 = (0..3).map(|k| c.r[row][k] * rho[k]).sum();
            assert!((lhs - c.b[row]).abs() < 1e-12);
        }
    }
}
