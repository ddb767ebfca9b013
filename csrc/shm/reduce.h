// Element-wise reductions of several source arrays into one, the arithmetic core of
// all_reduce and reduce_scatter.
//
// out[i] = op(srcs[0][i], srcs[1][i], ..., srcs[n-1][i]), applied left to right in
// source order. fp16 and bf16 accumulate in fp32 and round once at the end; avg divides
// the accumulated sum by n before that rounding. Every SIMD level computes bitwise the
// same result (same order, same rounding), so the level is a speed choice only.
// Pointers may have any alignment, and out may alias srcs (element i is read before it
// is written).
#pragma once

#include <cstddef>

#include "shm/types.h"

namespace plait::shm {

// The most sources one reduction takes (one per rank of a group).
constexpr int kMaxSources = 256;

struct ReduceArgs {
  void* out;                // result, count elements
  void* out2;               // optional second copy of the result (nullptr: none)
  const void* const* srcs;  // nsrc source arrays of count elements
  int nsrc;                 // 1 .. kMaxSources
  std::size_t count;
};

// Runs the reduction with the given SIMD level (which must be supported, see below).
void reduce(Simd simd, DType dtype, ReduceOp op, const ReduceArgs& args);

// Whether this CPU can run `simd`, and the best level it can run.
bool simd_supported(Simd simd);
Simd best_simd();

namespace detail {
// One implementation per SIMD level (reduce_scalar.cpp, reduce_avx2.cpp, reduce_avx512.cpp).
// The vector ones handle fp32, fp16 and bf16 and return false for other dtypes.
void reduce_scalar(DType dtype, ReduceOp op, const ReduceArgs& args);
bool reduce_avx2(DType dtype, ReduceOp op, const ReduceArgs& args);
bool reduce_avx512(DType dtype, ReduceOp op, const ReduceArgs& args);
}  // namespace detail

}  // namespace plait::shm
