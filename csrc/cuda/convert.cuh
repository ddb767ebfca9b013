// Element conversions shared by the IPC kernels: load a float32, float16 or bfloat16
// element (bypassing L1, since peers write it), widen it to fp32 for accumulation, and
// round the result back once (round to nearest even).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

}  // namespace plait::cuda::ipc
