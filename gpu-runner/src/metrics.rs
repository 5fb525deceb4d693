//! The runner's metrics (prefix `framelane_runner_`), served on `/metrics`. The names are
//! defined here and nowhere else.

use crate::cache::ModelCache;
use crate::memory::JobMemory;
use framelane_contract::readable::WatchErrorLabels;
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

/// Where a model came to the device from: `files` (a cold load) or `host` (a Shared lane's
/// switch back to a model waiting in host memory).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub from: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageMemoryLabels {
    pub stage: String,
    pub kind: String,
}

/// Buckets of the stage and model-load histograms, in seconds.
const SECONDS_BUCKETS: [f64; 10] = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// The runner's metrics (prefix `framelane_runner_`).
pub struct Metrics {
    pub registry: Registry,
    pub jobs: Family<ResultLabels, Counter>,
    pub generation_seconds: Histogram,
    pub model_loads: Family<LoadLabels, Counter>,
    pub warm_hits: Counter,
    pub host_weight_bytes: Gauge,
    pub memory_after_cleanup: Family<MemoryLabels, Gauge>,
    pub ooms: Counter,
    pub stage_peak: Family<StageMemoryLabels, Gauge>,
    pub stage_seconds: Family<StageLabels, Histogram, fn() -> Histogram>,
    pub part_load_seconds: Family<StageLabels, Counter<f64>>,
    pub model_load_seconds: Histogram,
    pub alloc_retries: Counter,
}

impl Metrics {
    /// The runner's metrics, with the contract's count of its job watch's errors
    /// (`Runner::watch_errors`).
    pub fn new(watch_errors: Family<WatchErrorLabels, Counter>) -> Metrics {
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
        let model_loads = Family::default();
        registry.register(
            "model_loads",
            "Models brought onto the device, from their files (cold loads) or from host memory (a Shared lane's switch)",
            model_loads.clone(),
        );
        let warm_hits = Counter::default();
        registry.register(
            "warm_hits",
            "Jobs that found their model already loaded",
            warm_hits.clone(),
        );
        let host_weight_bytes = Gauge::default();
        registry.register(
            "host_weight_bytes",
            "Weights held in host memory (pinned next to a GPU): offloaded parts, and a Shared lane's models between switches",
            host_weight_bytes.clone(),
        );
        let memory_after_cleanup = Family::default();
        registry.register(
            "gpu_memory_after_cleanup_bytes",
            "Device memory still allocated or reserved after the last job's cleanup",
            memory_after_cleanup.clone(),
        );
        let ooms = Counter::default();
        registry.register("gpu_oom", "Jobs that ran out of GPU memory", ooms.clone());
        let stage_peak = Family::default();
        registry.register(
            "stage_peak_bytes",
            "Peak device memory allocated or reserved during the last job's stage",
            stage_peak.clone(),
        );
        let stage_seconds =
            Family::<StageLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                seconds_histogram,
            );
        registry.register(
            "stage_seconds",
            "Time of each job stage, bringing offloaded parts to the device included",
            stage_seconds.clone(),
        );
        let part_load_seconds = Family::default();
        registry.register(
            "part_load_seconds",
            "Time spent copying offloaded parts (or a swapped expert) to the device, by stage",
            part_load_seconds.clone(),
        );
        let model_load_seconds = seconds_histogram();
        registry.register(
            "model_load_seconds",
            "Time a job waited for its model to load (a cold load or a Shared lane's switch)",
            model_load_seconds.clone(),
        );
        let alloc_retries = Counter::default();
        registry.register(
            "gpu_alloc_retries",
            "Allocator retries (cache flushes to satisfy an allocation) during jobs",
            alloc_retries.clone(),
        );
        registry.register(
            "watch_errors",
            "Errors of the runner's watch of VideoJobs, by cause (expired: 410 Gone, listed again whole; failed: retried)",
            watch_errors,
        );
        Metrics {
            registry,
            jobs,
            generation_seconds,
            model_loads,
            warm_hits,
            host_weight_bytes,
            memory_after_cleanup,
            ooms,
            stage_peak,
            stage_seconds,
            part_load_seconds,
            model_load_seconds,
            alloc_retries,
        }
    }
}

impl Metrics {
    /// Records that `cache` just brought a model to the device.
    pub fn record_load(&self, cache: &ModelCache) {
        let from = cache.last_load_from().as_str().to_owned();
        self.model_loads.get_or_create(&LoadLabels { from }).inc();
        self.host_weight_bytes.set(cache.host_bytes() as i64);
    }

    /// Records a finished job's memory: per stage, the allocator retries, and the model load
    /// it waited for.
    pub fn observe_job(&self, memory: &JobMemory) {
        for stage in &memory.status.stages {
            for (kind, bytes) in [
                ("allocated", stage.peak_allocated_bytes),
                ("reserved", stage.peak_reserved_bytes),
            ] {
                self.stage_peak
                    .get_or_create(&StageMemoryLabels {
                        stage: stage.stage.clone(),
                        kind: kind.to_owned(),
                    })
                    .set(bytes);
            }
            let labels = StageLabels {
                stage: stage.stage.clone(),
            };
            self.stage_seconds
                .get_or_create(&labels)
                .observe(stage.seconds);
            self.part_load_seconds
                .get_or_create(&labels)
                .inc_by(stage.load_seconds);
        }
        self.alloc_retries
            .inc_by(memory.alloc_retries.max(0) as u64);
        if let Some(seconds) = memory.status.model_load_seconds.filter(|s| *s > 0.0) {
            self.model_load_seconds.observe(seconds);
        }
    }
}

impl framelane_contract::serve::Metrics for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use framelane_api::videojob::{MemoryReport, StageMemoryReport};

    use super::*;

    #[test]
    fn a_jobs_stages_become_the_stage_metrics() {
        let metrics = Metrics::new(Family::default());
        let stage = |stage: &str, peak: i64, seconds: f64, load_seconds: f64| StageMemoryReport {
            stage: stage.to_owned(),
            peak_allocated_bytes: peak,
            peak_reserved_bytes: peak + 100,
            seconds,
            load_seconds,
            alloc_retries: 0,
        };
        metrics.observe_job(&JobMemory {
            status: MemoryReport {
                model_load_seconds: Some(12.5),
                stages: vec![
                    stage("EncodingPrompt", 1000, 0.7, 0.2),
                    stage("Denoising", 5000, 40.0, 3.0),
                ],
                ..Default::default()
            },
            alloc_retries: 2,
            ooms: 0,
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        for line in [
            r#"framelane_runner_stage_peak_bytes{stage="Denoising",kind="allocated"} 5000"#,
            r#"framelane_runner_stage_peak_bytes{stage="EncodingPrompt",kind="reserved"} 1100"#,
            r#"framelane_runner_stage_seconds_sum{stage="Denoising"} 40.0"#,
            r#"framelane_runner_part_load_seconds_total{stage="Denoising"} 3.0"#,
            "framelane_runner_model_load_seconds_sum 12.5",
            "framelane_runner_gpu_alloc_retries_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
