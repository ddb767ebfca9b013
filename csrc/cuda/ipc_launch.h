// Host-side launchers of the IPC kernels (ipc_kernels.cu), for ipc.cu. CUDA types allowed:
// only .cu files include this.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/ipc_device.cuh"

namespace plait::cuda::ipc {

// Barriers (epochs) a reduce launch uses: one-shot 2, two-shot 3.
constexpr std::uint32_t kOneShotBarriers = 2;
constexpr std::uint32_t kTwoShotBarriers = 3;

// Reduces `count` elements at element offset src_offset of every rank's data area into
// out (any alignment), in rank order with fp32 accumulation. One-shot: every rank reduces
// everything. Two-shot (src_offset must be 0): rank r reduces slice r in place in its data
// area, then every rank gathers all slices into out. Barrier epochs epoch, epoch+1, ...
void launch_reduce(const Peers& peers, int dtype, int op, bool two_shot, std::size_t src_offset,
                   std::size_t count, void* out, std::uint32_t epoch, unsigned int op_code, cudaStream_t stream);

// One cross-rank barrier (block 0's row) at `epoch`.
void launch_barrier(const Peers& peers, std::uint32_t epoch, unsigned int op_code, cudaStream_t stream);

// *flag = value with system-scope release, after fencing everything before it on the stream.
void launch_set_flag(std::uint32_t* flag, std::uint32_t value, cudaStream_t stream);

// Waits until *flag reaches value or timeout_ns pass (then records op, peer, value in err).
void launch_wait_flag(const std::uint32_t* flag, std::uint32_t value, ErrorRecord* err, unsigned int op,
                      unsigned int peer, unsigned long long timeout_ns, cudaStream_t stream);

}  // namespace plait::cuda::ipc
