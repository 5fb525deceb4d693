//! Which model is on the device. Dedicated: one model, loaded once and kept. Shared: one model
//! at a time; a switch drops every tensor and module of the old model, synchronizes, empties the
//! allocator cache and logs memory before it checks free memory and loads the new one.

use crate::accel::AccelError;
use crate::memory::{RunnerDevice, is_out_of_memory};
use crate::placement::{self, Placement};
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
    #[error(transparent)]
    Accel(#[from] AccelError),
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
    loads: u64,
    /// Seconds the last [`ModelCache::get`] spent unloading and loading (0 when warm).
    last_load_seconds: f64,
}

impl ModelCache {
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
        Ok(ModelCache {
            mode,
            device,
            precision,
            plan,
            models,
            loaded: None,
            loads: 0,
            last_load_seconds: 0.0,
        })
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
            self.unload()?;
            self.load(&wanted)?;
            self.last_load_seconds = started.elapsed().as_secs_f64();
        }
        Ok(&mut self.loaded.as_mut().expect("loaded above").1)
    }

    /// Drops the loaded model, if any, and returns the device's memory to the driver.
    pub fn unload(&mut self) -> Result<(), CacheError> {
        let Some((model, old)) = self.loaded.take() else {
            return Ok(());
        };
        drop(old);
        let after = self.device.clean_up()?;
        tracing::info!(
            model,
            device = %self.device.name(),
            allocated_bytes = after.allocated_current,
            reserved_bytes = after.reserved_current,
            "model unloaded"
        );
        Ok(())
    }

    fn load(&mut self, wanted: &ModelRef) -> Result<(), CacheError> {
        let model = wanted.model.clone();
        let failed = |source: PipelineError| CacheError::Load {
            model: model.clone(),
            source: Box::new(source),
        };
        let bytes = WanPipeline::part_bytes(&wanted.spec, self.precision).map_err(failed)?;
        // What the placement puts on the device at load: every weight when resident, the
        // text encoder and the VAE under expert-swap, nothing under model-offload.
        let total = self.device.total_bytes()?;
        let needed = match placement::place(self.plan.mode, &bytes, total) {
            Placement::Resident => bytes.all(),
            Placement::ExpertSwap => bytes.text_encoder + bytes.vae,
            Placement::ModelOffload => 0,
        };
        if let Some(free) = self.device.free_bytes()?
            && !fits(needed, free)
        {
            return Err(CacheError::WontFit {
                model,
                needed,
                free,
            });
        }
        let loaded = match WanPipeline::load_with(
            &wanted.spec,
            self.precision,
            self.device.device,
            self.plan,
        ) {
            Ok(pipeline) => pipeline,
            Err(source) => {
                // Whatever the failed load allocated is garbage now.
                self.device.clean_up()?;
                return Err(if is_out_of_memory(&source.to_string()) {
                    CacheError::LoadOutOfMemory {
                        model,
                        source: Box::new(source),
                    }
                } else {
                    failed(source)
                });
            }
        };
        if wanted.modes != [loaded.mode()] {
            let runs = loaded.mode().as_str();
            drop(loaded);
            self.device.clean_up()?;
            return Err(CacheError::Modes {
                model,
                offered: wanted.modes.iter().map(|m| m.as_str()).collect(),
                runs,
            });
        }
        let stats = self.device.stats()?;
        tracing::info!(
            model,
            device = %self.device.name(),
            weight_bytes = bytes.all(),
            on_device_bytes = needed,
            memory_mode = loaded.placement().as_str(),
            allocated_bytes = stats.allocated_current,
            reserved_bytes = stats.reserved_current,
            "model loaded"
        );
        self.loaded = Some((model, loaded));
        self.loads += 1;
        Ok(())
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
}
