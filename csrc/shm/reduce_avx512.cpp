// The AVX-512 reduction path: 16 fp32 lanes per vector, 32 values (two vectors) per iteration,
// the same arithmetic and rounding as reduce_avx2.cpp (see there). Compiled with a target
// attribute and entered only when the CPU reports AVX-512F and AVX-512BW at run time (every
// AVX-512 CPU since Skylake-SP has both; the 16-bit shuffles of the bf16 path need BW).
#if defined(__x86_64__)

// GCC 12's AVX-512 headers start some conversions from _mm512_undefined_*(), which
// -Wmaybe-uninitialized reports at every inlined use; the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <cstdint>

#include "shm/reduce.h"

#define PLAIT_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))

namespace plait::shm::detail {
namespace {

// Each type loads 32 values as two fp32 vectors and stores two back; which value lands in which
// lane is the type's choice, as long as store undoes load (the arithmetic is per value).
struct F32 {
  static constexpr std::size_t kSize = 4;
  PLAIT_AVX512 static void load(const void* p, std::size_t i, __m512& lo, __m512& hi) {
    lo = _mm512_loadu_ps(static_cast<const float*>(p) + i);
    hi = _mm512_loadu_ps(static_cast<const float*>(p) + i + 16);
  }
  PLAIT_AVX512 static void store(void* p, std::size_t i, __m512 lo, __m512 hi) {
    _mm512_storeu_ps(static_cast<float*>(p) + i, lo);
    _mm512_storeu_ps(static_cast<float*>(p) + i + 16, hi);
  }
};

struct F16 {
  static constexpr std::size_t kSize = 2;
  PLAIT_AVX512 static __m512 widen(const void* p, std::size_t i) {
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const std::uint16_t*>(p) + i)));
  }
  PLAIT_AVX512 static void narrow(void* p, std::size_t i, __m512 v) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<std::uint16_t*>(p) + i), h);
  }
  PLAIT_AVX512 static void load(const void* p, std::size_t i, __m512& lo, __m512& hi) {
    lo = widen(p, i);
    hi = widen(p, i + 16);
  }
  PLAIT_AVX512 static void store(void* p, std::size_t i, __m512 lo, __m512 hi) {
    narrow(p, i, lo);
    narrow(p, i + 16, hi);
  }
};

// bf16 from one 64-byte load: unpacking each 16-bit value into the high half of a zeroed 32-bit
// lane is the exact widening to fp32, and packing the rounded high halves back undoes the
// unpack's order (both work within 128-bit lanes).
struct BF16 {
  static constexpr std::size_t kSize = 2;
  PLAIT_AVX512 static void load(const void* p, std::size_t i, __m512& lo, __m512& hi) {
    const __m512i x = _mm512_loadu_si512(static_cast<const std::uint16_t*>(p) + i);
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), x));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), x));
  }
  // Round to nearest even, NaN -> 0x7FC0, as in reduce_avx2.cpp; the bf16 bits end in the low half.
  PLAIT_AVX512 static __m512i round(__m512 v) {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000)), 16);
  }
  PLAIT_AVX512 static void store(void* p, std::size_t i, __m512 lo, __m512 hi) {
    _mm512_storeu_si512(static_cast<std::uint16_t*>(p) + i, _mm512_packus_epi32(round(lo), round(hi)));
  }
};

struct Sum {
  PLAIT_AVX512 static __m512 apply(__m512 acc, __m512 x) { return _mm512_add_ps(acc, x); }
};
struct Max {
  PLAIT_AVX512 static __m512 apply(__m512 acc, __m512 x) {
    return _mm512_mask_mov_ps(_mm512_max_ps(acc, x), _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q), acc);
  }
};
struct Min {
  PLAIT_AVX512 static __m512 apply(__m512 acc, __m512 x) {
    return _mm512_mask_mov_ps(_mm512_min_ps(acc, x), _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q), acc);
  }
};

template <typename T, typename Op>
PLAIT_AVX512 void run(DType dtype, ReduceOp op, const ReduceArgs& a) {
  const bool average = op == ReduceOp::avg;
  const __m512 divisor = _mm512_set1_ps(static_cast<float>(a.nsrc));
  std::size_t i = 0;
  for (; i + 32 <= a.count; i += 32) {
    __m512 lo, hi, x_lo, x_hi;
    T::load(a.srcs[0], i, lo, hi);
    for (int j = 1; j < a.nsrc; ++j) {
      T::load(a.srcs[j], i, x_lo, x_hi);
      lo = Op::apply(lo, x_lo);
      hi = Op::apply(hi, x_hi);
    }
    if (average) {
      lo = _mm512_div_ps(lo, divisor);
      hi = _mm512_div_ps(hi, divisor);
    }
    T::store(a.out, i, lo, hi);
    if (a.out2 != nullptr) T::store(a.out2, i, lo, hi);
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
PLAIT_AVX512 void run_op(DType dtype, ReduceOp op, const ReduceArgs& a) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg: return run<T, Sum>(dtype, op, a);
    case ReduceOp::max: return run<T, Max>(dtype, op, a);
    case ReduceOp::min: return run<T, Min>(dtype, op, a);
  }
}

}  // namespace

PLAIT_AVX512 bool reduce_avx512(DType dtype, ReduceOp op, const ReduceArgs& args) {
  switch (dtype) {
    case DType::f32: run_op<F32>(dtype, op, args); return true;
    case DType::f16: run_op<F16>(dtype, op, args); return true;
    case DType::bf16: run_op<BF16>(dtype, op, args); return true;
    default: return false;
  }
}

}  // namespace plait::shm::detail

#else  // not x86-64: no AVX-512 path

#include "shm/reduce.h"

namespace plait::shm::detail {
bool reduce_avx512(DType, ReduceOp, const ReduceArgs&) { return false; }
}  // namespace plait::shm::detail

#endif
