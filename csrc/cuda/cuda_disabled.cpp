// The cuda_api.h functions for a build without CUDA: calls fail with a message that says
// how to get CUDA, except device_count(), which honestly reports no devices.
#ifndef PLAIT_WITH_CUDA

#include <stdexcept>

#include "cuda/cuda_api.h"

namespace plait::cuda {
namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "plait was built without CUDA (nvcc not found or PLAIT_CUDA=0); rebuild with nvcc on PATH");
}

}  // namespace

int runtime_version() { no_cuda(); }
int driver_version() { no_cuda(); }
int device_count() { return 0; }
std::string device_name(int) { no_cuda(); }
bool can_access_peer(int, int) { no_cuda(); }
bool fill_check(std::int64_t) { no_cuda(); }

}  // namespace plait::cuda

#endif  // PLAIT_WITH_CUDA
