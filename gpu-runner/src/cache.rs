//! Which model is on the device. Dedicated: one model, loaded once and kept. Shared: one model
//! at a time; a switch drops every device tensor of the old model, synchronizes, empties the
//! allocator cache and logs memory before it checks free memory and brings the new one. When
//! every model's host copies fit the runner's host budget ([`ModelCache::with_host_budget`]),
//! the old model waits in host memory (pinned next to a GPU) and a switch back copies it to
//! the device without reading its files; otherwise it is dropped and loaded again.

use std::sync::{Mutex, MutexGuard};

use framelane_api::reasons::JobReason;

use crate::accel::AccelError;
use crate::memory::{RunnerDevice, is_out_of_memory};
use crate::placement;
use crate::profile::{self, ProfileError};
use crate::wan::pipeline::{MemoryPlan, Mode, ModelSpec, PipelineError, Precision, WanPipeline};

/// Free memory a load needs beyond the weights: the allocator's rounding and the first
/// activations.
pub const LOAD_HEADROOM: f64 = 1.10;

/// The lane's GenerationMode as the runner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneMode {
    Dedicated,
    Shared,
}

/// A model this runner may load.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelRef {
    /// The VideoModel name.
    pub model: String,
    pub spec: ModelSpec,
    /// The VideoModel's modes: what its weights must run.
    pub modes: Vec<Mode>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("model {model:?} is not served by this runner (it serves {known:?})")]
    UnknownModel { model: String, known: Vec<String> },
    #[error("a Dedicated runner serves exactly one model, got {0}")]
    DedicatedNeedsOneModel(usize),
    #[error(
        "model {model:?} has {needed} bytes of weights (+{}% headroom) but the device has \
         {free} bytes free after unloading; give the lane a larger GPU or move the model to \
         its own lane", ((LOAD_HEADROOM - 1.0) * 100.0).round()
    )]
    WontFit {
        model: String,
        needed: u64,
        free: u64,
    },
    #[error("loading model {model:?} ran the GPU out of memory: {source}")]
    LoadOutOfMemory {
        model: String,
        source: Box<PipelineError>,
    },
    #[error("model {model:?}: {source}")]
    Load {
        model: String,
        source: Box<PipelineError>,
    },
    #[error(
        "VideoModel {model:?} offers {offered:?} but its weights run {runs} only: set its \
         spec.modes to [{runs}]"
    )]
    Modes {
        model: String,
        offered: Vec<&'static str>,
        runs: &'static str,
    },
    #[error(
        "model {model:?} keeps {needed} bytes of weights in host memory in memory mode {mode}, \
         more than the runner's host budget of {budget} bytes (--host-memory-bytes; by default \
         80 % of the container's memory limit): raise the ModelLane's \
         spec.runner.resources.limits.memory, or give the lane GPUs that hold more of the model \
         (spec.runner.memory.mode)"
    )]
    HostMemory {
        model: String,
        mode: &'static str,
        needed: u64,
        budget: u64,
    },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error("reading the models' shapes to resolve memory mode auto: {0}")]
    Profile(#[from] Box<ProfileError>),
}

impl CacheError {
    /// A job's `status.reason` when its model could not be loaded this way: the GPU ran out
    /// of memory; the model cannot fit the memory left (refused before loading); or the
    /// generation failed.
    pub fn reason(&self) -> JobReason {
        match self {
            CacheError::LoadOutOfMemory { .. } => JobReason::GpuOutOfMemory,
            CacheError::WontFit { .. } => JobReason::DoesNotFit,
            _ => JobReason::GenerationFailed,
        }
    }
}

/// Whether `declared` weight bytes may be loaded into `free` bytes.
pub fn fits(declared: u64, free: u64) -> bool {
    (declared as f64) * LOAD_HEADROOM <= free as f64
}

pub struct ModelCache {
    mode: LaneMode,
    device: RunnerDevice,
    precision: Precision,
    plan: MemoryPlan,
    models: Vec<ModelRef>,
    /// The loaded model, under the name the lane knows it by (its VideoModel).
    loaded: Option<(String, WanPipeline)>,
    /// Shared, within the host budget: the models off the device, waiting in host memory.
    parked: Vec<(String, WanPipeline)>,
    /// Whether models are loaded with host copies of every part and parked between switches.
    keep_in_host: bool,
    loads: u64,
    /// Seconds the last [`ModelCache::get`] spent unloading and loading (0 when warm).
    last_load_seconds: f64,
    /// Where the last load came from.
    last_load_from: LoadedFrom,
}

/// Where a model came to the device from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoadedFrom {
    /// Its weight files (a cold load).
    Files,
    /// Its host copies: a Shared lane's switch back to a parked model.
    Host,
}

impl LoadedFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadedFrom::Files => "files",
            LoadedFrom::Host => "host",
        }
    }
}

impl ModelCache {
    /// A cache of `models` on `device`; `auto` in `plan` is resolved here for all of them, as
    /// a runner resolves it at start ([`profile::resolve_auto`]).
    pub fn new(
        mode: LaneMode,
        device: RunnerDevice,
        precision: Precision,
        plan: MemoryPlan,
        models: Vec<ModelRef>,
    ) -> Result<ModelCache, CacheError> {
        if mode == LaneMode::Dedicated && models.len() != 1 {
            return Err(CacheError::DedicatedNeedsOneModel(models.len()));
        }
        let files = models.iter().map(|m| &m.spec.files);
        let plan = MemoryPlan {
            mode: profile::resolve_auto(plan.mode, files, precision, device.device)
                .map_err(Box::new)?,
            ..plan
        };
        Ok(ModelCache {
            mode,
            device,
            precision,
            plan,
            models,
            loaded: None,
            parked: Vec::new(),
            keep_in_host: false,
            loads: 0,
            last_load_seconds: 0.0,
            last_load_from: LoadedFrom::Files,
        })
    }

    /// Host memory the runner may fill with weights. Refused when a model's offloaded parts
    /// alone (under expert-swap or model-offload) take more: its load would be killed for
    /// memory. A Shared cache of several models keeps them all in host memory between
    /// switches when their weights (every part, in the cache's precision, from the file
    /// headers) fit; otherwise, and in Dedicated mode, a switch reads the files again.
    pub fn with_host_budget(mut self, budget: u64) -> Result<ModelCache, CacheError> {
        let mut needed = 0;
        for m in &self.models {
            let bytes = WanPipeline::part_bytes(&m.spec, self.precision)
                .map_err(|source| self.load_error(&m.model, source))?;
            let placement = placement::place(self.plan.mode, &bytes);
            if bytes.host(placement) > budget {
                return Err(CacheError::HostMemory {
                    model: m.model.clone(),
                    mode: placement.as_str(),
                    needed: bytes.host(placement),
                    budget,
                });
            }
            needed += bytes.all();
        }
        if self.mode != LaneMode::Shared || self.models.len() < 2 {
            return Ok(self);
        }
        self.keep_in_host = needed <= budget;
        tracing::info!(
            host_budget_bytes = budget,
            host_bytes = needed,
            keep_in_host = self.keep_in_host,
            "Shared lane: models between switches"
        );
        Ok(self)
    }

    /// Locks a runner's cache. A generation that panicked while it held the lock (a bug, which
    /// failed that job) left it poisoned, and whatever model it was loading or running in an
    /// unknown state: that model is dropped and the device's memory returned, so the next job
    /// loads its model afresh rather than every later job failing on the poisoned lock.
    pub fn lock(cache: &Mutex<ModelCache>) -> Result<MutexGuard<'_, ModelCache>, CacheError> {
        let poisoned = match cache.lock() {
            Ok(guard) => return Ok(guard),
            Err(poisoned) => poisoned,
        };
        cache.clear_poison();
        let mut guard = poisoned.into_inner();
        let model = guard.loaded.take().map(|(model, _)| model);
        let after = guard.device.clean_up()?;
        tracing::error!(
            model,
            allocated_bytes = after.allocated_current,
            "a generation panicked holding the model cache; its model was dropped"
        );
        Ok(guard)
    }

    /// Whether models wait in host memory between switches.
    pub fn keeps_in_host(&self) -> bool {
        self.keep_in_host
    }

    /// Bytes of weights held in host memory: offloaded parts and parked models.
    pub fn host_bytes(&self) -> u64 {
        self.loaded
            .iter()
            .chain(&self.parked)
            .map(|(_, p)| p.host_bytes())
            .sum()
    }

    pub fn mode(&self) -> LaneMode {
        self.mode
    }

    /// The model on the device, if any (a runner is ready once this is `Some`).
    pub fn loaded_model(&self) -> Option<&str> {
        self.loaded.as_ref().map(|(model, _)| model.as_str())
    }

    /// How many times a model was loaded.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Seconds the last [`ModelCache::get`] spent unloading the old model and loading the
    /// new one: a Shared lane's switch time (0 when the model was loaded already).
    pub fn last_load_seconds(&self) -> f64 {
        self.last_load_seconds
    }

    /// Where the last load came from: the files, or host memory.
    pub fn last_load_from(&self) -> LoadedFrom {
        self.last_load_from
    }

    /// The pipeline of `model`, loading it (and, in Shared mode, unloading the current one)
    /// when it is not on the device.
    pub fn get(&mut self, model: &str) -> Result<&mut WanPipeline, CacheError> {
        let wanted = self
            .models
            .iter()
            .find(|m| m.model == model)
            .cloned()
            .ok_or_else(|| CacheError::UnknownModel {
                model: model.to_owned(),
                known: self.models.iter().map(|m| m.model.clone()).collect(),
            })?;
        self.last_load_seconds = 0.0;
        if self.loaded_model() != Some(model) {
            let started = std::time::Instant::now();
            // A model whose weights run another mode than it offers is refused before the
            // loaded one leaves the device (a parked model was checked when it was loaded).
            let parked = self.parked.iter().position(|(m, _)| m == model);
            if parked.is_none() {
                let runs = WanPipeline::mode_of(&wanted.spec)
                    .map_err(|source| self.load_error(model, source))?;
                if wanted.modes != [runs] {
                    return Err(CacheError::Modes {
                        model: model.to_owned(),
                        offered: wanted.modes.iter().map(|m| m.as_str()).collect(),
                        runs: runs.as_str(),
                    });
                }
            }
            // Unloading appends to `parked`: the position found above still holds.
            self.unload()?;
            match parked {
                Some(i) => self.restore(i)?,
                None => self.load(&wanted)?,
            }
            self.last_load_seconds = started.elapsed().as_secs_f64();
        }
        Ok(&mut self.loaded.as_mut().expect("loaded above").1)
    }

    /// Takes the loaded model, if any, off the device (to host memory when models are kept
    /// there, else dropped) and returns the device's memory to the driver.
    pub fn unload(&mut self) -> Result<(), CacheError> {
        let Some((model, mut old)) = self.loaded.take() else {
            return Ok(());
        };
        // Kept in host memory, a model was loaded with a host copy of every part.
        let kept = self.keep_in_host;
        if kept {
            old.park();
            self.parked.push((model.clone(), old));
        } else {
            drop(old);
        }
        let after = self.device.clean_up()?;
        tracing::info!(
            model,
            device = %self.device.name(),
            kept_in_host = kept,
            allocated_bytes = after.allocated_current,
            reserved_bytes = after.reserved_current,
            "model unloaded"
        );
        Ok(())
    }

    /// Device bytes the model's placement keeps on the device between jobs: what does not
    /// wait in host memory.
    fn on_device_bytes(&self, bytes: &placement::PartBytes) -> u64 {
        bytes.all() - bytes.host(placement::place(self.plan.mode, bytes))
    }

    /// Errs when `needed` bytes do not fit the device's free memory (with headroom).
    fn check_free(&self, model: &str, needed: u64) -> Result<(), CacheError> {
        match self.device.free_bytes()? {
            Some(free) if !fits(needed, free) => Err(CacheError::WontFit {
                model: model.to_owned(),
                needed,
                free,
            }),
            _ => Ok(()),
        }
    }

    /// Brings the parked model `i` back to the device from host memory.
    fn restore(&mut self, i: usize) -> Result<(), CacheError> {
        let (model, mut pipeline) = self.parked.remove(i);
        let needed = self.on_device_bytes(&pipeline.bytes());
        let restored = self.check_free(&model, needed).and_then(|()| {
            pipeline
                .unpark()
                .map_err(|source| self.load_error(&model, source))
        });
        if let Err(e) = restored {
            // Whatever came to the device goes back: the model waits in host memory again.
            pipeline.park();
            self.device.clean_up()?;
            self.parked.push((model, pipeline));
            return Err(e);
        }
        self.loaded(model, pipeline, needed, LoadedFrom::Host)
    }

    /// A load's error: out of memory, or any other.
    fn load_error(&self, model: &str, source: PipelineError) -> CacheError {
        if is_out_of_memory(&source.to_string()) {
            CacheError::LoadOutOfMemory {
                model: model.to_owned(),
                source: Box::new(source),
            }
        } else {
            CacheError::Load {
                model: model.to_owned(),
                source: Box::new(source),
            }
        }
    }

    /// Records `pipeline` as the model on the device.
    fn loaded(
        &mut self,
        model: String,
        pipeline: WanPipeline,
        on_device: u64,
        from: LoadedFrom,
    ) -> Result<(), CacheError> {
        let stats = self.device.stats()?;
        tracing::info!(
            model,
            device = %self.device.name(),
            from = from.as_str(),
            weight_bytes = pipeline.bytes().all(),
            on_device_bytes = on_device,
            host_bytes = pipeline.host_bytes(),
            memory_mode = pipeline.placement().as_str(),
            allocated_bytes = stats.allocated_current,
            reserved_bytes = stats.reserved_current,
            "model loaded"
        );
        self.loaded = Some((model, pipeline));
        self.loads += 1;
        self.last_load_from = from;
        Ok(())
    }

    fn load(&mut self, wanted: &ModelRef) -> Result<(), CacheError> {
        let model = wanted.model.clone();
        let bytes = WanPipeline::part_bytes(&wanted.spec, self.precision)
            .map_err(|source| self.load_error(&model, source))?;
        let needed = self.on_device_bytes(&bytes);
        self.check_free(&model, needed)?;
        let plan = MemoryPlan {
            host_copies: self.keep_in_host,
            ..self.plan
        };
        let loaded =
            match WanPipeline::load_with(&wanted.spec, self.precision, self.device.device, plan) {
                Ok(pipeline) => pipeline,
                Err(source) => {
                    // Whatever the failed load allocated is garbage now.
                    self.device.clean_up()?;
                    return Err(self.load_error(&model, source));
                }
            };
        self.loaded(model, loaded, needed, LoadedFrom::Files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_check_needs_headroom() {
        assert!(fits(1000, 1100));
        assert!(!fits(1000, 1099));
        assert!(fits(0, 0));
    }

    #[test]
    fn a_failed_load_fails_the_job_for_what_went_wrong() {
        let model = || "anisora".to_owned();
        let oom = CacheError::LoadOutOfMemory {
            model: model(),
            source: Box::new(PipelineError::Sampling("CUDA out of memory".into())),
        };
        assert_eq!(oom.reason(), JobReason::GpuOutOfMemory);
        let too_big = CacheError::WontFit {
            model: model(),
            needed: 2,
            free: 1,
        };
        assert_eq!(too_big.reason(), JobReason::DoesNotFit);
        let unknown = CacheError::UnknownModel {
            model: model(),
            known: vec![],
        };
        assert_eq!(unknown.reason(), JobReason::GenerationFailed);
    }
}
