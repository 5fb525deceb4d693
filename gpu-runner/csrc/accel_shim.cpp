// A C ABI over the parts of libtorch's accelerator and allocator API that tch does not bind:
// device memory statistics, emptying the caching allocator, synchronizing, and (on CPU) a
// counting allocator so tests can see which tensors are still alive.
//
// Every entry point catches C++ exceptions and reports them as a non-zero return plus a
// message, because unwinding across the FFI boundary is undefined behaviour.

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/CPUAllocator.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace {

void write_message(char* buf, size_t len, const std::string& msg) {
  if (buf == nullptr || len == 0) {
    return;
  }
  size_t n = std::min(len - 1, msg.size());
  std::memcpy(buf, msg.data(), n);
  buf[n] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write_message(err, err_len, e.what());
  } catch (...) {
    write_message(err, err_len, "unknown C++ exception");
  }
  return 1;
}

// Wraps the default CPU allocator and counts live bytes and allocations. Data pointer and
// context stay the same pointer, so tensors it allocates remain "simple" to libtorch.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  explicit CountingCpuAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    void* data = inner_->raw_allocate(n);
    // Zero-byte storages (empty tensors that libtorch caches) hold no memory; not counted.
    if (n > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[data] = n;
      live_bytes_ += static_cast<int64_t>(n);
      peak_bytes_ = std::max(peak_bytes_, live_bytes_);
    }
    return {data, data, &CountingCpuAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CountingCpuAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void stats(int64_t* live_bytes, int64_t* live_allocations, int64_t* peak_bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    *live_bytes = live_bytes_;
    *live_allocations = static_cast<int64_t>(sizes_.size());
    *peak_bytes = peak_bytes_;
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_bytes_ = live_bytes_;
  }

  static CountingCpuAllocator* instance;

 private:
  static void release(void* data) {
    CountingCpuAllocator* self = instance;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      auto it = self->sizes_.find(data);
      if (it != self->sizes_.end()) {
        self->live_bytes_ -= static_cast<int64_t>(it->second);
        self->sizes_.erase(it);
      }
    }
    self->inner_->raw_deallocate(data);
  }

  c10::Allocator* inner_;
  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;
  int64_t live_bytes_ = 0;
  int64_t peak_bytes_ = 0;
};

CountingCpuAllocator* CountingCpuAllocator::instance = nullptr;
std::once_flag counting_once;

constexpr size_t kPage = 4096;
constexpr unsigned int kCudaHostRegisterPortable = 1;

// cudaHostRegister and cudaHostUnregister of the CUDA runtime libtorch_cuda loaded, looked up
// at run time so that CPU-only builds need no CUDA.
struct HostRegister {
  int (*enroll)(void*, size_t, unsigned int);
  int (*unenroll)(void*);
};

const HostRegister* host_register() {
  static const HostRegister* found = []() -> const HostRegister* {
    void* handle = RTLD_DEFAULT;
    if (dlsym(handle, "cudaHostRegister") == nullptr) {
      handle = nullptr;
      for (const char* name : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
        handle = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
        if (handle != nullptr) {
          break;
        }
      }
    }
    if (handle == nullptr) {
      return nullptr;
    }
    void* enroll = dlsym(handle, "cudaHostRegister");
    void* unenroll = dlsym(handle, "cudaHostUnregister");
    if (enroll == nullptr || unenroll == nullptr) {
      return nullptr;
    }
    return new HostRegister{reinterpret_cast<int (*)(void*, size_t, unsigned int)>(enroll),
                            reinterpret_cast<int (*)(void*)>(unenroll)};
  }();
  return found;
}

}  // namespace

extern "C" {

// Mirrors `FlMemoryStats` in src/accel.rs.
struct FlMemoryStats {
  int64_t allocated_current;
  int64_t allocated_peak;
  int64_t reserved_current;
  int64_t reserved_peak;
  int64_t num_alloc_retries;
  int64_t num_ooms;
};

// Loads libtorch_cuda.so (next to libtorch_cpu.so) so its CUDA hooks register. Linkers
// drop the library from the binary when nothing references it directly; loading it here
// works for every binary that links this crate. Returns 0 when loaded, 1 (with a message)
// when it is absent or cannot be loaded.
int fl_load_cuda(char* err, size_t err_len) {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&c10::GetDefaultCPUAllocator), &info) == 0 ||
      info.dli_fname == nullptr) {
    write_message(err, err_len, "cannot locate libc10.so to find libtorch_cuda.so");
    return 1;
  }
  std::string dir(info.dli_fname);
  dir = dir.substr(0, dir.find_last_of('/') + 1);
  std::string path = dir + "libtorch_cuda.so";
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    write_message(err, err_len, path + ": " + (why ? why : "dlopen failed"));
    return 1;
  }
  return 0;
}

// Writes the accelerator's device type name ("cuda", ...) or "cpu" when there is none.
int fl_accelerator(char* name, size_t name_len, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto acc = at::accelerator::getAccelerator(false);
    if (acc.has_value() && at::accelerator::deviceCount() > 0) {
      write_message(name, name_len, c10::DeviceTypeName(*acc, /*lower_case=*/true));
    } else {
      write_message(name, name_len, "cpu");
    }
  });
}

static bool has_accelerator() {
  auto acc = at::accelerator::getAccelerator(false);
  return acc.has_value() && at::accelerator::deviceCount() > 0;
}

int fl_synchronize(int device_index, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    if (has_accelerator()) {
      at::accelerator::synchronizeDevice(static_cast<c10::DeviceIndex>(device_index));
    }
  });
}

int fl_empty_cache(char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    if (has_accelerator()) {
      at::accelerator::emptyCache();
    }
  });
}

// Device allocator statistics; on CPU the counting allocator's numbers (allocated ==
// reserved, as the CPU allocator does not cache) or zeros when it is not installed.
int fl_memory_stats(int device_index, FlMemoryStats* out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    *out = FlMemoryStats{};
    if (has_accelerator()) {
      auto s = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
      constexpr size_t agg = static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
      out->allocated_current = s.allocated_bytes[agg].current;
      out->allocated_peak = s.allocated_bytes[agg].peak;
      out->reserved_current = s.reserved_bytes[agg].current;
      out->reserved_peak = s.reserved_bytes[agg].peak;
      out->num_alloc_retries = s.num_alloc_retries;
      out->num_ooms = s.num_ooms;
    } else if (CountingCpuAllocator::instance != nullptr) {
      int64_t live = 0, count = 0, peak = 0;
      CountingCpuAllocator::instance->stats(&live, &count, &peak);
      out->allocated_current = live;
      out->allocated_peak = peak;
      out->reserved_current = live;
      out->reserved_peak = peak;
    }
  });
}

int fl_reset_peak_stats(int device_index, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    if (has_accelerator()) {
      at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
    } else if (CountingCpuAllocator::instance != nullptr) {
      CountingCpuAllocator::instance->reset_peak();
    }
  });
}

// Free and total device memory in bytes; zeros on CPU.
int fl_memory_info(int device_index, uint64_t* free_bytes, uint64_t* total_bytes, char* err,
                   size_t err_len) {
  return guarded(err, err_len, [&] {
    *free_bytes = 0;
    *total_bytes = 0;
    if (has_accelerator()) {
      auto info = at::accelerator::getMemoryInfo(static_cast<c10::DeviceIndex>(device_index));
      *free_bytes = info.first;
      *total_bytes = info.second;
    }
  });
}

// Installs the counting CPU allocator (once per process). Tensors allocated before keep
// their original deleter and are not counted.
int fl_track_cpu_allocations(char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::call_once(counting_once, [] {
      CountingCpuAllocator::instance = new CountingCpuAllocator(c10::GetDefaultCPUAllocator());
      c10::SetCPUAllocator(CountingCpuAllocator::instance, /*priority=*/1);
    });
  });
}

// Live bytes and allocations made through the counting CPU allocator.
int fl_cpu_live(int64_t* live_bytes, int64_t* live_allocations, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    *live_bytes = 0;
    *live_allocations = 0;
    if (CountingCpuAllocator::instance != nullptr) {
      int64_t peak = 0;
      CountingCpuAllocator::instance->stats(live_bytes, live_allocations, &peak);
    }
  });
}

// Allows or forbids TF32 in float32 matrix products (cuBLAS) and convolutions (cuDNN). cuDNN
// allows it by default, which moves float32 results by about 1e-3; comparisons with a float32
// reference turn it off.
int fl_set_tf32(int allow, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::globalContext().setAllowTF32CuBLAS(allow != 0);
    at::globalContext().setAllowTF32CuDNN(allow != 0);
  });
}

// A copy of `src` in host memory that the device's allocator statistics do not count: pinned
// (page-locked) memory when an accelerator is present, so copies back to it are fast and can
// overlap with compute; on a CPU-only runner plain malloc'd memory outside the counting
// allocator, so the CPU standing in for a GPU shows modules leaving "the device". Where CUDA
// refuses to page-lock it, the copy stays pageable (slower copies, the same bytes): never
// libtorch's pinned allocator, whose rounding up would overrun the host budget the runner
// planned with. `*out` is a new tensor the caller owns (tch frees it).
int fl_host_copy(const at::Tensor* src, at::Tensor** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::Tensor cpu = src->to(at::kCPU).contiguous();
    size_t bytes = cpu.nbytes();
    // Page-aligned, so that the whole allocation can be page-locked as it is.
    size_t size = std::max<size_t>((bytes + kPage - 1) / kPage * kPage, kPage);
    void* data = nullptr;
    if (posix_memalign(&data, kPage, size) != 0) {
      throw std::runtime_error("cannot allocate " + std::to_string(bytes) + " bytes of host memory");
    }
    std::memcpy(data, cpu.data_ptr(), bytes);
    // Page-locked in place rather than through libtorch's pinned allocator, which rounds each
    // allocation up to a power of two (a 141.6 MB Wan feed-forward matrix would pin 256 MiB)
    // and keeps freed blocks for reuse instead of returning them.
    bool pinned = false;
    if (has_accelerator()) {
      const HostRegister* reg = host_register();
      int rc = reg == nullptr ? -1 : reg->enroll(data, size, kCudaHostRegisterPortable);
      pinned = rc == 0;
      if (!pinned) {
        static std::once_flag warned;
        std::call_once(warned, [rc] {
          std::fprintf(stderr,
                       "framelane: cudaHostRegister %s (%d); host copies stay pageable (slower "
                       "copies to the device)\n",
                       rc < 0 ? "not found" : "failed", rc);
        });
      }
    }
    auto plain = [](void* p) { std::free(p); };
    auto registered = [](void* p) {
      host_register()->unenroll(p);
      std::free(p);
    };
    *out = new at::Tensor(pinned ? at::from_blob(data, cpu.sizes(), registered, cpu.options())
                                 : at::from_blob(data, cpu.sizes(), plain, cpu.options()));
  });
}

}  // extern "C"
