//! The C++ shim on a machine without a GPU: CPU fallbacks and the counting allocator.

use framelane_runner::accel;
use tch::{Device, Kind, Tensor};

#[test]
fn shim_reports_the_cpu_sensibly() {
    let libtorch_cuda = std::path::Path::new(&std::env::var("LIBTORCH").expect("LIBTORCH"))
        .join("lib/libtorch_cuda.so");
    if libtorch_cuda.exists() {
        // The CUDA build of libtorch must load even without a GPU, or a GPU node would
        // silently run on its CPU.
        accel::load_cuda().expect("libtorch_cuda.so is there but does not load");
    }
    if tch::Cuda::is_available() {
        return; // the rest is about the CPU fallbacks
    }
    assert_eq!(accel::accelerator().unwrap(), "cpu");
    assert_eq!(accel::memory_info(0).unwrap(), (0, 0));
    accel::synchronize(0).unwrap();
    accel::empty_cache().unwrap();

    accel::track_cpu_allocations().unwrap();
    let (before, count_before) = accel::cpu_live().unwrap();
    accel::reset_peak_stats(0).unwrap();
    let t = Tensor::zeros([256, 1024], (Kind::Float, Device::Cpu));
    let (with, count_with) = accel::cpu_live().unwrap();
    assert_eq!(with - before, 1 << 20);
    assert_eq!(count_with - count_before, 1);
    drop(t);
    assert_eq!(accel::cpu_live().unwrap(), (before, count_before));
    let stats = accel::memory_stats(0).unwrap();
    assert_eq!(stats.allocated_peak - before, 1 << 20);
    assert_eq!(stats.allocated_current, before);
}
