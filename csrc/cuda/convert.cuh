// What the IPC reductions share: load a float32, float16 or bfloat16 element (bypassing
// L1, since peers write it), widen it to fp32, combine the ranks' values in rank order
// (sum, max, min), and round the result back once (round to nearest even), so every rank
// computes bitwise the same result.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

namespace plait::cuda::ipc {

// Elements in one 16-byte vector load.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  __device__ static float in(float v) { return v; }
  __device__ static float out(float v) { return v; }
  __device__ static float load(const char* p) { return __ldcg(reinterpret_cast<const float*>(p)); }
};
template <>
struct Conv<__half> {
  __device__ static float in(__half v) { return __half2float(v); }
  __device__ static __half out(float v) { return __float2half_rn(v); }
  __device__ static __half load(const char* p) {
    return __ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  }
};
template <>
struct Conv<__nv_bfloat16> {
  __device__ static float in(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 load(const char* p) {
    return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  }
};

// acc > x ? acc : x, keeping a NaN acc: the shm kernels' rule (csrc/shm/reduce_scalar.cpp).
struct Sum {
  __device__ static float apply(float acc, float x) { return acc + x; }
};
struct Max {
  __device__ static float apply(float acc, float x) { return acc != acc ? acc : (acc > x ? acc : x); }
};
struct Min {
  __device__ static float apply(float acc, float x) { return acc != acc ? acc : (acc < x ? acc : x); }
};

// The 16 bytes at byte offset `at` of data[0..n), combined over the ranks in order (avg: / n).
template <typename T, typename Op, bool kAvg>
__device__ uint4 reduce_pack(const char* const* data, int n, std::size_t at) {
  float acc[kPack<T>];
  for (int j = 0; j < n; ++j) {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(data[j] + at));
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kPack<T>; ++k) acc[k] = j == 0 ? Conv<T>::in(v[k]) : Op::apply(acc[k], Conv<T>::in(v[k]));
  }
  uint4 packed;
  T* r = reinterpret_cast<T*>(&packed);
#pragma unroll
  for (int k = 0; k < kPack<T>; ++k) r[k] = Conv<T>::out(kAvg ? acc[k] / static_cast<float>(n) : acc[k]);
  return packed;
}

// The element at byte offset `at` of data[0..n), combined the same way.
template <typename T, typename Op, bool kAvg>
__device__ T reduce_element(const char* const* data, int n, std::size_t at) {
  float acc = 0.f;
  for (int j = 0; j < n; ++j) {
    const float x = Conv<T>::in(Conv<T>::load(data[j] + at));
    acc = j == 0 ? x : Op::apply(acc, x);
  }
  return Conv<T>::out(kAvg ? acc / static_cast<float>(n) : acc);
}

}  // namespace plait::cuda::ipc
