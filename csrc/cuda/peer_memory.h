// PeerMemory: what IpcGroup and SymmetricBuffer both stand on. One rank's device
// allocation (its first bytes zeroed), exported as a CUDA IPC handle; every peer's
// allocation mapped into this process by open(); and a pinned, device-mapped record that
// a timed-out GPU wait writes (ipc_device.cuh). Host side only: .cu files include this.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "cuda/ipc_device.cuh"

namespace plait::cuda {

class PeerMemory {
 public:
  // Allocates `bytes` on `device` for group rank `rank` of `size`, zeroes the first
  // `zero_bytes`, and the error record; `what` names the allocation in error messages.
  PeerMemory(int rank, int size, int device, std::size_t bytes, std::size_t zero_bytes, const std::string& what);
  ~PeerMemory();  // synchronizes the device, unmaps the peers, frees
  PeerMemory(const PeerMemory&) = delete;
  PeerMemory& operator=(const PeerMemory&) = delete;

  std::string handle() const;                           // this rank's cudaIpcMemHandle_t as bytes
  void open(const std::vector<std::string>& handles);   // maps every peer's (index = group rank)

  char* base(int r) const { return bases_[r]; }
  bool opened() const { return opened_; }
  ipc::ErrorRecord* error_device() const { return error_device_; }
  // The record of a GPU wait that timed out since the last call (then cleared), if any.
  // Reads host memory only: call it once the stream that could have written it finished.
  std::optional<ipc::ErrorRecord> take_timeout();

  const int rank, size, device;

 private:
  void release() noexcept;

  char* own_ = nullptr;
  char* bases_[kIpcMaxRanks] = {};
  ipc::ErrorRecord* error_host_ = nullptr;
  ipc::ErrorRecord* error_device_ = nullptr;
  bool opened_ = false;
};

}  // namespace plait::cuda
