// Host-side CUDA queries and a smoke-test kernel, declared without CUDA types so that
// code compiled by the C++ compiler (bindings.cpp) can call them.
//
// device.cu implements them when plait._C is built with CUDA. Otherwise cuda_disabled.cpp
// does: each throws std::runtime_error saying how to rebuild, except device_count(),
// which returns 0. CUDA errors become std::runtime_error carrying cudaGetErrorString's
// text (pybind11 raises them as RuntimeError).
#pragma once

#include <cstdint>
#include <string>

namespace plait::cuda {

// CUDA runtime version linked into the module, as CUDA encodes it: 13000 for 13.0.
int runtime_version();

// Latest CUDA version the installed driver supports (same encoding); 0 when no driver.
int driver_version();

// Number of usable CUDA devices. 0 when there is no driver, no device, or the runtime
// cannot start for any other reason; never throws. device_name(0) names the reason.
int device_count();

// The device's name, e.g. "NVIDIA H100 80GB HBM3".
std::string device_name(int device);

// Whether `device` can map memory of `peer` (cudaDeviceCanAccessPeer).
bool can_access_peer(int device, int peer);

// Allocates n ints on the current device, runs a kernel writing i*3 into element i,
// copies them back and returns whether every element is right. 0 < n <= INT32_MAX / 3.
bool fill_check(std::int64_t n);

}  // namespace plait::cuda
