//! Device selection and memory hygiene: what runs after every job and every model switch.

use std::time::Instant;

use framelane_api::videojob::{MemoryReport, StageMemoryReport};
use serde::Serialize;
use tch::Device;

use crate::accel::{self, AccelError, MemoryStats};

/// The device the runner computes on, chosen once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunnerDevice {
    pub device: Device,
}

impl RunnerDevice {
    /// `cuda:0` when libtorch_cuda loads and sees a GPU, else the CPU (where the counting
    /// allocator is installed so memory reports still mean something).
    pub fn detect() -> Result<RunnerDevice, AccelError> {
        if let Err(why) = accel::load_cuda() {
            tracing::info!(%why, "libtorch_cuda not loaded");
        }
        let device = if tch::Cuda::is_available() {
            RunnerDevice {
                device: Device::Cuda(0),
            }
        } else {
            RunnerDevice::cpu()?
        };
        tracing::info!(device = %device.name(), accelerator = %accel::accelerator()?, "runner device");
        Ok(device)
    }

    pub fn cpu() -> Result<RunnerDevice, AccelError> {
        accel::track_cpu_allocations()?;
        Ok(RunnerDevice {
            device: Device::Cpu,
        })
    }

    /// `cuda:0` or `cpu`, as `status.memory.device` shows it.
    pub fn name(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            Device::Mps => "mps".to_owned(),
            Device::Vulkan => "vulkan".to_owned(),
            Device::Cpu => "cpu".to_owned(),
        }
    }

    fn index(&self) -> usize {
        index(self.device)
    }

    pub fn stats(&self) -> Result<MemoryStats, AccelError> {
        accel::memory_stats(self.index())
    }

    /// Free device bytes, or `None` where the driver has no such number (CPU).
    pub fn free_bytes(&self) -> Result<Option<u64>, AccelError> {
        let (free, total) = accel::memory_info(self.index())?;
        Ok((total > 0).then_some(free))
    }

    /// Total device bytes, or `None` where the driver has no such number (CPU).
    pub fn total_bytes(&self) -> Result<Option<u64>, AccelError> {
        let (_, total) = accel::memory_info(self.index())?;
        Ok((total > 0).then_some(total))
    }

    /// Starts a job's peak window.
    pub fn begin_job(&self) -> Result<MemoryStats, AccelError> {
        accel::reset_peak_stats(self.index())?;
        self.stats()
    }

    /// Synchronizes and empties the allocator cache. Call it after the job's tensors are
    /// dropped; it returns the statistics after cleanup (peaks still cover the job).
    pub fn clean_up(&self) -> Result<MemoryStats, AccelError> {
        accel::synchronize(self.index())?;
        accel::empty_cache()?;
        self.stats()
    }
}

/// The allocator's index of `device` (0 for the CPU).
fn index(device: Device) -> usize {
    match device {
        Device::Cuda(i) => i,
        _ => 0,
    }
}

/// A stage of a job measured on its own; the names are `status.progress.stage` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasuredStage {
    EncodingPrompt,
    EncodingImage,
    Denoising,
    Decoding,
}

impl MeasuredStage {
    pub fn as_str(self) -> &'static str {
        match self {
            MeasuredStage::EncodingPrompt => "EncodingPrompt",
            MeasuredStage::EncodingImage => "EncodingImage",
            MeasuredStage::Denoising => "Denoising",
            MeasuredStage::Decoding => "Decoding",
        }
    }
}

/// Measures one stage: its peak window starts at [`StageMeter::start`]; [`StageMeter::finish`]
/// frees what the stage left in the allocator's cache and reports the stage.
pub struct StageMeter {
    device: Device,
    stage: MeasuredStage,
    started: Instant,
    before: MemoryStats,
    /// Seconds spent bringing offloaded parts to the device; the stage adds to it.
    pub load_seconds: f64,
}

impl StageMeter {
    pub fn start(device: Device, stage: MeasuredStage) -> Result<StageMeter, AccelError> {
        accel::reset_peak_stats(index(device))?;
        Ok(StageMeter {
            device,
            stage,
            started: Instant::now(),
            before: accel::memory_stats(index(device))?,
            load_seconds: 0.0,
        })
    }

    /// Synchronizes, empties the allocator's cache and reports the stage. Call it after the
    /// stage's tensors and offloaded parts are dropped.
    pub fn finish(self) -> Result<StageMemoryReport, AccelError> {
        let i = index(self.device);
        accel::synchronize(i)?;
        let seconds = self.started.elapsed().as_secs_f64();
        accel::empty_cache()?;
        let after = accel::memory_stats(i)?;
        Ok(StageMemoryReport {
            stage: self.stage.as_str().to_owned(),
            peak_allocated_bytes: after.allocated_peak,
            peak_reserved_bytes: after.reserved_peak,
            seconds,
            load_seconds: self.load_seconds,
            alloc_retries: after.num_alloc_retries - self.before.num_alloc_retries,
        })
    }
}

/// One job's memory: what `status.memory` shows (the API's own `MemoryReport`), plus the
/// allocator counters that go to runner metrics and the structured log line.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobMemory {
    /// Exactly `status.memory`.
    #[serde(flatten)]
    pub status: MemoryReport,
    /// Allocator retries (cache flushes to satisfy an allocation) during the job.
    pub alloc_retries: i64,
    /// Out-of-memory errors the allocator raised during the job.
    pub ooms: i64,
}

impl JobMemory {
    /// `before` is taken at [`RunnerDevice::begin_job`], `after` at [`RunnerDevice::clean_up`];
    /// `stages` are the job's measured stages (each restarted the peak window, so the job's
    /// peak is the largest of theirs and `after`'s).
    pub fn new(
        device: &RunnerDevice,
        before: &MemoryStats,
        after: &MemoryStats,
        stages: Vec<StageMemoryReport>,
    ) -> Self {
        let peak = |own: i64, stage: fn(&StageMemoryReport) -> i64| {
            stages.iter().map(stage).fold(own, i64::max)
        };
        JobMemory {
            status: MemoryReport {
                device: device.name(),
                peak_allocated_bytes: peak(after.allocated_peak, |s| s.peak_allocated_bytes),
                peak_reserved_bytes: peak(after.reserved_peak, |s| s.peak_reserved_bytes),
                after_cleanup_allocated_bytes: after.allocated_current,
                after_cleanup_reserved_bytes: after.reserved_current,
                stages,
                ..MemoryReport::default()
            },
            alloc_retries: after.num_alloc_retries - before.num_alloc_retries,
            ooms: after.num_ooms - before.num_ooms,
        }
    }

    /// The one structured line per job.
    pub fn log(&self, job: &str) {
        tracing::info!(
            job,
            device = %self.status.device,
            peak_allocated_bytes = self.status.peak_allocated_bytes,
            peak_reserved_bytes = self.status.peak_reserved_bytes,
            after_cleanup_allocated_bytes = self.status.after_cleanup_allocated_bytes,
            after_cleanup_reserved_bytes = self.status.after_cleanup_reserved_bytes,
            alloc_retries = self.alloc_retries,
            ooms = self.ooms,
            memory_mode = self.status.memory_mode.as_deref().unwrap_or(""),
            vae_tiled = self.status.vae_tiled.unwrap_or(false),
            model_load_seconds = self.status.model_load_seconds.unwrap_or(0.0),
            stages = %serde_json::to_string(&self.status.stages).unwrap_or_default(),
            "job memory"
        );
    }
}

/// The share of the host's memory a Shared runner fills with its models by default.
pub const HOST_BUDGET_SHARE: f64 = 0.8;

/// The default host budget: [`HOST_BUDGET_SHARE`] of the container's memory limit (cgroup v2
/// `memory.max`, or v1 `memory.limit_in_bytes`), or of the machine's memory without one.
pub fn default_host_budget() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let limit = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|text| cgroup_limit(&text));
    let total = read("/proc/meminfo").and_then(|text| mem_total(&text));
    let memory = match (limit, total) {
        (Some(limit), Some(total)) => limit.min(total),
        (limit, total) => limit.or(total)?,
    };
    Some((memory as f64 * HOST_BUDGET_SHARE) as u64)
}

/// A cgroup memory limit file's bytes; `None` for no limit (`max`, or v1's huge number).
fn cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&bytes| bytes < 1 << 62)
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A libtorch error that is the device running out of memory.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("outofmemoryerror")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_containers_memory_limit_and_the_machines_memory() {
        assert_eq!(cgroup_limit("17179869184\n"), Some(16 << 30));
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(
            cgroup_limit("9223372036854771712\n"),
            None,
            "cgroup v1's no limit"
        );
        let meminfo = "MemTotal:       24590000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_590_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        let budget = default_host_budget().expect("this machine has /proc/meminfo");
        let total = mem_total(&std::fs::read_to_string("/proc/meminfo").unwrap()).unwrap();
        assert!(budget > 0 && budget <= (total as f64 * HOST_BUDGET_SHARE) as u64);
    }

    #[test]
    fn recognises_cuda_oom_messages() {
        assert!(is_out_of_memory(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)"
        ));
        assert!(is_out_of_memory("torch.OutOfMemoryError: ..."));
        assert!(!is_out_of_memory("shape mismatch"));
    }

    #[test]
    fn report_counts_only_this_jobs_retries_and_ooms() {
        let before = MemoryStats {
            num_alloc_retries: 3,
            num_ooms: 1,
            ..Default::default()
        };
        let after = MemoryStats {
            allocated_current: 10,
            allocated_peak: 100,
            reserved_current: 20,
            reserved_peak: 200,
            num_alloc_retries: 5,
            num_ooms: 2,
        };
        let device = RunnerDevice {
            device: Device::Cuda(0),
        };
        let stage = |stage: &str, peak_allocated_bytes| StageMemoryReport {
            stage: stage.to_owned(),
            peak_allocated_bytes,
            peak_reserved_bytes: 150,
            ..Default::default()
        };
        let r = JobMemory::new(
            &device,
            &before,
            &after,
            vec![stage("EncodingPrompt", 40), stage("Denoising", 120)],
        );
        assert_eq!(
            (r.status.peak_allocated_bytes, r.status.peak_reserved_bytes),
            (120, 200),
            "the job's peak is the largest of its stages' and the end's"
        );
        assert_eq!(r.status.device, "cuda:0");
        assert_eq!((r.alloc_retries, r.ooms), (2, 1));
        assert_eq!(
            (
                r.status.peak_allocated_bytes,
                r.status.after_cleanup_reserved_bytes
            ),
            (120, 20)
        );
    }
}
