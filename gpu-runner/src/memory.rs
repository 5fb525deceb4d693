//! Device selection and memory hygiene: what runs after every job and every model switch.

use framelane_api::videojob::MemoryReport;
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
        match self.device {
            Device::Cuda(i) => i,
            _ => 0,
        }
    }

    pub fn stats(&self) -> Result<MemoryStats, AccelError> {
        accel::memory_stats(self.index())
    }

    /// Free device bytes, or `None` where the driver has no such number (CPU).
    pub fn free_bytes(&self) -> Result<Option<u64>, AccelError> {
        let (free, total) = accel::memory_info(self.index())?;
        Ok((total > 0).then_some(free))
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
    /// `before` is taken at [`RunnerDevice::begin_job`], `after` at [`RunnerDevice::clean_up`].
    pub fn new(device: &RunnerDevice, before: &MemoryStats, after: &MemoryStats) -> Self {
        JobMemory {
            status: MemoryReport {
                device: device.name(),
                peak_allocated_bytes: after.allocated_peak,
                peak_reserved_bytes: after.reserved_peak,
                after_cleanup_allocated_bytes: after.allocated_current,
                after_cleanup_reserved_bytes: after.reserved_current,
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
            "job memory"
        );
    }
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
        let r = JobMemory::new(&device, &before, &after);
        assert_eq!(r.status.device, "cuda:0");
        assert_eq!((r.alloc_retries, r.ooms), (2, 1));
        assert_eq!(
            (
                r.status.peak_allocated_bytes,
                r.status.after_cleanup_reserved_bytes
            ),
            (100, 20)
        );
    }
}
