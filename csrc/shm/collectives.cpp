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

bool is_float(DType dtype) {
  return dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16 || dtype == DType::f64;
}

std::uint32_t reduce_param(DType dtype, ReduceOp op) {
  return static_cast<std::uint32_t>(dtype) * 16 + static_cast<std::uint32_t>(op);
}

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
  if (size_ == 1) return;  // avg over one rank divides by 1
  const CallSig call{CallKind::all_reduce, reduce_param(dtype, op_kind), count, 1};
  if (count == 0) {
    arrive_and_check(next_slot(), call, op);  // nothing to move, but the ranks must agree on that
  } else if (count * std::max<std::size_t>(dtype_size(dtype), 4) <= oneshot_bytes_) {
    // 16-bit values count as 4 bytes: they are reduced in fp32, so one-shot's cost (every rank
    // reduces the whole message) follows the element count. bf16 at 64 KB: 10.6-11.2 us one-shot,
    // 8.2-8.5 us two-shot; fp32 at 64 KB: 8.4 against 8.8-9.4 (2 ranks).
    one_shot(static_cast<char*>(data), count, dtype, op_kind, call, op);
  } else {
    two_shot(static_cast<char*>(data), count, dtype, op_kind, call, op);
  }
}

// Every rank publishes its whole input, then reduces all inputs (its own from its tensor).
void Group::one_shot(char* data, std::size_t count, DType dtype, ReduceOp op_kind, const CallSig& call, Op& op) {
  const int index = next_slot();
  std::memcpy(slot(rank_, index), data, count * dtype_size(dtype));
  arrive_and_check(index, call, op);
  const void* srcs[kMaxRanks];
  for (int j = 0; j < size_; ++j) srcs[j] = j == rank_ ? data : slot(j, index);
  reduce(simd_, dtype, op_kind, ReduceArgs{data, nullptr, srcs, size_, count});
}

// Per chunk: publish every slice but our own (copy-in), reduce our slice from our tensor
// and the others' slots into the tensor and our slot, then copy the others' reduced
// slices (gather). Pipelined: chunk c+1's copy-in shares the barrier that publishes
// chunk c's reduced slices, so each chunk costs one barrier (see group.h for why three
// slots make that safe).
void Group::two_shot(char* data, std::size_t count, DType dtype, ReduceOp op_kind, const CallSig& call, Op& op) {
  const std::size_t es = dtype_size(dtype);
  const std::size_t chunk_elems = layout_.slot_bytes / es;
  op.chunks = ceil_div(count, chunk_elems);
  struct Chunk {
    char* data;         // the chunk in the tensor
    std::size_t len;    // elements
    std::size_t slice;  // slice length: equal, 32-element aligned, the last ones shorter
    int index;          // the slot it uses
    std::size_t begin(int j) const { return std::min(len, j * slice); }
    std::size_t end(int j) const { return std::min(len, (j + 1) * slice); }
  };
  auto chunk_at = [&](std::size_t c) {
    const std::size_t len = std::min(chunk_elems, count - c * chunk_elems);
    return Chunk{data + c * chunk_elems * es, len, ceil_div(ceil_div(len, size_), 32) * 32, next_slot()};
  };
  auto copy_in = [&](const Chunk& k) {
    char* mine = slot(rank_, k.index);
    std::memcpy(mine, k.data, k.begin(rank_) * es);
    std::memcpy(mine + k.end(rank_) * es, k.data + k.end(rank_) * es, (k.len - k.end(rank_)) * es);
  };
  const void* srcs[kMaxRanks];
  Chunk current = chunk_at(0);
  copy_in(current);
  arrive_and_check(current.index, call, op);
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t b = current.begin(rank_);
    char* mine = slot(rank_, current.index) + b * es;
    for (int j = 0; j < size_; ++j) srcs[j] = j == rank_ ? current.data + b * es : slot(j, current.index) + b * es;
    reduce(simd_, dtype, op_kind, ReduceArgs{current.data + b * es, mine, srcs, size_, current.end(rank_) - b});
    const bool more = op.chunk + 1 < op.chunks;
    Chunk next{};
    if (more) {
      next = chunk_at(op.chunk + 1);
      copy_in(next);
    }
    arrive_and_wait(op);
    for (int j = 0; j < size_; ++j) {
      if (j == rank_) continue;
      const std::size_t at = current.begin(j) * es;
      std::memcpy(current.data + at, slot(j, current.index) + at, (current.end(j) - current.begin(j)) * es);
    }
    if (more) current = next;
  }
}

void Group::all_gather(const void* in, void* out, std::size_t bytes_per_rank, std::size_t outer, double timeout_s) {
  if (bytes_per_rank == 0) outer = 1;  // an empty tensor's rows do not matter
  if (outer == 0 || bytes_per_rank % outer) {
    throw std::invalid_argument("all_gather: " + std::to_string(bytes_per_rank) + " bytes per rank do not split into " +
                                std::to_string(outer) + " rows");
  }
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("all_gather", timeout_s);
  check_usable(op);
  if (size_ == 1 && bytes_per_rank == 0) return;
  const CallSig call{CallKind::all_gather, 0, bytes_per_rank, outer};
  if (bytes_per_rank == 0) return arrive_and_check(next_slot(), call, op);
  const auto* src = static_cast<const char*>(in);
  auto* dst = static_cast<char*>(out);
  const std::size_t inner = bytes_per_rank / outer;
  op.chunks = ceil_div(bytes_per_rank, layout_.slot_bytes);
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t b0 = op.chunk * layout_.slot_bytes;
    const std::size_t b1 = std::min(bytes_per_rank, b0 + layout_.slot_bytes);
    const int index = next_slot();
    if (size_ > 1) {
      std::memcpy(slot(rank_, index), src + b0, b1 - b0);
      arrive_step(index, call, op);
    }
    for (int j = 0; j < size_; ++j) {
      const char* from = j == rank_ ? src + b0 : slot(j, index);
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
  if (count_per_rank == 0) outer = 1;  // an empty tensor's rows do not matter
  if (outer == 0 || count_per_rank % outer) {
    throw std::invalid_argument("reduce_scatter: " + std::to_string(count_per_rank) +
                                " elements per rank do not split into " + std::to_string(outer) + " rows");
  }
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("reduce_scatter", timeout_s);
  check_usable(op);
  const CallSig call{CallKind::reduce_scatter, reduce_param(dtype, op_kind), count_per_rank, outer};
  if (count_per_rank == 0) {
    if (size_ > 1) arrive_and_check(next_slot(), call, op);
    return;
  }
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
    const int index = next_slot();
    char* mine = slot(rank_, index);
    for (int b = 0; b < size_; ++b) {
      if (b == rank_) continue;
      for_each_run(inner, size_, b, e0, e1, [&](std::size_t at, std::size_t off, std::size_t n) {
        std::memcpy(mine + (b * len + off) * es, src + at * es, n * es);
      });
    }
    if (size_ > 1) arrive_step(index, call, op);
    for_each_run(inner, size_, rank_, e0, e1, [&](std::size_t at, std::size_t off, std::size_t n) {
      for (int j = 0; j < size_; ++j) {
        srcs[j] = j == rank_ ? src + at * es : slot(j, index) + (rank_ * len + off) * es;
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
  if (size_ == 1) return;
  const CallSig call{CallKind::broadcast, static_cast<std::uint32_t>(src), bytes, 1};
  if (bytes == 0) return arrive_and_check(next_slot(), call, op);
  auto* buf = static_cast<char*>(data);
  op.chunks = ceil_div(bytes, layout_.slot_bytes);
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    const std::size_t b0 = op.chunk * layout_.slot_bytes;
    const std::size_t n = std::min(bytes - b0, layout_.slot_bytes);
    const int index = next_slot();
    if (rank_ == src) std::memcpy(slot(src, index), buf + b0, n);
    arrive_step(index, call, op);
    if (rank_ != src) std::memcpy(buf + b0, slot(src, index), n);
  }
}

}  // namespace plait::shm
