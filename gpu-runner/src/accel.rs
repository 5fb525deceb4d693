//! The accelerator shim (csrc/accel_shim.cpp): what tch does not bind — synchronizing, emptying
//! the caching allocator, device memory statistics, loading libtorch_cuda, and a counting CPU
//! allocator so CPU runs report (and tests can check) live tensor bytes, and host copies of
//! weights outside the device's accounting.

// Calling C functions is `unsafe` in Rust; the workspace forbids unsafe code, so this one
// module (the only FFI boundary of the crate) allows it. Every call passes valid, owned
// buffers whose lengths it also passes, and the C side catches every C++ exception.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

use tch::Tensor;

const MSG_LEN: usize = 1024;

#[repr(C)]
#[derive(Default)]
struct FlMemoryStats {
    allocated_current: i64,
    allocated_peak: i64,
    reserved_current: i64,
    reserved_peak: i64,
    num_alloc_retries: i64,
    num_ooms: i64,
}

unsafe extern "C" {
    fn fl_load_cuda(err: *mut c_char, err_len: usize) -> c_int;
    fn fl_accelerator(name: *mut c_char, len: usize, err: *mut c_char, err_len: usize) -> c_int;
    fn fl_synchronize(device_index: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn fl_empty_cache(err: *mut c_char, err_len: usize) -> c_int;
    fn fl_memory_stats(
        device_index: c_int,
        out: *mut FlMemoryStats,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn fl_reset_peak_stats(device_index: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn fl_memory_info(
        device_index: c_int,
        free_bytes: *mut u64,
        total_bytes: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn fl_track_cpu_allocations(err: *mut c_char, err_len: usize) -> c_int;
    fn fl_set_tf32(allow: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn fl_host_copy(
        src: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn fl_cpu_live(
        live_bytes: *mut i64,
        live_allocations: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// A libtorch call in the shim threw.
#[derive(Debug, thiserror::Error)]
#[error("libtorch {call} failed: {message}")]
pub struct AccelError {
    pub call: &'static str,
    pub message: String,
}

fn message(buf: &[c_char]) -> String {
    // SAFETY: the shim always NUL-terminates within the buffer length it was given.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn check(call: &'static str, rc: c_int, err: &[c_char]) -> Result<(), AccelError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(AccelError {
            call,
            message: message(err),
        })
    }
}

/// Allocator statistics of one device, in bytes (counts for retries and OOMs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub allocated_current: i64,
    pub allocated_peak: i64,
    pub reserved_current: i64,
    pub reserved_peak: i64,
    pub num_alloc_retries: i64,
    pub num_ooms: i64,
}

/// Loads libtorch_cuda once per process so `tch::Cuda::is_available()` can see GPUs. Returns
/// why it could not (absent on a CPU-only libtorch, or its CUDA libraries missing).
pub fn load_cuda() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let mut err = [0 as c_char; MSG_LEN];
            // SAFETY: `err` is a writable buffer of the length passed.
            let rc = unsafe { fl_load_cuda(err.as_mut_ptr(), err.len()) };
            if rc == 0 { Ok(()) } else { Err(message(&err)) }
        })
        .clone()
}

/// The accelerator type libtorch sees (`"cuda"`, ...) or `"cpu"` when it sees none.
pub fn accelerator() -> Result<String, AccelError> {
    let mut name = [0 as c_char; 64];
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: both buffers are writable and of the lengths passed.
    let rc = unsafe { fl_accelerator(name.as_mut_ptr(), name.len(), err.as_mut_ptr(), err.len()) };
    check("getAccelerator", rc, &err)?;
    Ok(message(&name))
}

/// Waits for all work queued on the device; a no-op on CPU.
pub fn synchronize(device_index: usize) -> Result<(), AccelError> {
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `err` is writable and of the length passed.
    let rc = unsafe { fl_synchronize(device_index as c_int, err.as_mut_ptr(), err.len()) };
    check("synchronizeDevice", rc, &err)
}

/// Returns the caching allocator's unused blocks to the driver; a no-op on CPU.
pub fn empty_cache() -> Result<(), AccelError> {
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `err` is writable and of the length passed.
    let rc = unsafe { fl_empty_cache(err.as_mut_ptr(), err.len()) };
    check("emptyCache", rc, &err)
}

/// Allocator statistics; on CPU those of the counting allocator (zeros until
/// [`track_cpu_allocations`] installed it).
pub fn memory_stats(device_index: usize) -> Result<MemoryStats, AccelError> {
    let mut out = FlMemoryStats::default();
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `out` is a valid FlMemoryStats (same layout as the C struct); `err` is writable.
    let rc =
        unsafe { fl_memory_stats(device_index as c_int, &mut out, err.as_mut_ptr(), err.len()) };
    check("getDeviceStats", rc, &err)?;
    Ok(MemoryStats {
        allocated_current: out.allocated_current,
        allocated_peak: out.allocated_peak,
        reserved_current: out.reserved_current,
        reserved_peak: out.reserved_peak,
        num_alloc_retries: out.num_alloc_retries,
        num_ooms: out.num_ooms,
    })
}

/// Starts a new peak window (peaks become the current values).
pub fn reset_peak_stats(device_index: usize) -> Result<(), AccelError> {
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `err` is writable and of the length passed.
    let rc = unsafe { fl_reset_peak_stats(device_index as c_int, err.as_mut_ptr(), err.len()) };
    check("resetPeakStats", rc, &err)
}

/// `(free, total)` device memory in bytes, as the driver reports it; `(0, 0)` on CPU.
pub fn memory_info(device_index: usize) -> Result<(u64, u64), AccelError> {
    let (mut free, mut total) = (0u64, 0u64);
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: out-pointers are to live locals; `err` is writable and of the length passed.
    let rc = unsafe {
        fl_memory_info(
            device_index as c_int,
            &mut free,
            &mut total,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    check("getMemoryInfo", rc, &err)?;
    Ok((free, total))
}

/// Routes CPU tensor allocations through a counting allocator (once per process), so CPU runs
/// report live and peak bytes like a GPU does. Tensors allocated before are not counted.
pub fn track_cpu_allocations() -> Result<(), AccelError> {
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `err` is writable and of the length passed.
    let rc = unsafe { fl_track_cpu_allocations(err.as_mut_ptr(), err.len()) };
    check("SetCPUAllocator", rc, &err)
}

/// Live CPU bytes and allocations made through the counting allocator.
pub fn cpu_live() -> Result<(i64, i64), AccelError> {
    let (mut bytes, mut count) = (0i64, 0i64);
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: out-pointers are to live locals; `err` is writable and of the length passed.
    let rc = unsafe { fl_cpu_live(&mut bytes, &mut count, err.as_mut_ptr(), err.len()) };
    check("cpu allocator stats", rc, &err)?;
    Ok((bytes, count))
}

/// A copy of `tensor` in host memory the device's allocator statistics do not count:
/// page-locked where there is an accelerator (registered with CUDA in place, so it takes the
/// tensor's bytes, not libtorch's pinned allocator's next power of two; pageable where CUDA
/// refuses), memory outside the counting allocator on a CPU-only runner. Where offloaded
/// weights wait between stages.
pub fn host_copy(tensor: &Tensor) -> Result<Tensor, AccelError> {
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `tensor.as_ptr()` is a live tensor for the call; `out` is a live local the shim
    // sets to a new heap tensor on success; `err` is writable and of the length passed.
    let rc = unsafe { fl_host_copy(tensor.as_ptr(), &mut out, err.as_mut_ptr(), err.len()) };
    check("host copy", rc, &err)?;
    // SAFETY: on success `out` is a tensor the shim allocated with `new`, owned by no one
    // else; tch's Tensor takes ownership and frees it on drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Allows or forbids TF32 in float32 matrix products and convolutions on CUDA (cuDNN allows
/// it by default). Comparisons against a float32 reference forbid it; a no-op on the CPU.
pub fn set_tf32(allow: bool) -> Result<(), AccelError> {
    let mut err = [0 as c_char; MSG_LEN];
    // SAFETY: `err` is writable and of the length passed.
    let rc = unsafe { fl_set_tf32(c_int::from(allow), err.as_mut_ptr(), err.len()) };
    check("setAllowTF32", rc, &err)
}
