// Host-side helpers of the CUDA sources: error checks that throw with what failed, a
// scoped current device, and the integer <-> pointer/stream casts of the Python boundary
// (addresses and streams cross it as integers). CUDA types allowed: only .cu files include this.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace plait::cuda {

inline void cuda_check(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(what + " failed: " + cudaGetErrorString(err));
}

// Makes `device` current for a scope, restoring the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline char* as_ptr(std::uintptr_t p) { return reinterpret_cast<char*>(p); }

// Bytes per element of a reducible dtype code (0 float32, 1 float16, 2 bfloat16).
inline std::size_t dtype_bytes(int dtype) {
  if (dtype == 0) return 4;
  if (dtype == 1 || dtype == 2) return 2;
  throw std::invalid_argument("the ipc backend reduces float32, float16 and bfloat16 (dtype codes 0-2), not code " +
                              std::to_string(dtype));
}

}  // namespace plait::cuda
