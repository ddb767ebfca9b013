// Run-time dispatch of reductions to the best (or the requested) SIMD level.
#include "shm/reduce.h"

#include <stdexcept>
#include <string>

namespace plait::shm {

bool simd_supported(Simd simd) {
  switch (simd) {
    case Simd::scalar: return true;
#if defined(__x86_64__) || defined(__i386__)
    case Simd::avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#if defined(__x86_64__)
    case Simd::avx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && simd_supported(Simd::avx2);
#endif
    default: return false;
  }
}

Simd best_simd() {
  static const Simd best = simd_supported(Simd::avx512) ? Simd::avx512
                           : simd_supported(Simd::avx2) ? Simd::avx2
                                                        : Simd::scalar;
  return best;
}

void reduce(Simd simd, DType dtype, ReduceOp op, const ReduceArgs& args) {
  if (args.nsrc < 1 || args.nsrc > kMaxSources) {
    throw std::invalid_argument("reduce: " + std::to_string(args.nsrc) + " sources; need 1.." +
                                std::to_string(kMaxSources));
  }
  if (args.count == 0) return;
  if (simd == Simd::avx512 && detail::reduce_avx512(dtype, op, args)) return;
  if (simd == Simd::avx2 && detail::reduce_avx2(dtype, op, args)) return;
  detail::reduce_scalar(dtype, op, args);
}

}  // namespace plait::shm
