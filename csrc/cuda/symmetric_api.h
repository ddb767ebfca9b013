// SymmetricBuffer: one device allocation per rank of a group on one node, mapped by every
// peer over CUDA IPC, for plait's fused GEMM + communication overlap
// (python/plait/tp/fused.py). Declared without CUDA types so bindings.cpp can use it.
//
// Each buffer is a flag area of kSymmetricFlags uint32 flags (zeroed at creation) followed
// by `data_bytes` of data. A GEMM writes its output into its own data area and publishes
// per-chunk flags (a Triton kernel stores them through flag_address); the operations here
// wait for peers' flags, set flags in peers' buffers, and reduce rows across every rank's
// data area chunk by chunk as soon as every rank has published the chunk. Waits run on the
// GPU, are bounded by a timeout measured with the global timer and, when it runs out,
// record what they waited for; check() turns the record into IpcTimeout (ipc_api.h).
//
// symmetric.cu implements this when plait._C is built with CUDA; ipc_disabled.cpp
// otherwise (every constructor call throws, saying how to rebuild).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/ipc_api.h"

namespace plait::cuda {

constexpr int kSymmetricFlags = 4096;

class SymmetricBuffer {
 public:
  // Allocates this rank's flag area and data_bytes of data on `device`.
  SymmetricBuffer(int rank, int size, int device, std::size_t data_bytes);
  ~SymmetricBuffer();
  SymmetricBuffer(const SymmetricBuffer&) = delete;
  SymmetricBuffer& operator=(const SymmetricBuffer&) = delete;

  // This rank's cudaIpcMemHandle_t, as raw bytes; open() maps every peer's (index = rank).
  std::string handle() const;
  void open(const std::vector<std::string>& handles);

  // Device addresses, valid in this process, of flag `index` / the data area of `rank`.
  std::uintptr_t flag_address(int rank, int index) const;
  std::uintptr_t data_address(int rank) const;

  // Enqueue on `stream`: flag `index` of `rank` = value (release, system scope), after a
  // system fence covering everything before it on the stream.
  void set_flag(int rank, int index, std::uint32_t value, std::uintptr_t stream);
  // Enqueue on `stream`: wait until flag `index` of `rank` reaches value (wrapping compare).
  void wait_flag(int rank, int index, std::uint32_t value, std::uintptr_t stream, double timeout_s);

  // Enqueue on `stream`, with `blocks` thread blocks: for the rows [row_begin, row_end) of
  // a [rows, cols] row-major matrix held in every rank's data area, chunk by chunk in row
  // order (chunk c = rows [c * rows_per_chunk, (c + 1) * rows_per_chunk)): wait until flag
  // first_flag + c of every rank reaches epoch, then write the rank-order fp32 sum of the
  // chunk's rows to out (row r at out + (r - row_begin) * out_stride elements). dtype codes:
  // 0 float32, 1 float16, 2 bfloat16. Every rank gets bitwise the same sums.
  void reduce_rows(std::uintptr_t out, std::size_t out_stride, int dtype, std::size_t row_begin,
                   std::size_t row_end, std::size_t cols, std::size_t rows_per_chunk, int first_flag,
                   std::uint32_t epoch, int blocks, std::uintptr_t stream, double timeout_s);

  // Throws IpcTimeout for the first wait that timed out since the last check (the buffer is
  // unusable afterwards). Does not synchronize: call it after the stream finished.
  void check();

  int rank() const;
  int size() const;
  std::size_t data_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace plait::cuda
