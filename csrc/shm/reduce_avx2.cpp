// The AVX2 reduction path (with F16C for fp16 and FMA-era integer ops for bf16): 8 fp32
// lanes per vector, two vectors per iteration. Every function here carries the target
// attribute, so the rest of the extension stays baseline x86-64; reduce.cpp calls in only
// after checking the CPU at run time. Tails go to the scalar path, which rounds the same.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstdint>

#include "shm/reduce.h"

#define PLAIT_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace plait::shm::detail {
namespace {

struct F32 {
  static constexpr std::size_t kSize = 4;
  PLAIT_AVX2 static __m256 load(const void* p, std::size_t i) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
  PLAIT_AVX2 static void store(void* p, std::size_t i, __m256 v) { _mm256_storeu_ps(static_cast<float*>(p) + i, v); }
};

struct F16 {
  static constexpr std::size_t kSize = 2;
  PLAIT_AVX2 static __m256 load(const void* p, std::size_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(p) + i)));
  }
  PLAIT_AVX2 static void store(void* p, std::size_t i, __m256 v) {
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(p) + i), h);
  }
};

struct BF16 {
  static constexpr std::size_t kSize = 2;
  PLAIT_AVX2 static __m256 load(const void* p, std::size_t i) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const std::uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Round to nearest even (add 0x7FFF plus the lowest kept bit), NaN -> 0x7FC0.
  PLAIT_AVX2 static void store(void* p, std::size_t i, __m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i chosen = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan);
    const __m256i high = _mm256_srli_epi32(chosen, 16);              // 8 x u32, each <= 0xFFFF
    const __m256i packed = _mm256_packus_epi32(high, high);          // per 128-bit lane: [a0..a3 a0..a3]
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);  // 64-bit lanes 0 and 2 first
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<std::uint16_t*>(p) + i),
                     _mm256_castsi256_si128(ordered));
  }
};

struct Sum {
  PLAIT_AVX2 static __m256 apply(__m256 acc, __m256 x) { return _mm256_add_ps(acc, x); }
};
// maxps(acc, x) = acc > x ? acc : x; then keep a NaN acc (see reduce_scalar.cpp).
struct Max {
  PLAIT_AVX2 static __m256 apply(__m256 acc, __m256 x) {
    return _mm256_blendv_ps(_mm256_max_ps(acc, x), acc, _mm256_cmp_ps(acc, acc, _CMP_UNORD_Q));
  }
};
struct Min {
  PLAIT_AVX2 static __m256 apply(__m256 acc, __m256 x) {
    return _mm256_blendv_ps(_mm256_min_ps(acc, x), acc, _mm256_cmp_ps(acc, acc, _CMP_UNORD_Q));
  }
};

template <typename T, typename Op>
PLAIT_AVX2 void run(DType dtype, ReduceOp op, const ReduceArgs& a) {
  const bool average = op == ReduceOp::avg;
  const __m256 divisor = _mm256_set1_ps(static_cast<float>(a.nsrc));
  std::size_t i = 0;
  for (; i + 16 <= a.count; i += 16) {
    __m256 lo = T::load(a.srcs[0], i);
    __m256 hi = T::load(a.srcs[0], i + 8);
    for (int j = 1; j < a.nsrc; ++j) {
      lo = Op::apply(lo, T::load(a.srcs[j], i));
      hi = Op::apply(hi, T::load(a.srcs[j], i + 8));
    }
    if (average) {
      lo = _mm256_div_ps(lo, divisor);
      hi = _mm256_div_ps(hi, divisor);
    }
    T::store(a.out, i, lo);
    T::store(a.out, i + 8, hi);
    if (a.out2 != nullptr) {
      T::store(a.out2, i, lo);
      T::store(a.out2, i + 8, hi);
    }
  }
  if (i == a.count) return;
  const void* tails[kMaxSources];  // the source pointers moved to the tail
  for (int j = 0; j < a.nsrc; ++j) tails[j] = static_cast<const char*>(a.srcs[j]) + i * T::kSize;
  const ReduceArgs rest{static_cast<char*>(a.out) + i * T::kSize,
                        a.out2 ? static_cast<char*>(a.out2) + i * T::kSize : nullptr, tails, a.nsrc,
                        a.count - i};
  reduce_scalar(dtype, op, rest);
}

template <typename T>
PLAIT_AVX2 void run_op(DType dtype, ReduceOp op, const ReduceArgs& a) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg: return run<T, Sum>(dtype, op, a);
    case ReduceOp::max: return run<T, Max>(dtype, op, a);
    case ReduceOp::min: return run<T, Min>(dtype, op, a);
  }
}

}  // namespace

PLAIT_AVX2 bool reduce_avx2(DType dtype, ReduceOp op, const ReduceArgs& args) {
  switch (dtype) {
    case DType::f32: run_op<F32>(dtype, op, args); return true;
    case DType::f16: run_op<F16>(dtype, op, args); return true;
    case DType::bf16: run_op<BF16>(dtype, op, args); return true;
    default: return false;
  }
}

}  // namespace plait::shm::detail

#else  // not x86: no AVX2 path

#include "shm/reduce.h"

namespace plait::shm::detail {
bool reduce_avx2(DType, ReduceOp, const ReduceArgs&) { return false; }
}  // namespace plait::shm::detail

#endif
