// Names, sizes and checked code conversions for the enums in types.h.
#include "shm/types.h"

#include <stdexcept>

#include "shm/reduce.h"

namespace plait::shm {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::f64: return 8;
    case DType::i32: return 4;
    case DType::i64: return 8;
  }
  throw std::invalid_argument("unknown dtype");
}

const char* dtype_name(DType dtype) {
  static const char* const names[kNumDTypes] = {"float32", "float16", "bfloat16", "float64", "int32", "int64"};
  return names[static_cast<int>(dtype)];
}

const char* op_name(ReduceOp op) {
  static const char* const names[kNumReduceOps] = {"sum", "max", "min", "avg"};
  return names[static_cast<int>(op)];
}

const char* simd_name(Simd simd) {
  switch (simd) {
    case Simd::scalar: return "scalar";
    case Simd::avx2: return "avx2";
    case Simd::avx512: return "avx512";
  }
  return "unknown";
}

DType dtype_from_code(int code) {
  if (code < 0 || code >= kNumDTypes) {
    throw std::invalid_argument("dtype code " + std::to_string(code) + " is not a reducible dtype");
  }
  return static_cast<DType>(code);
}

ReduceOp op_from_code(int code) {
  if (code < 0 || code >= kNumReduceOps) {
    throw std::invalid_argument("reduce op code " + std::to_string(code) + " is not one of sum, max, min, avg");
  }
  return static_cast<ReduceOp>(code);
}

Simd simd_from_name(const std::string& name) {
  if (name.empty() || name == "auto") return best_simd();
  Simd wanted;
  if (name == "scalar") {
    wanted = Simd::scalar;
  } else if (name == "avx2") {
    wanted = Simd::avx2;
  } else if (name == "avx512") {
    wanted = Simd::avx512;
  } else {
    throw std::invalid_argument("unknown SIMD level '" + name + "'; use auto, scalar, avx2 or avx512");
  }
  if (!simd_supported(wanted)) {
    throw std::invalid_argument(std::string("SIMD level '") + name + "' is not supported by this CPU (best: " +
                                simd_name(best_simd()) + ")");
  }
  return wanted;
}

}  // namespace plait::shm
