// IpcGroup (ipc_api.h): buffers, handles, and the host side of every operation. Each
// operation enqueues copies and kernels on the caller's stream and returns; barrier
// epochs advance identically on every rank because every rank issues the same calls.
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda/host_util.h"
#include "cuda/ipc_api.h"
#include "cuda/ipc_launch.h"
#include "cuda/peer_memory.h"

namespace plait::cuda {
namespace {

constexpr std::size_t kSignalBytes = 64 << 10;
static_assert(sizeof(ipc::Signals) <= kSignalBytes, "signal area too small");

const char* op_name(unsigned int op) {
  switch (op) {
    case ipc::kAllReduce: return "all_reduce";
    case ipc::kReduceScatter: return "reduce_scatter";
    case ipc::kBarrier: return "barrier";
    case ipc::kSend: return "send";
    case ipc::kRecv: return "recv";
    case ipc::kWaitFlag: return "wait_flag";
    default: return "operation";
  }
}

}  // namespace

struct IpcGroup::Impl {
  std::size_t data_bytes = 0;
  std::size_t inbox_bytes = 0;
  std::size_t oneshot_bytes = 0;
  std::unique_ptr<PeerMemory> memory;      // this rank's buffer, the peers' mapped, the error record
  std::uint32_t epoch = 0;
  std::uint32_t sent[kIpcMaxRanks] = {};    // chunks sent to each rank
  std::uint32_t received[kIpcMaxRanks] = {};
  cudaStream_t send_streams[kIpcMaxRanks] = {};
  cudaEvent_t send_done[kIpcMaxRanks] = {};
  cudaEvent_t ready = nullptr;              // orders a side stream after the caller's
  std::string broken;                       // why the group is unusable; empty while fine

  int rank() const { return memory->rank; }
  int size() const { return memory->size; }
  int device() const { return memory->device; }
  std::size_t total() const { return kSignalBytes + data_bytes + kIpcMaxRanks * inbox_bytes; }
  char* data(int r) const { return memory->base(r) + kSignalBytes; }
  char* inbox(int owner, int src) const {
    return memory->base(owner) + kSignalBytes + data_bytes + src * inbox_bytes;
  }
  ipc::Signals* signals(int r) const { return reinterpret_cast<ipc::Signals*>(memory->base(r)); }
  ipc::ErrorRecord* error_device() const { return memory->error_device(); }

  ipc::Peers peers(double timeout_s) const {
    ipc::Peers p{};
    for (int r = 0; r < size(); ++r) {
      p.data[r] = data(r);
      p.signals[r] = signals(r);
    }
    p.error = error_device();
    p.rank = rank();
    p.size = size();
    p.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
    return p;
  }

  void usable(const char* op) const {
    if (!memory->opened()) throw std::runtime_error(std::string(op) + ": call open() with every rank's handle first");
    if (!broken.empty()) throw std::runtime_error(std::string(op) + " on an unusable group: " + broken);
  }

  void check_peer(int peer, const char* what) const {
    if (peer < 0 || peer >= size() || peer == rank()) {
      throw std::invalid_argument(std::string(what) + " " + std::to_string(peer) + " must be another rank of 0.." +
                                  std::to_string(size() - 1));
    }
  }
};

IpcGroup::IpcGroup(int rank, int size, int device, std::size_t data_bytes, std::size_t inbox_bytes,
                   std::size_t oneshot_bytes)
    : impl_(std::make_unique<Impl>()) {
  if (data_bytes < 4096 || data_bytes % 4096 || inbox_bytes < 4096 || inbox_bytes % 4096) {
    throw std::invalid_argument("IPC buffer sizes must be positive multiples of 4096 bytes");
  }
  Impl& m = *impl_;
  m.data_bytes = data_bytes;
  m.inbox_bytes = inbox_bytes;
  m.oneshot_bytes = oneshot_bytes;
  m.memory = std::make_unique<PeerMemory>(rank, size, device, m.total(), kSignalBytes, "IPC buffer");
  DeviceGuard guard(device);
  cuda_check(cudaEventCreateWithFlags(&m.ready, cudaEventDisableTiming), "cudaEventCreate");
}

IpcGroup::~IpcGroup() {
  Impl& m = *impl_;
  if (cudaSetDevice(m.device()) != cudaSuccess) return;
  cudaDeviceSynchronize();
  for (int r = 0; r < m.size(); ++r) {
    if (m.send_streams[r] != nullptr) cudaStreamDestroy(m.send_streams[r]);
    if (m.send_done[r] != nullptr) cudaEventDestroy(m.send_done[r]);
  }
  if (m.ready != nullptr) cudaEventDestroy(m.ready);
  cudaGetLastError();
}  // then ~PeerMemory unmaps the peers and frees the buffer

std::string IpcGroup::handle() const { return impl_->memory->handle(); }

void IpcGroup::open(const std::vector<std::string>& handles) { impl_->memory->open(handles); }

void IpcGroup::all_reduce(std::uintptr_t data, std::size_t count, int dtype, int op, std::uintptr_t stream,
                          double timeout_s) {
  Impl& m = *impl_;
  m.usable("all_reduce");
  const std::size_t es = dtype_bytes(dtype);
  if (count == 0 || m.size() == 1) return;
  DeviceGuard guard(m.device());
  const ipc::Peers peers = m.peers(timeout_s);
  const std::size_t chunk = m.data_bytes / es;
  for (std::size_t off = 0; off < count; off += chunk) {
    const std::size_t len = count - off < chunk ? count - off : chunk;
    char* at = as_ptr(data) + off * es;
    cuda_check(cudaMemcpyAsync(m.data(m.rank()), at, len * es, cudaMemcpyDeviceToDevice, as_stream(stream)),
          "all_reduce copy-in");
    const bool two_shot = len * es > m.oneshot_bytes;
    ipc::launch_reduce(peers, dtype, op, two_shot, 0, len, at, m.epoch, ipc::kAllReduce, as_stream(stream));
    m.epoch += two_shot ? ipc::kTwoShotBarriers : ipc::kOneShotBarriers;
  }
}

void IpcGroup::reduce_scatter(std::uintptr_t in, std::uintptr_t out, std::size_t count_per_rank, int dtype, int op,
                              std::uintptr_t stream, double timeout_s) {
  Impl& m = *impl_;
  m.usable("reduce_scatter");
  const std::size_t es = dtype_bytes(dtype);
  if (count_per_rank == 0) return;
  DeviceGuard guard(m.device());
  const ipc::Peers peers = m.peers(timeout_s);
  // Each rank's block chunk sits at a 16-byte aligned stride in the data area.
  const std::size_t chunk = (m.data_bytes / es / m.size()) / 8 * 8;
  for (std::size_t e0 = 0; e0 < count_per_rank; e0 += chunk) {
    const std::size_t len = count_per_rank - e0 < chunk ? count_per_rank - e0 : chunk;
    const std::size_t stride = (len + 7) / 8 * 8;
    cuda_check(cudaMemcpy2DAsync(m.data(m.rank()), stride * es, as_ptr(in) + e0 * es, count_per_rank * es, len * es,
                                 m.size(),
                            cudaMemcpyDeviceToDevice, as_stream(stream)),
          "reduce_scatter copy-in");
    ipc::launch_reduce(peers, dtype, op, false, m.rank() * stride, len, as_ptr(out) + e0 * es, m.epoch,
                       ipc::kReduceScatter, as_stream(stream));
    m.epoch += ipc::kOneShotBarriers;
  }
}

void IpcGroup::all_gather(std::uintptr_t in, std::uintptr_t out, std::size_t bytes_per_rank, std::uintptr_t stream,
                          double timeout_s) {
  Impl& m = *impl_;
  m.usable("all_gather");
  if (bytes_per_rank == 0) return;
  DeviceGuard guard(m.device());
  const ipc::Peers peers = m.peers(timeout_s);
  const cudaStream_t s = as_stream(stream);
  for (std::size_t b0 = 0; b0 < bytes_per_rank; b0 += m.data_bytes) {
    const std::size_t n = bytes_per_rank - b0 < m.data_bytes ? bytes_per_rank - b0 : m.data_bytes;
    cuda_check(cudaMemcpyAsync(m.data(m.rank()), as_ptr(in) + b0, n, cudaMemcpyDeviceToDevice, s), "all_gather copy-in");
    ipc::launch_barrier(peers, m.epoch++, ipc::kBarrier, s);
    for (int j = 0; j < m.size(); ++j) {
      cuda_check(cudaMemcpyAsync(as_ptr(out) + j * bytes_per_rank + b0, m.data(j), n, cudaMemcpyDefault, s),
            "all_gather copy from group rank " + std::to_string(j));
    }
    ipc::launch_barrier(peers, m.epoch++, ipc::kBarrier, s);
  }
}

void IpcGroup::broadcast(std::uintptr_t data, std::size_t bytes, int src, std::uintptr_t stream, double timeout_s) {
  Impl& m = *impl_;
  m.usable("broadcast");
  if (src < 0 || src >= m.size()) throw std::invalid_argument("broadcast: src " + std::to_string(src) + " out of range");
  if (bytes == 0 || m.size() == 1) return;
  DeviceGuard guard(m.device());
  const ipc::Peers peers = m.peers(timeout_s);
  const cudaStream_t s = as_stream(stream);
  for (std::size_t b0 = 0; b0 < bytes; b0 += m.data_bytes) {
    const std::size_t n = bytes - b0 < m.data_bytes ? bytes - b0 : m.data_bytes;
    if (m.rank() == src) {
      cuda_check(cudaMemcpyAsync(m.data(src), as_ptr(data) + b0, n, cudaMemcpyDeviceToDevice, s), "copy-in");
    }
    ipc::launch_barrier(peers, m.epoch++, ipc::kBarrier, s);
    if (m.rank() != src) cuda_check(cudaMemcpyAsync(as_ptr(data) + b0, m.data(src), n, cudaMemcpyDefault, s), "copy-out");
    ipc::launch_barrier(peers, m.epoch++, ipc::kBarrier, s);
  }
}

void IpcGroup::barrier(std::uintptr_t stream, double timeout_s) {
  Impl& m = *impl_;
  m.usable("barrier");
  if (m.size() == 1) return;
  DeviceGuard guard(m.device());
  ipc::launch_barrier(m.peers(timeout_s), m.epoch++, ipc::kBarrier, as_stream(stream));
}

std::uintptr_t IpcGroup::send_stream(int dst) {
  Impl& m = *impl_;
  m.check_peer(dst, "send: dst");
  DeviceGuard guard(m.device());
  if (m.send_streams[dst] == nullptr) {
    cuda_check(cudaStreamCreateWithFlags(&m.send_streams[dst], cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaEventCreateWithFlags(&m.send_done[dst], cudaEventDisableTiming), "cudaEventCreate");
  }
  return reinterpret_cast<std::uintptr_t>(m.send_streams[dst]);
}

void IpcGroup::send(std::uintptr_t data, std::size_t bytes, int dst, std::uintptr_t stream, double timeout_s) {
  Impl& m = *impl_;
  m.usable("send");
  const cudaStream_t side = as_stream(send_stream(dst));
  DeviceGuard guard(m.device());
  cuda_check(cudaEventRecord(m.ready, as_stream(stream)), "cudaEventRecord");
  cuda_check(cudaStreamWaitEvent(side, m.ready, 0), "cudaStreamWaitEvent");
  const auto timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  std::size_t b0 = 0;
  do {  // at least one chunk, also for an empty message
    const std::size_t n = bytes - b0 < m.inbox_bytes ? bytes - b0 : m.inbox_bytes;
    const std::uint32_t chunk = m.sent[dst]++;
    ipc::launch_wait_flag(&m.signals(m.rank())->p2p_free[dst], chunk, m.error_device(), ipc::kSend, dst, timeout_ns, side);
    if (n > 0) {
      cuda_check(cudaMemcpyAsync(m.inbox(dst, m.rank()), as_ptr(data) + b0, n, cudaMemcpyDefault, side), "send copy");
    }
    ipc::launch_set_flag(&m.signals(dst)->p2p_full[m.rank()], chunk + 1, side);
    b0 += n;
  } while (b0 < bytes);
  cuda_check(cudaEventRecord(m.send_done[dst], side), "cudaEventRecord");
}

void IpcGroup::send_done(int dst, std::uintptr_t stream) {
  Impl& m = *impl_;
  m.check_peer(dst, "send_done: dst");
  if (m.send_done[dst] == nullptr) return;  // nothing sent yet
  DeviceGuard guard(m.device());
  cuda_check(cudaStreamWaitEvent(as_stream(stream), m.send_done[dst], 0), "cudaStreamWaitEvent");
}

void IpcGroup::recv(std::uintptr_t data, std::size_t bytes, int src, std::uintptr_t stream, double timeout_s) {
  Impl& m = *impl_;
  m.usable("recv");
  m.check_peer(src, "recv: src");
  DeviceGuard guard(m.device());
  const cudaStream_t s = as_stream(stream);
  const auto timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  std::size_t b0 = 0;
  do {
    const std::size_t n = bytes - b0 < m.inbox_bytes ? bytes - b0 : m.inbox_bytes;
    const std::uint32_t chunk = m.received[src]++;
    ipc::launch_wait_flag(&m.signals(m.rank())->p2p_full[src], chunk + 1, m.error_device(), ipc::kRecv, src, timeout_ns, s);
    if (n > 0) {
      cuda_check(cudaMemcpyAsync(as_ptr(data) + b0, m.inbox(m.rank(), src), n, cudaMemcpyDeviceToDevice, s),
                 "recv copy");
    }
    ipc::launch_set_flag(&m.signals(src)->p2p_free[m.rank()], chunk + 1, s);
    b0 += n;
  } while (b0 < bytes);
}

std::uintptr_t IpcGroup::flag_address(int rank, int index) const {
  const Impl& m = *impl_;
  m.usable("flag_address");
  if (rank < 0 || rank >= m.size() || index < 0 || index >= kIpcUserFlags) {
    throw std::invalid_argument("flag_address: rank or index out of range (index < " +
                                std::to_string(kIpcUserFlags) + ")");
  }
  return reinterpret_cast<std::uintptr_t>(&m.signals(rank)->user[index]);
}

void IpcGroup::set_flag(int rank, int index, std::uint32_t value, std::uintptr_t stream) {
  const std::uintptr_t flag = flag_address(rank, index);
  DeviceGuard guard(impl_->device());
  ipc::launch_set_flag(reinterpret_cast<std::uint32_t*>(flag), value, as_stream(stream));
}

void IpcGroup::wait_flag(int index, std::uint32_t value, std::uintptr_t stream, double timeout_s) {
  const std::uintptr_t flag = flag_address(impl_->rank(), index);
  DeviceGuard guard(impl_->device());
  ipc::launch_wait_flag(reinterpret_cast<const std::uint32_t*>(flag), value, impl_->error_device(), ipc::kWaitFlag,
                        kIpcMaxRanks + index, static_cast<unsigned long long>(timeout_s * 1e9), as_stream(stream));
}

void IpcGroup::check() {
  Impl& m = *impl_;
  const std::optional<ipc::ErrorRecord> record = m.memory->take_timeout();
  if (!record) return;
  const unsigned int op = record->op;
  const unsigned int peer = record->peer;
  const unsigned int value = record->value;
  std::string what = std::string(op_name(op)) + " timed out on the GPU waiting ";
  if (peer >= static_cast<unsigned int>(kIpcMaxRanks)) {
    what += "for user flag " + std::to_string(peer - kIpcMaxRanks) + " to reach " + std::to_string(value);
  } else if (op == ipc::kSend) {
    what += "for group rank " + std::to_string(peer) + " to receive";
  } else if (op == ipc::kRecv) {
    what += "for group rank " + std::to_string(peer) + " to send";
  } else {
    what += "for group rank " + std::to_string(peer) + " to arrive (barrier " + std::to_string(value) + ")";
  }
  m.broken = "it timed out earlier: " + what;
  throw IpcTimeout(what);
}

int IpcGroup::rank() const { return impl_->rank(); }
int IpcGroup::size() const { return impl_->size(); }
int IpcGroup::device() const { return impl_->device(); }
std::size_t IpcGroup::data_bytes() const { return impl_->data_bytes; }
std::size_t IpcGroup::inbox_bytes() const { return impl_->inbox_bytes; }
std::size_t IpcGroup::oneshot_bytes() const { return impl_->oneshot_bytes; }

}  // namespace plait::cuda
