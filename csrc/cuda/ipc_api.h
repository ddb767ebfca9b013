// CUDA IPC communication between the processes of one node, declared without CUDA types
// so that bindings.cpp (compiled by the C++ compiler) can use it.
//
// IpcGroup: every rank allocates one device buffer, exports its cudaIpcMemHandle, and
// maps every peer's buffer (exchanged by the Python side through torch.distributed).
// Each buffer holds a signal area (barrier flags, send/recv flags, user flags), a data
// area for collectives and one inbox per source rank for send/recv. Everything is
// enqueued on the caller's CUDA stream (send on a side stream per destination); waits
// inside kernels are bounded by a timeout measured with the GPU's global timer and, when
// it runs out, record which wait failed in pinned host memory and let the kernel exit,
// so a dead peer never hangs the GPU. check() turns such a record into IpcTimeout.
//
// ipc.cu implements this when plait._C is built with CUDA; ipc_disabled.cpp otherwise
// (every constructor call throws, saying how to rebuild).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace plait::cuda {

constexpr int kIpcMaxRanks = 8;       // one node
constexpr int kIpcUserFlags = 1024;   // flags free for overlap kernels (flag_address)
constexpr int kIpcBarrierSlots = 64;  // one barrier flag row per thread block

// A wait inside a kernel ran out of time; the message names the operation and the peer.
class IpcTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class IpcGroup {
 public:
  // Allocates this rank's buffer on `device`: data_bytes for collectives (a multiple of
  // 4096), inbox_bytes per source rank for send/recv. oneshot_bytes: all_reduce up to
  // this size reduces every rank's whole input on every rank, above it two-shot.
  IpcGroup(int rank, int size, int device, std::size_t data_bytes, std::size_t inbox_bytes,
           std::size_t oneshot_bytes);
  ~IpcGroup();
  IpcGroup(const IpcGroup&) = delete;
  IpcGroup& operator=(const IpcGroup&) = delete;

  // This rank's cudaIpcMemHandle_t, as raw bytes.
  std::string handle() const;
  // Maps the buffers of all ranks given every rank's handle (index = group rank).
  void open(const std::vector<std::string>& handles);

  // dtype codes: 0 float32, 1 float16, 2 bfloat16; op codes: 0 sum, 1 max, 2 min, 3 avg
  // (the codes of plait._C.shm_dtypes / shm_ops). Pointers are device addresses.
  void all_reduce(std::uintptr_t data, std::size_t count, int dtype, int op, std::uintptr_t stream, double timeout_s);
  // in: [size][count_per_rank] elements, out: count_per_rank (this rank's block, reduced).
  void reduce_scatter(std::uintptr_t in, std::uintptr_t out, std::size_t count_per_rank, int dtype, int op,
                      std::uintptr_t stream, double timeout_s);
  // out: [size][bytes_per_rank].
  void all_gather(std::uintptr_t in, std::uintptr_t out, std::size_t bytes_per_rank, std::uintptr_t stream,
                  double timeout_s);
  void broadcast(std::uintptr_t data, std::size_t bytes, int src, std::uintptr_t stream, double timeout_s);
  void barrier(std::uintptr_t stream, double timeout_s);
  // send runs on a side stream that first waits for `stream` (so the caller's stream is never
  // blocked by a peer); send_done makes `stream` wait until the sends to dst so far finished.
  void send(std::uintptr_t data, std::size_t bytes, int dst, std::uintptr_t stream, double timeout_s);
  void send_done(int dst, std::uintptr_t stream);
  std::uintptr_t send_stream(int dst);
  void recv(std::uintptr_t data, std::size_t bytes, int src, std::uintptr_t stream, double timeout_s);

  // Device address, valid in this process, of user flag `index` in rank `rank`'s buffer.
  std::uintptr_t flag_address(int rank, int index) const;
  // Enqueues: *flag_address(rank, index) = value (release, system scope).
  void set_flag(int rank, int index, std::uint32_t value, std::uintptr_t stream);
  // Enqueues a wait until this rank's user flag `index` reaches value (wrapping compare).
  void wait_flag(int index, std::uint32_t value, std::uintptr_t stream, double timeout_s);

  // Throws IpcTimeout for the first wait that timed out since the last check (the group
  // is unusable afterwards). Does not synchronize: call it after the stream finished.
  void check();

  int rank() const;
  int size() const;
  int device() const;
  std::size_t data_bytes() const;
  std::size_t inbox_bytes() const;
  std::size_t oneshot_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace plait::cuda
