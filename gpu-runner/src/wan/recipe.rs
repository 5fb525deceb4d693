//! How a model samples: its solver on its noise schedule, and where its two experts switch.
//! A recipe builds each job's [`Sampler`] and draws the job's noise.
//!
//! Noise contract: libtorch's CPU generator, seeded with the job's seed, draws the initial
//! latents (float32 standard normal, as diffusers' pipelines draw them from a seeded CPU
//! generator), then for the ancestral solver one tensor of the same shape per step. A seed
//! therefore starts from the same noise on any device.

use std::sync::Mutex;

use tch::{Device, Kind, TchError, Tensor};

use super::scheduler::{
    EulerAncestralRf, FlowEuler, FlowMatchEulerConfig, Sampler, SchedulerConfig, SchedulerError,
    UniPcConfig,
};
use crate::schedule::{self, FlowSchedule};

/// ComfyUI's `beta` schedule parameters, as its KSampler runs it.
const BETA_ALPHA: f64 = 0.6;
const BETA_BETA: f64 = 0.6;
/// The timestep range of the samplers that do not come from a diffusers config.
const TRAIN_TIMESTEPS: u32 = 1000;

/// A solver and the schedule it runs on.
#[derive(Clone, Debug, PartialEq)]
pub enum Solver {
    /// A diffusers scheduler as its config describes it: flow UniPC or flow-match Euler, each
    /// on its own shifted schedule.
    Scheduler(SchedulerConfig),
    /// Flow Euler on ComfyUI's `beta` schedule over its flow table shifted by `shift`.
    EulerBeta { shift: f64 },
    /// Rectified-flow Euler ancestral (ComfyUI's `euler_ancestral_RF`) with noise `eta`, on
    /// ComfyUI's `beta` schedule or diffusers' flow-match Euler schedule, shifted by `shift`.
    EulerAncestral {
        schedule: AncestralSchedule,
        shift: f64,
        eta: f64,
    },
}

/// The noise levels the ancestral solver steps through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AncestralSchedule {
    /// ComfyUI's `beta` (alpha = beta = 0.6).
    Beta,
    /// diffusers' flow-match Euler levels.
    Flow,
}

impl Solver {
    /// The solver Wan's diffusers pipelines are saved with: UniPC multistep (order 2, bh2) on
    /// flow sigmas shifted by `shift`.
    pub fn wan_unipc(shift: f64) -> Solver {
        Solver::Scheduler(SchedulerConfig::UniPc(UniPcConfig {
            prediction_type: "flow_prediction".to_owned(),
            use_flow_sigmas: true,
            flow_shift: shift,
            ..UniPcConfig::default()
        }))
    }

    /// diffusers' flow-match Euler with `shift`.
    pub fn flow_euler(shift: f64) -> Solver {
        Solver::Scheduler(SchedulerConfig::FlowMatchEuler(FlowMatchEulerConfig {
            shift,
            ..FlowMatchEulerConfig::default()
        }))
    }

    /// The timestep range the expert boundary is a fraction of.
    pub fn num_train_timesteps(&self) -> u32 {
        match self {
            Solver::Scheduler(config) => config.num_train_timesteps(),
            Solver::EulerBeta { .. } | Solver::EulerAncestral { .. } => TRAIN_TIMESTEPS,
        }
    }

    /// Whether the denoiser's velocity is taken in float32, as ComfyUI's samplers take it;
    /// diffusers' schedulers take it in the transformer's dtype.
    pub fn wants_float_velocity(&self) -> bool {
        !matches!(self, Solver::Scheduler(_))
    }

    /// Checks the solver can be built, for any number of steps.
    pub fn check(&self) -> Result<(), SchedulerError> {
        self.schedule_and_sampler(1).map(|_| ())
    }

    /// The sampler for `steps` steps, and how many noise tensors it takes after the initial
    /// latents (one per step for the ancestral solver, else none).
    fn schedule_and_sampler(&self, steps: u32) -> Result<Pending, SchedulerError> {
        Ok(match self {
            Solver::Scheduler(config) => Pending::Ready(Sampler::from_config(config, steps)?),
            Solver::EulerBeta { shift } => Pending::Ready(Sampler::Euler(FlowEuler::on_schedule(
                schedule::comfy_beta(steps, *shift, BETA_ALPHA, BETA_BETA)?,
            ))),
            Solver::EulerAncestral {
                schedule: which,
                shift,
                eta,
            } => {
                let schedule = match which {
                    AncestralSchedule::Beta => {
                        schedule::comfy_beta(steps, *shift, BETA_ALPHA, BETA_BETA)?
                    }
                    AncestralSchedule::Flow => {
                        schedule::flow_match_euler(steps, TRAIN_TIMESTEPS, *shift)?
                    }
                };
                Pending::Ancestral(schedule, *eta)
            }
        })
    }

    /// The job's initial latents of `shape` (float32, on the CPU) and its sampler, drawing
    /// the noise as the module doc says.
    pub fn start(
        &self,
        steps: u32,
        seed: u64,
        shape: &[i64],
    ) -> Result<(Tensor, Sampler), SchedulerError> {
        let pending = self.schedule_and_sampler(steps)?;
        let _lock = CPU_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        let options = (Kind::Float, Device::Cpu);
        let initial = Tensor::f_randn(shape, options)?;
        let sampler = match pending {
            Pending::Ready(sampler) => sampler,
            Pending::Ancestral(schedule, eta) => {
                let noise = (0..schedule.steps())
                    .map(|_| Tensor::f_randn(shape, options))
                    .collect::<Result<Vec<_>, TchError>>()?;
                Sampler::EulerAncestral(EulerAncestralRf::new(schedule, eta, noise)?)
            }
        };
        Ok((initial, sampler))
    }
}

/// A sampler, or an ancestral one still waiting for its noise.
enum Pending {
    Ready(Sampler),
    Ancestral(FlowSchedule, f64),
}

/// Seeding and drawing use libtorch's process-wide CPU generator; the lock keeps two jobs'
/// draws from interleaving.
static CPU_GENERATOR: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestral_noise_follows_the_initial_latents() {
        let solver = Solver::EulerAncestral {
            schedule: AncestralSchedule::Beta,
            shift: 8.0,
            eta: 1.0,
        };
        let (initial, sampler) = solver.start(4, 7, &[1, 2, 1, 2, 2]).unwrap();
        assert_eq!(sampler.timesteps().len(), 4);
        tch::manual_seed(7);
        let expected = Tensor::randn([1, 2, 1, 2, 2], (Kind::Float, Device::Cpu));
        assert_eq!(initial, expected);
    }

    #[test]
    fn comfy_solvers_time_steps_by_sigma_times_1000() {
        let solver = Solver::EulerAncestral {
            schedule: AncestralSchedule::Flow,
            shift: 5.0,
            eta: 1.0,
        };
        let (_, sampler) = solver.start(8, 0, &[1]).unwrap();
        let s = sampler.schedule();
        for (t, sigma) in s.timesteps.iter().zip(&s.sigmas) {
            assert_eq!(*t, f64::from(*sigma as f32 * 1000.0));
        }
        assert!(solver.wants_float_velocity());
        assert!(!Solver::wan_unipc(5.0).wants_float_velocity());
    }
}
