// The portable reduction path: plain C++ for every dtype. It is the reference the vector
// paths must match bit for bit, and it finishes their tails (the last few elements).
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "shm/half.h"
#include "shm/reduce.h"

namespace plait::shm::detail {
namespace {

// Storage type <-> accumulator type for each dtype.
struct F32 {
  using Store = float;
  using Acc = float;
  static Acc load(Store v) { return v; }
  static Store store(Acc v) { return v; }
};
struct F16 {
  using Store = std::uint16_t;
  using Acc = float;
  static Acc load(Store v) { return half::f16_to_f32(v); }
  static Store store(Acc v) { return half::f32_to_f16(v); }
};
struct BF16 {
  using Store = std::uint16_t;
  using Acc = float;
  static Acc load(Store v) { return half::bf16_to_f32(v); }
  static Store store(Acc v) { return half::f32_to_bf16(v); }
};
template <typename T>
struct Same {
  using Store = T;
  using Acc = T;
  static Acc load(Store v) { return v; }
  static Store store(Acc v) { return v; }
};

// max/min written as the x86 max/min instructions compute them (acc > x ? acc : x,
// which picks x on ties and on a NaN x), then NaN in acc kept: so NaN propagates and
// the result is bitwise what the vector paths give.
template <typename A>
bool is_nan(A v) { return v != v; }

// Integers wrap around on overflow (as PyTorch's do), computed unsigned to stay defined.
struct Sum {
  template <typename A>
  static A apply(A acc, A x) {
    if constexpr (std::is_integral_v<A>) {
      using U = std::make_unsigned_t<A>;
      return static_cast<A>(static_cast<U>(acc) + static_cast<U>(x));
    } else {
      return acc + x;
    }
  }
};
struct Max {
  template <typename A>
  static A apply(A acc, A x) { return is_nan(acc) ? acc : (acc > x ? acc : x); }
};
struct Min {
  template <typename A>
  static A apply(A acc, A x) { return is_nan(acc) ? acc : (acc < x ? acc : x); }
};

template <typename T, typename Op>
void run(const ReduceArgs& a, bool average) {
  using Store = typename T::Store;
  using Acc = typename T::Acc;
  auto* out = static_cast<Store*>(a.out);
  auto* out2 = static_cast<Store*>(a.out2);
  const Acc divisor = static_cast<Acc>(a.nsrc);
  for (std::size_t i = 0; i < a.count; ++i) {
    Acc acc = T::load(static_cast<const Store*>(a.srcs[0])[i]);
    for (int j = 1; j < a.nsrc; ++j) acc = Op::apply(acc, T::load(static_cast<const Store*>(a.srcs[j])[i]));
    if (average) acc = acc / divisor;
    const Store value = T::store(acc);
    out[i] = value;
    if (out2 != nullptr) out2[i] = value;
  }
}

template <typename T>
void run_op(ReduceOp op, const ReduceArgs& a) {
  switch (op) {
    case ReduceOp::sum: return run<T, Sum>(a, false);
    case ReduceOp::avg: return run<T, Sum>(a, true);
    case ReduceOp::max: return run<T, Max>(a, false);
    case ReduceOp::min: return run<T, Min>(a, false);
  }
}

}  // namespace

void reduce_scalar(DType dtype, ReduceOp op, const ReduceArgs& args) {
  switch (dtype) {
    case DType::f32: return run_op<F32>(op, args);
    case DType::f16: return run_op<F16>(op, args);
    case DType::bf16: return run_op<BF16>(op, args);
    case DType::f64: return run_op<Same<double>>(op, args);
    case DType::i32:
      if (op == ReduceOp::avg) break;
      return run_op<Same<std::int32_t>>(op, args);
    case DType::i64:
      if (op == ReduceOp::avg) break;
      return run_op<Same<std::int64_t>>(op, args);
  }
  throw std::invalid_argument(std::string("reduce op avg needs a floating-point dtype, not ") + dtype_name(dtype));
}

}  // namespace plait::shm::detail
