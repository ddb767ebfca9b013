// The IPC kernels: one-shot and two-shot reductions over every rank's data area, the
// cross-rank barrier, and flag set / wait. Reductions add in rank order 0..n-1 in fp32
// and round once (round to nearest even), so every rank gets bitwise the same result,
// equal to the shared-memory backend's on CPU.
#include <stdexcept>
#include <string>

#include "cuda/convert.cuh"
#include "cuda/host_util.h"
#include "cuda/ipc_launch.h"

namespace plait::cuda::ipc {
namespace {

constexpr int kThreads = 512;


// Reduces packs [begin, end) (16 bytes each; element offset src_offset into every data
// area) into out. Pack q of the range goes to thread q mod (grid size), the same mapping
// on every rank, so block b's barrier covers exactly what block b wrote.
template <typename T, typename Op, bool kAvg>
__device__ void reduce_packs(const Peers& p, std::size_t src_offset, std::size_t begin, std::size_t end, char* out) {
  const bool aligned = (reinterpret_cast<std::uintptr_t>(out) & 15) == 0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t q = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; begin + q < end; q += stride) {
    const std::size_t e = (begin + q) * kPack<T>;
    const uint4 packed = reduce_pack<T, Op, kAvg>(p.data, p.size, (src_offset + e) * sizeof(T));
    const T* r = reinterpret_cast<const T*>(&packed);
    if (aligned) {
      *reinterpret_cast<uint4*>(out + e * sizeof(T)) = packed;
    } else {
      for (int k = 0; k < kPack<T>; ++k) reinterpret_cast<T*>(out)[e + k] = r[k];
    }
  }
}

// The elements after the last whole pack, one thread.
template <typename T, typename Op, bool kAvg>
__device__ void reduce_tail(const Peers& p, std::size_t src_offset, std::size_t begin, std::size_t count, char* out) {
  for (std::size_t e = begin; e < count; ++e) {
    reinterpret_cast<T*>(out)[e] = reduce_element<T, Op, kAvg>(p.data, p.size, (src_offset + e) * sizeof(T));
  }
}

template <typename T, typename Op, bool kAvg>
__global__ void one_shot_kernel(Peers p, std::size_t src_offset, std::size_t count, char* out, std::uint32_t epoch,
                                unsigned int op_code) {
  if (!block_barrier(p, epoch, op_code)) return;  // every rank's input is in its data area
  const std::size_t packs = count / kPack<T>;
  reduce_packs<T, Op, kAvg>(p, src_offset, 0, packs, out);
  if (blockIdx.x == 0 && threadIdx.x == 0) reduce_tail<T, Op, kAvg>(p, src_offset, packs * kPack<T>, count, out);
  block_barrier(p, epoch + 1, op_code);  // nobody reads our data area any more
}

template <typename T, typename Op, bool kAvg>
__global__ void two_shot_kernel(Peers p, std::size_t count, char* out, std::uint32_t epoch, unsigned int op_code) {
  if (!block_barrier(p, epoch, op_code)) return;
  const std::size_t packs = count / kPack<T>;
  const std::size_t slice = (packs + p.size - 1) / p.size;
  auto begin = [&](int j) { return min(packs, j * slice); };
  auto end = [&](int j) { return min(packs, (j + 1) * slice); };
  char* mine = p.data[p.rank];
  // Phase 1: reduce our slice in place (only we read it now); the last rank also the tail.
  reduce_packs<T, Op, kAvg>(p, 0, begin(p.rank), end(p.rank), mine);
  const bool tail_owner = p.rank == p.size - 1 && blockIdx.x == 0 && threadIdx.x == 0;
  if (tail_owner) reduce_tail<T, Op, kAvg>(p, 0, packs * kPack<T>, count, mine);
  if (!block_barrier(p, epoch + 1, op_code)) return;
  // Phase 2: every slice from its owner, with the thread mapping its owner wrote it with.
  const bool aligned = (reinterpret_cast<std::uintptr_t>(out) & 15) == 0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (int j = 0; j < p.size; ++j) {
    for (std::size_t q = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; begin(j) + q < end(j);
         q += stride) {
      const std::size_t at = (begin(j) + q) * 16;
      const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p.data[j] + at));
      if (aligned) {
        *reinterpret_cast<uint4*>(out + at) = v;
      } else {
        const T* e = reinterpret_cast<const T*>(&v);
        for (int k = 0; k < kPack<T>; ++k) reinterpret_cast<T*>(out + at)[k] = e[k];
      }
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (std::size_t e = packs * kPack<T>; e < count; ++e) {
      reinterpret_cast<T*>(out)[e] = Conv<T>::load(p.data[p.size - 1] + e * sizeof(T));
    }
  }
  block_barrier(p, epoch + 2, op_code);
}

__global__ void barrier_kernel(Peers p, std::uint32_t epoch, unsigned int op_code) { block_barrier(p, epoch, op_code); }

__global__ void set_flag_kernel(std::uint32_t* flag, std::uint32_t value) {
  __threadfence_system();
  store_release(flag, value);
}

__global__ void wait_flag_kernel(const std::uint32_t* flag, std::uint32_t value, ErrorRecord* err, unsigned int op,
                                 unsigned int peer, unsigned long long timeout_ns) {
  if (!wait_at_least(flag, value, timeout_ns)) report_timeout(err, op, peer, value);
}


unsigned int blocks_for(std::size_t packs) {
  const std::size_t wanted = (packs + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted > kIpcBarrierSlots ? kIpcBarrierSlots : wanted));
}

template <typename T, typename Op, bool kAvg>
void launch_typed(const Peers& p, bool two_shot, std::size_t src_offset, std::size_t count, void* out,
                  std::uint32_t epoch, unsigned int op_code, cudaStream_t stream) {
  const std::size_t packs = count / kPack<T>;
  char* o = static_cast<char*>(out);
  if (two_shot) {
    two_shot_kernel<T, Op, kAvg><<<blocks_for((packs + p.size - 1) / p.size), kThreads, 0, stream>>>(p, count, o, epoch,
                                                                                                   op_code);
  } else {
    one_shot_kernel<T, Op, kAvg><<<blocks_for(packs), kThreads, 0, stream>>>(p, src_offset, count, o, epoch, op_code);
  }
  cuda_check(cudaGetLastError(), two_shot ? "two-shot reduce launch" : "one-shot reduce launch");
}

template <typename T>
void launch_op(const Peers& p, int op, bool two_shot, std::size_t src_offset, std::size_t count, void* out,
               std::uint32_t epoch, unsigned int op_code, cudaStream_t stream) {
  switch (op) {
    case 0: return launch_typed<T, Sum, false>(p, two_shot, src_offset, count, out, epoch, op_code, stream);
    case 1: return launch_typed<T, Max, false>(p, two_shot, src_offset, count, out, epoch, op_code, stream);
    case 2: return launch_typed<T, Min, false>(p, two_shot, src_offset, count, out, epoch, op_code, stream);
    case 3: return launch_typed<T, Sum, true>(p, two_shot, src_offset, count, out, epoch, op_code, stream);
    default: throw std::invalid_argument("reduce op code " + std::to_string(op) + " is not sum, max, min or avg");
  }
}

}  // namespace

void launch_reduce(const Peers& peers, int dtype, int op, bool two_shot, std::size_t src_offset, std::size_t count,
                   void* out, std::uint32_t epoch, unsigned int op_code, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_op<float>(peers, op, two_shot, src_offset, count, out, epoch, op_code, stream);
    case 1: return launch_op<__half>(peers, op, two_shot, src_offset, count, out, epoch, op_code, stream);
    case 2: return launch_op<__nv_bfloat16>(peers, op, two_shot, src_offset, count, out, epoch, op_code, stream);
    default:
      throw std::invalid_argument("the ipc backend reduces float32, float16 and bfloat16 (dtype codes 0-2), not code " +
                                  std::to_string(dtype));
  }
}

void launch_barrier(const Peers& peers, std::uint32_t epoch, unsigned int op_code, cudaStream_t stream) {
  barrier_kernel<<<1, 32, 0, stream>>>(peers, epoch, op_code);
  cuda_check(cudaGetLastError(), "barrier launch");
}

void launch_set_flag(std::uint32_t* flag, std::uint32_t value, cudaStream_t stream) {
  set_flag_kernel<<<1, 1, 0, stream>>>(flag, value);
  cuda_check(cudaGetLastError(), "set_flag launch");
}

void launch_wait_flag(const std::uint32_t* flag, std::uint32_t value, ErrorRecord* err, unsigned int op,
                      unsigned int peer, unsigned long long timeout_ns, cudaStream_t stream) {
  wait_flag_kernel<<<1, 1, 0, stream>>>(flag, value, err, op, peer, timeout_ns);
  cuda_check(cudaGetLastError(), "wait_flag launch");
}

}  // namespace plait::cuda::ipc
