// SymmetricBuffer (symmetric_api.h): allocation and mapping, flag set/wait, and the
// chunk-by-chunk row reduction that lets an all-reduce start while the GEMM producing its
// input is still running. Rows are summed in rank order 0..n-1 in fp32 and rounded once,
// as the IPC all-reduce does, so every rank gets bitwise the same result.
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda/convert.cuh"
#include "cuda/host_util.h"
#include "cuda/ipc_launch.h"
#include "cuda/peer_memory.h"
#include "cuda/symmetric_api.h"

namespace plait::cuda {
namespace {

constexpr std::size_t kFlagBytes = kSymmetricFlags * sizeof(std::uint32_t);
constexpr int kThreads = 512;

// What reduce_rows_kernel reads: every rank's data area and its chunk flags, as mapped here.
struct RowPeers {
  const char* data[kIpcMaxRanks];
  const std::uint32_t* flags[kIpcMaxRanks];  // flag first_flag of every rank
  ipc::ErrorRecord* error;
  int size;
  unsigned long long timeout_ns;
};

// Threads 0..size-1 each wait for one rank's flag of chunk c; false (for the whole block) on timeout.
__device__ bool await_chunk(const RowPeers& p, std::size_t c, std::uint32_t epoch) {
  int failed = 0;
  if (threadIdx.x < p.size && !ipc::wait_at_least(p.flags[threadIdx.x] + c, epoch, p.timeout_ns)) {
    ipc::report_timeout(p.error, ipc::kReduceRows, threadIdx.x, epoch);
    failed = 1;
  }
  return __syncthreads_or(failed) == 0;
}

// One unit of work: kVec ? 16 bytes (kPack elements) : one element, summed over ranks.
template <typename T, bool kVec>
__device__ void reduce_unit(const RowPeers& p, std::size_t src, T* dst) {
  if constexpr (kVec) {
    *reinterpret_cast<uint4*>(dst) = ipc::reduce_pack<T, ipc::Sum, false>(p.data, p.size, src);
  } else {
    *dst = ipc::reduce_element<T, ipc::Sum, false>(p.data, p.size, src);
  }
}

// Every block walks the chunks in row order (the order the producer GEMM finishes them),
// waits for the chunk on every rank, then reduces its grid-strided share of the chunk.
template <typename T, bool kVec>
__global__ void reduce_rows_kernel(RowPeers p, T* out, std::size_t out_stride, std::size_t row_begin,
                                   std::size_t row_end, std::size_t cols, std::size_t rows_per_chunk,
                                   std::uint32_t epoch) {
  constexpr std::size_t kUnit = kVec ? ipc::kPack<T> : 1;
  const std::size_t width = cols / kUnit;  // units per row
  const std::size_t step = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t c = row_begin / rows_per_chunk; c * rows_per_chunk < row_end; ++c) {
    if (!await_chunk(p, c, epoch)) return;
    const std::size_t lo = max(row_begin, c * rows_per_chunk);
    const std::size_t hi = min(row_end, (c + 1) * rows_per_chunk);
    for (std::size_t u = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < (hi - lo) * width;
         u += step) {
      const std::size_t row = lo + u / width;
      const std::size_t col = (u % width) * kUnit;
      reduce_unit<T, kVec>(p, (row * cols + col) * sizeof(T), out + (row - row_begin) * out_stride + col);
    }
  }
}

template <typename T>
void launch_rows(const RowPeers& p, char* out, std::size_t out_stride, std::size_t row_begin, std::size_t row_end,
                 std::size_t cols, std::size_t rows_per_chunk, std::uint32_t epoch, int blocks, cudaStream_t s) {
  T* o = reinterpret_cast<T*>(out);
  const bool vec = cols % ipc::kPack<T> == 0 && out_stride % ipc::kPack<T> == 0 &&
                   reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  if (vec) {
    reduce_rows_kernel<T, true><<<blocks, kThreads, 0, s>>>(p, o, out_stride, row_begin, row_end, cols,
                                                             rows_per_chunk, epoch);
  } else {
    reduce_rows_kernel<T, false><<<blocks, kThreads, 0, s>>>(p, o, out_stride, row_begin, row_end, cols,
                                                              rows_per_chunk, epoch);
  }
  cuda_check(cudaGetLastError(), "reduce_rows launch");
}

}  // namespace

struct SymmetricBuffer::Impl {
  std::size_t data_bytes = 0;
  std::unique_ptr<PeerMemory> memory;  // this rank's buffer, the peers' mapped, the error record
  std::string broken;

  int rank() const { return memory->rank; }
  int size() const { return memory->size; }
  std::uint32_t* flags(int r) const { return reinterpret_cast<std::uint32_t*>(memory->base(r)); }
  char* data(int r) const { return memory->base(r) + kFlagBytes; }

  void usable(const char* op) const {
    if (!memory->opened()) throw std::runtime_error(std::string(op) + ": call open() with every rank's handle first");
    if (!broken.empty()) throw std::runtime_error(std::string(op) + " on an unusable symmetric buffer: " + broken);
  }

  void check_flag(int r, int index, const char* op) const {
    if (r < 0 || r >= size() || index < 0 || index >= kSymmetricFlags) {
      throw std::invalid_argument(std::string(op) + ": rank " + std::to_string(r) + " or flag " +
                                  std::to_string(index) + " out of range (ranks < " + std::to_string(size()) +
                                  ", flags < " + std::to_string(kSymmetricFlags) + ")");
    }
  }
};

SymmetricBuffer::SymmetricBuffer(int rank, int size, int device, std::size_t data_bytes)
    : impl_(std::make_unique<Impl>()) {
  impl_->data_bytes = (data_bytes + 4095) / 4096 * 4096;
  impl_->memory = std::make_unique<PeerMemory>(rank, size, device, kFlagBytes + impl_->data_bytes, kFlagBytes,
                                               "symmetric buffer");
}

SymmetricBuffer::~SymmetricBuffer() = default;  // ~PeerMemory synchronizes, unmaps the peers, frees

std::string SymmetricBuffer::handle() const { return impl_->memory->handle(); }

void SymmetricBuffer::open(const std::vector<std::string>& handles) { impl_->memory->open(handles); }

std::uintptr_t SymmetricBuffer::flag_address(int rank, int index) const {
  impl_->usable("flag_address");
  impl_->check_flag(rank, index, "flag_address");
  return reinterpret_cast<std::uintptr_t>(impl_->flags(rank) + index);
}

std::uintptr_t SymmetricBuffer::data_address(int rank) const {
  impl_->usable("data_address");
  impl_->check_flag(rank, 0, "data_address");
  return reinterpret_cast<std::uintptr_t>(impl_->data(rank));
}

void SymmetricBuffer::set_flag(int rank, int index, std::uint32_t value, std::uintptr_t stream) {
  auto* flag = reinterpret_cast<std::uint32_t*>(flag_address(rank, index));
  DeviceGuard guard(impl_->memory->device);
  ipc::launch_set_flag(flag, value, as_stream(stream));
}

void SymmetricBuffer::wait_flag(int rank, int index, std::uint32_t value, std::uintptr_t stream, double timeout_s) {
  const auto* flag = reinterpret_cast<const std::uint32_t*>(flag_address(rank, index));
  DeviceGuard guard(impl_->memory->device);
  // The record's peer field carries which flag: index * kIpcMaxRanks + rank (decoded by check()).
  ipc::launch_wait_flag(flag, value, impl_->memory->error_device(), ipc::kWaitFlag,
                        static_cast<unsigned int>(index * kIpcMaxRanks + rank),
                        static_cast<unsigned long long>(timeout_s * 1e9), as_stream(stream));
}

void SymmetricBuffer::reduce_rows(std::uintptr_t out, std::size_t out_stride, int dtype, std::size_t row_begin,
                                  std::size_t row_end, std::size_t cols, std::size_t rows_per_chunk, int first_flag,
                                  std::uint32_t epoch, int blocks, std::uintptr_t stream, double timeout_s) {
  Impl& m = *impl_;
  m.usable("reduce_rows");
  const std::size_t es = dtype_bytes(dtype);
  if (row_begin >= row_end || cols == 0) return;
  if (rows_per_chunk == 0 || blocks < 1) throw std::invalid_argument("reduce_rows: rows_per_chunk and blocks must be positive");
  const std::size_t last_chunk = (row_end - 1) / rows_per_chunk;
  m.check_flag(m.rank(), first_flag, "reduce_rows");
  m.check_flag(m.rank(), static_cast<int>(first_flag + last_chunk), "reduce_rows (last chunk's flag)");
  if (row_end * cols * es > m.data_bytes) {
    throw std::invalid_argument("reduce_rows: " + std::to_string(row_end) + " rows of " + std::to_string(cols) +
                                " elements exceed the data area (" + std::to_string(m.data_bytes) + " bytes)");
  }
  RowPeers p{};
  for (int r = 0; r < m.size(); ++r) {
    p.data[r] = m.data(r);
    p.flags[r] = m.flags(r) + first_flag;
  }
  p.error = m.memory->error_device();
  p.size = m.size();
  p.timeout_ns = static_cast<unsigned long long>(timeout_s * 1e9);
  DeviceGuard guard(m.memory->device);
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case 0: return launch_rows<float>(p, as_ptr(out), out_stride, row_begin, row_end, cols, rows_per_chunk, epoch, blocks, s);
    case 1: return launch_rows<__half>(p, as_ptr(out), out_stride, row_begin, row_end, cols, rows_per_chunk, epoch, blocks, s);
    default:
      return launch_rows<__nv_bfloat16>(p, as_ptr(out), out_stride, row_begin, row_end, cols, rows_per_chunk, epoch,
                                        blocks, s);
  }
}

void SymmetricBuffer::check() {
  const std::optional<ipc::ErrorRecord> record = impl_->memory->take_timeout();
  if (!record) return;
  // A wait_flag record's peer field is index * kIpcMaxRanks + rank (see wait_flag).
  const std::string what =
      record->op == ipc::kReduceRows
          ? "reduce_rows timed out on the GPU waiting for group rank " + std::to_string(record->peer) +
                " to publish round " + std::to_string(record->value)
          : "wait_flag timed out on the GPU: flag " + std::to_string(record->peer / kIpcMaxRanks) +
                " of group rank " + std::to_string(record->peer % kIpcMaxRanks) + " never reached " +
                std::to_string(record->value);
  impl_->broken = "it timed out earlier: " + what;
  throw IpcTimeout(what);
}

int SymmetricBuffer::rank() const { return impl_->rank(); }
int SymmetricBuffer::size() const { return impl_->size(); }
std::size_t SymmetricBuffer::data_bytes() const { return impl_->data_bytes; }

}  // namespace plait::cuda
