// PeerMemory (peer_memory.h): allocation, IPC handle export and peer mapping.
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda/host_util.h"
#include "cuda/peer_memory.h"

namespace plait::cuda {

PeerMemory::PeerMemory(int rank_, int size_, int device_, std::size_t bytes, std::size_t zero_bytes,
                       const std::string& what)
    : rank(rank_), size(size_), device(device_) {
  if (size < 1 || size > kIpcMaxRanks || rank < 0 || rank >= size) {
    throw std::invalid_argument(what + " spans 1.." + std::to_string(kIpcMaxRanks) + " ranks; got rank " +
                                std::to_string(rank) + " of " + std::to_string(size));
  }
  DeviceGuard guard(device);
  try {
    cuda_check(cudaMalloc(&own_, bytes), "cudaMalloc(" + std::to_string(bytes) + " bytes of " + what + ")");
    bases_[rank] = own_;
    cuda_check(cudaMemset(own_, 0, zero_bytes), "cudaMemset(" + what + " flags)");
    cuda_check(cudaHostAlloc(&error_host_, sizeof(ipc::ErrorRecord), cudaHostAllocMapped),
               "cudaHostAlloc(error record)");
    std::memset(error_host_, 0, sizeof(ipc::ErrorRecord));
    cuda_check(cudaHostGetDevicePointer(&error_device_, error_host_, 0), "cudaHostGetDevicePointer(error record)");
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after zeroing the " + what + " flags");
  } catch (...) {  // the destructor does not run for a constructor that throws
    release();
    throw;
  }
}

PeerMemory::~PeerMemory() {
  if (cudaSetDevice(device) != cudaSuccess) return;
  cudaDeviceSynchronize();
  release();
}

void PeerMemory::release() noexcept {
  for (int r = 0; r < size; ++r) {
    if (r != rank && bases_[r] != nullptr) cudaIpcCloseMemHandle(bases_[r]);
    bases_[r] = nullptr;
  }
  if (error_host_ != nullptr) cudaFreeHost(error_host_);
  if (own_ != nullptr) cudaFree(own_);
  error_host_ = nullptr;
  own_ = nullptr;
  cudaGetLastError();
}

std::string PeerMemory::handle() const {
  DeviceGuard guard(device);
  cudaIpcMemHandle_t h;
  cuda_check(cudaIpcGetMemHandle(&h, own_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof h);
}

void PeerMemory::open(const std::vector<std::string>& handles) {
  if (static_cast<int>(handles.size()) != size) {
    throw std::invalid_argument("open needs one handle per rank (" + std::to_string(size) + "), got " +
                                std::to_string(handles.size()));
  }
  DeviceGuard guard(device);
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) throw std::invalid_argument("malformed IPC handle");
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles[r].data(), sizeof h);
    void* mapped = nullptr;
    cuda_check(cudaIpcOpenMemHandle(&mapped, h, cudaIpcMemLazyEnablePeerAccess),
               "cudaIpcOpenMemHandle(group rank " + std::to_string(r) + ")");
    bases_[r] = static_cast<char*>(mapped);
  }
  opened_ = true;
}

std::optional<ipc::ErrorRecord> PeerMemory::take_timeout() {
  volatile ipc::ErrorRecord* record = error_host_;
  if (record->code != 1u) return std::nullopt;
  ipc::ErrorRecord taken{record->code, record->op, record->peer, record->value};
  record->code = 0u;
  return taken;
}

}  // namespace plait::cuda
