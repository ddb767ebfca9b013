// Plain value types shared by the shared-memory collectives: element types, reduce
// operations and SIMD levels, each with a stable integer code that Python passes in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace plait::shm {

// Element types the reductions understand. Copy-only operations (all_gather, broadcast,
// send/recv) take bytes and work for any dtype.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, i32 = 4, i64 = 5 };
constexpr int kNumDTypes = 6;

// sum, max, min, and avg (the sum divided by the number of ranks, in the accumulator type).
enum class ReduceOp : int { sum = 0, max = 1, min = 2, avg = 3 };
constexpr int kNumReduceOps = 4;

// Instruction sets a reduction can run with; chosen at run time from what the CPU has.
enum class Simd : int { scalar = 0, avx2 = 1, avx512 = 2 };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
const char* op_name(ReduceOp op);
const char* simd_name(Simd simd);

// Validating conversions from the integer codes Python passes (throw std::invalid_argument).
DType dtype_from_code(int code);
ReduceOp op_from_code(int code);
// "scalar", "avx2", "avx512", or "auto" (the best this CPU supports).
Simd simd_from_name(const std::string& name);

}  // namespace plait::shm
