// CUDA device queries and the fill_check smoke test (declared in cuda_api.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_api.h"
#include "cuda/host_util.h"

namespace plait::cuda {
namespace {

// A device allocation of n ints, freed when it goes out of scope (also on throw).
class DeviceInts {
 public:
  explicit DeviceInts(std::int64_t n) {
    cuda_check(cudaMalloc(&ptr_, static_cast<size_t>(n) * sizeof(int)),
          "cudaMalloc(" + std::to_string(n) + " ints)");
  }
  ~DeviceInts() { cudaFree(ptr_); }
  DeviceInts(const DeviceInts&) = delete;
  DeviceInts& operator=(const DeviceInts&) = delete;
  int* get() const { return ptr_; }

 private:
  int* ptr_ = nullptr;
};

__global__ void fill_times_three(int* out, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = static_cast<int>(i * 3);
  }
}

}  // namespace

int runtime_version() {
  int version = 0;
  cuda_check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  return version;
}

int driver_version() {
  int version = 0;
  cuda_check(cudaDriverGetVersion(&version), "cudaDriverGetVersion");
  return version;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string device_name(int device) {
  cudaDeviceProp prop;
  cuda_check(cudaGetDeviceProperties(&prop, device),
        "cudaGetDeviceProperties(device=" + std::to_string(device) + ")");
  return prop.name;
}

bool can_access_peer(int device, int peer) {
  int can = 0;
  cuda_check(cudaDeviceCanAccessPeer(&can, device, peer),
        "cudaDeviceCanAccessPeer(device=" + std::to_string(device) + ", peer=" + std::to_string(peer) + ")");
  return can != 0;
}

bool fill_check(std::int64_t n) {
  constexpr std::int64_t kMax = INT32_MAX / 3;  // i * 3 must fit in an int
  if (n <= 0 || n > kMax) {
    throw std::invalid_argument("fill_check: n must be in [1, " + std::to_string(kMax) + "], got " +
                                std::to_string(n));
  }
  DeviceInts buffer(n);
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((n + kThreads - 1) / kThreads, 4096));
  fill_times_three<<<blocks, kThreads>>>(buffer.get(), n);
  cuda_check(cudaGetLastError(), "fill_times_three launch");
  std::vector<int> host(static_cast<size_t>(n));
  // cudaMemcpy waits for the kernel, so a fault inside it surfaces here.
  cuda_check(cudaMemcpy(host.data(), buffer.get(), host.size() * sizeof(int), cudaMemcpyDeviceToHost),
        "cudaMemcpy(device to host)");
  for (std::int64_t i = 0; i < n; ++i) {
    if (host[static_cast<size_t>(i)] != static_cast<int>(i * 3)) return false;
  }
  return true;
}

}  // namespace plait::cuda
