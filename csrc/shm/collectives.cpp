// all_reduce, all_gather, reduce_scatter and broadcast over a Group's collective slots
// (algorithms and the slot-reuse rule are described in group.h).
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "shm/errors.h"
#include "shm/group_impl.h"
#include "shm/reduce.h"

namespace plait::shm {
namespace {

// Calls fn(tensor_offset, range_offset, length) for each contiguous run of elements
// [begin, end) of block `block` of a tensor laid out as [outer][blocks][inner].
template <typename Fn>
void for_each_run(std::size_t inner, int blocks, int block, std::size_t begin, std::size_t end, Fn fn) {
  for (std::size_t e = begin; e < end;) {
    const std::size_t row = e / inner;
    const std::size_t col = e % inner;
    const std::size_t take = std::min(inner - col, end - e);
    fn((row * blocks + block) * inner + col, e - begin, take);
    e += take;
  }
}

bool is_float(DType dtype) { return dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16 || dtype == DType::f64; }

void check_reducible(DType dtype, ReduceOp op) {
  if (op == ReduceOp::avg && !is_float(dtype)) {
    throw std::invalid_argument(std::string("reduce op avg needs a floating-point dtype, not ") + dtype_name(dtype));
  }
}

}  // namespace

void Group::all_reduce(void* data, std::size_t count, DType dtype, ReduceOp op_kind, double timeout_s) {
  check_reducible(dtype, op_kind);
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("all_reduce", timeout_s);
  check_usable(op);
  if (size_ == 1 || count == 0) return;  // avg over one rank divides by 1
  if (count * dtype_size(dtype) <= oneshot_bytes_) {
    one_shot(static_cast<char*>(data), count, dtype, op_kind, op);
  } else {
    two_shot(static_cast<char*>(data), count, dtype, op_kind, op);
  }
}

// Every rank publishes its whole input, then reduces all inputs (its own from its tensor).
void Group::one_shot(char* data, std::size_t count, DType dtype, ReduceOp op_kind, Op& op) {
  const int parity = next_parity();
  std::memcpy(slot(rank_, parity), data, count * dtype_size(dtype));
  arrive_and_wait(op);
  const void* srcs[kMaxRanks];
  for (int j = 0; j < size_; ++j) srcs[j] = j == rank_ ? data : slot(j, parity);
  reduce(simd_, dtype, op_kind, ReduceArgs{data, nullptr, srcs, size_, count});
}

// Per chunk: publish every slice but our own; reduce our slice (into the tensor and our
// slot); barrier; copy the other ranks' reduced slices from their slots.
void Group::two_shot(char* data, std::size_t count, DType dtype, ReduceOp op_kind, Op& op) {
  const std::size_t es = dtype_size(dtype);
  const std::size_t chunk_elems = layout_.slot_bytes / es;
  op.chunks = ceil_div(count, chunk_elems);
  const void* srcs[kMaxRanks];
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t c0 = op.chunk * chunk_elems;
    const std::size_t len = std::min(chunk_elems, count - c0);
    // Slice j of the chunk is [begin(j), end(j)): equal, 32-element aligned, the last ones shorter.
    const std::size_t slice = ceil_div(ceil_div(len, size_), 32) * 32;
    auto begin = [&](int j) { return std::min(len, j * slice); };
    auto end = [&](int j) { return std::min(len, (j + 1) * slice); };
    char* chunk = data + c0 * es;
    const int parity = next_parity();
    char* mine = slot(rank_, parity);
    std::memcpy(mine, chunk, begin(rank_) * es);
    std::memcpy(mine + end(rank_) * es, chunk + end(rank_) * es, (len - end(rank_)) * es);
    arrive_and_wait(op);
    const std::size_t b = begin(rank_);
    for (int j = 0; j < size_; ++j) srcs[j] = j == rank_ ? chunk + b * es : slot(j, parity) + b * es;
    reduce(simd_, dtype, op_kind, ReduceArgs{chunk + b * es, mine + b * es, srcs, size_, end(rank_) - b});
    arrive_and_wait(op);
    for (int j = 0; j < size_; ++j) {
      if (j != rank_) std::memcpy(chunk + begin(j) * es, slot(j, parity) + begin(j) * es, (end(j) - begin(j)) * es);
    }
  }
}

void Group::all_gather(const void* in, void* out, std::size_t bytes_per_rank, std::size_t outer, double timeout_s) {
  if (outer == 0 || bytes_per_rank % outer) {
    throw std::invalid_argument("all_gather: " + std::to_string(bytes_per_rank) + " bytes per rank do not split into " +
                                std::to_string(outer) + " rows");
  }
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("all_gather", timeout_s);
  check_usable(op);
  if (bytes_per_rank == 0) return;
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  const std::size_t inner = bytes_per_rank / outer;
  op.chunks = ceil_div(bytes_per_rank, layout_.slot_bytes);
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t b0 = op.chunk * layout_.slot_bytes;
    const std::size_t b1 = std::min(bytes_per_rank, b0 + layout_.slot_bytes);
    const int parity = next_parity();
    if (size_ > 1) {
      std::memcpy(slot(rank_, parity), src + b0, b1 - b0);
      arrive_and_wait(op);
    }
    for (int j = 0; j < size_; ++j) {
      const char* from = j == rank_ ? src + b0 : slot(j, parity);
      for_each_run(inner, size_, j, b0, b1, [&](std::size_t at, std::size_t off, std::size_t n) {
        std::memcpy(dst + at, from + off, n);
      });
    }
  }
}

// Per chunk of each block: publish the chunk of every block but our own, barrier, reduce
// our block's chunk from our input and the other ranks' slots.
void Group::reduce_scatter(const void* in, void* out, std::size_t count_per_rank, std::size_t outer, DType dtype,
                           ReduceOp op_kind, double timeout_s) {
  check_reducible(dtype, op_kind);
  if (outer == 0 || count_per_rank % outer) {
    throw std::invalid_argument("reduce_scatter: " + std::to_string(count_per_rank) +
                                " elements per rank do not split into " + std::to_string(outer) + " rows");
  }
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("reduce_scatter", timeout_s);
  check_usable(op);
  if (count_per_rank == 0) return;
  const std::size_t es = dtype_size(dtype);
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  const std::size_t inner = count_per_rank / outer;
  const std::size_t chunk_elems = layout_.slot_bytes / (es * size_);
  op.chunks = ceil_div(count_per_rank, chunk_elems);
  const void* srcs[kMaxRanks];
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t e0 = op.chunk * chunk_elems;
    const std::size_t e1 = std::min(count_per_rank, e0 + chunk_elems);
    const std::size_t len = e1 - e0;
    const int parity = next_parity();
    char* mine = slot(rank_, parity);
    for (int b = 0; b < size_; ++b) {
      if (b == rank_) continue;
      for_each_run(inner, size_, b, e0, e1, [&](std::size_t at, std::size_t off, std::size_t n) {
        std::memcpy(mine + (b * len + off) * es, src + at * es, n * es);
      });
    }
    if (size_ > 1) arrive_and_wait(op);
    for_each_run(inner, size_, rank_, e0, e1, [&](std::size_t at, std::size_t off, std::size_t n) {
      for (int j = 0; j < size_; ++j) {
        srcs[j] = j == rank_ ? src + at * es : slot(j, parity) + (rank_ * len + off) * es;
      }
      reduce(simd_, dtype, op_kind, ReduceArgs{dst + (e0 + off) * es, nullptr, srcs, size_, n});
    });
  }
}

void Group::broadcast(void* data, std::size_t bytes, int src, double timeout_s) {
  if (src < 0 || src >= size_) {
    throw std::invalid_argument("broadcast: src " + std::to_string(src) + " is not a rank of this group of " +
                                std::to_string(size_));
  }
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("broadcast", timeout_s);
  check_usable(op);
  if (size_ == 1 || bytes == 0) return;
  auto* buf = static_cast<char*>(data);
  op.chunks = ceil_div(bytes, layout_.slot_bytes);
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t b0 = op.chunk * layout_.slot_bytes;
    const std::size_t n = std::min(bytes - b0, layout_.slot_bytes);
    const int parity = next_parity();
    if (rank_ == src) std::memcpy(slot(src, parity), buf + b0, n);
    arrive_and_wait(op);
    if (rank_ != src) std::memcpy(buf + b0, slot(src, parity), n);
  }
}

}  // namespace plait::shm
