//! The runner's metrics (prefix `framelane_runner_`), served on `/metrics`. The names are
//! defined here and nowhere else.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemoryLabels {
    pub kind: String,
}

/// The runner's metrics (prefix `framelane_runner_`).
pub struct Metrics {
    pub registry: Registry,
    pub jobs: Family<ResultLabels, Counter>,
    pub generation_seconds: Histogram,
    pub model_loads: Counter,
    pub warm_hits: Counter,
    pub memory_after_cleanup: Family<MemoryLabels, Gauge>,
    pub ooms: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("framelane_runner");
        let jobs = Family::default();
        registry.register(
            "jobs",
            "Jobs this runner finished, by result (Succeeded or a failure reason)",
            jobs.clone(),
        );
        let generation_seconds =
            Histogram::new([1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0]);
        registry.register(
            "generation_seconds",
            "Time from claim to the final status of a job",
            generation_seconds.clone(),
        );
        let model_loads = Counter::default();
        registry.register(
            "model_loads",
            "Models loaded onto the device (cold loads)",
            model_loads.clone(),
        );
        let warm_hits = Counter::default();
        registry.register(
            "warm_hits",
            "Jobs that found their model already loaded",
            warm_hits.clone(),
        );
        let memory_after_cleanup = Family::default();
        registry.register(
            "gpu_memory_after_cleanup_bytes",
            "Device memory still allocated or reserved after the last job's cleanup",
            memory_after_cleanup.clone(),
        );
        let ooms = Counter::default();
        registry.register("gpu_oom", "Jobs that ran out of GPU memory", ooms.clone());
        Metrics {
            registry,
            jobs,
            generation_seconds,
            model_loads,
            warm_hits,
            memory_after_cleanup,
            ooms,
        }
    }
}

impl framelane_contract::serve::Metrics for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}
