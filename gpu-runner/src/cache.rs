//! Which model is on the device. Dedicated: one model, loaded once and kept. Shared: one model
//! at a time; a switch drops every tensor and module of the old model, synchronizes, empties the
//! allocator cache and logs memory before it checks free memory and loads the new one.

use std::path::PathBuf;

use crate::accel::AccelError;
use crate::memory::{RunnerDevice, is_out_of_memory};
use crate::package::{Manifest, ModelPackage, PackageError};

/// Free memory a load needs beyond the declared weights: activations of the probe run and the
/// allocator's rounding.
pub const LOAD_HEADROOM: f64 = 1.10;

/// The lane's GenerationMode as the runner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneMode {
    Dedicated,
    Shared,
}

/// A model this runner may load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageRef {
    /// The VideoModel name.
    pub model: String,
    pub dir: PathBuf,
    /// The VideoModel's fixed steps; the package's manifest must agree.
    pub expected_steps: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("model {model:?} is not served by this runner (it serves {known:?})")]
    UnknownModel { model: String, known: Vec<String> },
    #[error("a Dedicated runner serves exactly one model, got {0}")]
    DedicatedNeedsOneModel(usize),
    #[error(
        "model {model:?} declares {needed} bytes of weights (+{}% headroom) but the device has \
         {free} bytes free after unloading; give the lane a larger GPU or move the model to \
         its own lane", ((LOAD_HEADROOM - 1.0) * 100.0).round()
    )]
    WontFit {
        model: String,
        needed: u64,
        free: u64,
    },
    #[error("loading model {model:?} ran the GPU out of memory: {source}")]
    LoadOutOfMemory { model: String, source: PackageError },
    #[error(transparent)]
    Package(#[from] PackageError),
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
    packages: Vec<PackageRef>,
    /// The loaded package, under the model name the lane knows it by (its VideoModel).
    loaded: Option<(String, ModelPackage)>,
    loads: u64,
}

impl ModelCache {
    pub fn new(
        mode: LaneMode,
        device: RunnerDevice,
        packages: Vec<PackageRef>,
    ) -> Result<ModelCache, CacheError> {
        if mode == LaneMode::Dedicated && packages.len() != 1 {
            return Err(CacheError::DedicatedNeedsOneModel(packages.len()));
        }
        Ok(ModelCache {
            mode,
            device,
            packages,
            loaded: None,
            loads: 0,
        })
    }

    pub fn mode(&self) -> LaneMode {
        self.mode
    }

    /// The model on the device, if any (a runner is ready once this is `Some`).
    pub fn loaded_model(&self) -> Option<&str> {
        self.loaded.as_ref().map(|(model, _)| model.as_str())
    }

    /// How many times a package was loaded.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// The package for `model`, loading it (and, in Shared mode, unloading the current one)
    /// when it is not on the device.
    pub fn get(&mut self, model: &str) -> Result<&ModelPackage, CacheError> {
        let pkg = self
            .packages
            .iter()
            .find(|p| p.model == model)
            .cloned()
            .ok_or_else(|| CacheError::UnknownModel {
                model: model.to_owned(),
                known: self.packages.iter().map(|p| p.model.clone()).collect(),
            })?;
        if self.loaded_model() != Some(model) {
            self.unload()?;
            self.load(&pkg)?;
        }
        Ok(&self.loaded.as_ref().expect("loaded above").1)
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

    fn load(&mut self, pkg: &PackageRef) -> Result<(), CacheError> {
        let manifest = Manifest::read(&pkg.dir, pkg.expected_steps)?;
        if let Some(free) = self.device.free_bytes()?
            && !fits(manifest.weight_bytes, free)
        {
            return Err(CacheError::WontFit {
                model: pkg.model.clone(),
                needed: manifest.weight_bytes,
                free,
            });
        }
        let loaded = match ModelPackage::load(&pkg.dir, self.device.device, pkg.expected_steps) {
            Ok(p) => p,
            Err(source) => {
                // Whatever the failed load allocated is garbage now.
                self.device.clean_up()?;
                let oom = matches!(&source,
                    PackageError::ModuleLoad { message, .. } | PackageError::ProbeFailed { message, .. }
                    if is_out_of_memory(message));
                return Err(if oom {
                    CacheError::LoadOutOfMemory {
                        model: pkg.model.clone(),
                        source,
                    }
                } else {
                    CacheError::Package(source)
                });
            }
        };
        let stats = self.device.stats()?;
        tracing::info!(
            model = pkg.model,
            device = %self.device.name(),
            declared_weight_bytes = manifest.weight_bytes,
            allocated_bytes = stats.allocated_current,
            reserved_bytes = stats.reserved_current,
            "model loaded"
        );
        self.loaded = Some((pkg.model.clone(), loaded));
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
