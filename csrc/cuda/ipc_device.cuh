// Device-side building blocks of the IPC kernels: system-scope acquire/release flag
// accesses, the global timer, timeout reports, and the per-block cross-rank barrier.
#pragma once

#include <cstdint>

#include "cuda/ipc_api.h"

namespace plait::cuda::ipc {

// One rank's signal area, at the start of its IPC buffer.
struct Signals {
  std::uint32_t barrier[kIpcBarrierSlots][kIpcMaxRanks];  // [block][arriving rank]: barriers passed
  std::uint32_t p2p_full[kIpcMaxRanks];  // [src]: chunks src has put into my inbox
  std::uint32_t p2p_free[kIpcMaxRanks];  // [dst]: chunks of mine dst has copied out of its inbox
  std::uint32_t user[kIpcUserFlags];
};

// What a timed-out wait records, in pinned host memory mapped into the device.
struct ErrorRecord {
  unsigned int code;   // 0: none; 1: a wait timed out (first one wins)
  unsigned int op;     // OpCode of the kernel
  unsigned int peer;   // group rank waited for (or kIpcMaxRanks: a user flag)
  unsigned int value;  // flag value waited for
};

enum OpCode : unsigned int { kAllReduce = 1, kReduceScatter, kBarrier, kSend, kRecv, kWaitFlag, kReduceRows };

__device__ __forceinline__ std::uint32_t load_acquire(const std::uint32_t* p) {
  std::uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(std::uint32_t* p, std::uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%1], %0;" ::"r"(v), "l"(p) : "memory");
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void report_timeout(ErrorRecord* err, unsigned int op, unsigned int peer,
                                               unsigned int value) {
  if (atomicCAS_system(&err->code, 0u, 2u) == 0u) {  // 2: being written
    err->op = op;
    err->peer = peer;
    err->value = value;
    __threadfence_system();
    atomicExch_system(&err->code, 1u);
  }
}

// Spins until *flag reaches value (wrapping compare) or timeout_ns pass; false on timeout.
__device__ __forceinline__ bool wait_at_least(const std::uint32_t* flag, std::uint32_t value,
                                              unsigned long long timeout_ns) {
  const unsigned long long start = global_timer_ns();
  while (static_cast<std::int32_t>(load_acquire(flag) - value) < 0) {
    if (global_timer_ns() - start > timeout_ns) return false;
  }
  return true;
}

// Where a kernel's ranks are: every rank's buffer as mapped in this process.
struct Peers {
  char* data[kIpcMaxRanks];        // data areas
  Signals* signals[kIpcMaxRanks];  // signal areas
  ErrorRecord* error;
  int rank;
  int size;
  unsigned long long timeout_ns;
};

// Cross-rank barrier of block blockIdx.x with the same block on every rank. All threads
// of the block must call it. Every thread fences its earlier writes (including writes to
// peers' memory) first, so a peer that sees the flag sees them. False on timeout (the
// block must then stop).
__device__ __forceinline__ bool block_barrier(const Peers& p, std::uint32_t epoch, unsigned int op) {
  __threadfence_system();
  __syncthreads();
  int failed = 0;
  if (threadIdx.x < p.size) {
    const int peer = threadIdx.x;
    store_release(&p.signals[peer]->barrier[blockIdx.x][p.rank], epoch);
    if (!wait_at_least(&p.signals[p.rank]->barrier[blockIdx.x][peer], epoch, p.timeout_ns)) {
      report_timeout(p.error, op, peer, epoch);
      failed = 1;
    }
  }
  return __syncthreads_or(failed) == 0;
}

}  // namespace plait::cuda::ipc
