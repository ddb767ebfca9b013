// IpcGroup and SymmetricBuffer for a build without CUDA: constructing one fails with a message saying how to
// get CUDA; the other members exist only so bindings.cpp links (no object can reach them).
#ifndef PLAIT_WITH_CUDA

#include <stdexcept>

#include "cuda/ipc_api.h"
#include "cuda/symmetric_api.h"

namespace plait::cuda {
namespace {

[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "plait was built without CUDA (nvcc not found or PLAIT_CUDA=0), so it has no CUDA IPC backend; "
      "rebuild with nvcc on PATH");
}

}  // namespace

struct IpcGroup::Impl {};

IpcGroup::IpcGroup(int, int, int, std::size_t, std::size_t, std::size_t) { no_cuda(); }
IpcGroup::~IpcGroup() = default;
std::string IpcGroup::handle() const { no_cuda(); }
void IpcGroup::open(const std::vector<std::string>&) { no_cuda(); }
void IpcGroup::all_reduce(std::uintptr_t, std::size_t, int, int, std::uintptr_t, double) { no_cuda(); }
void IpcGroup::reduce_scatter(std::uintptr_t, std::uintptr_t, std::size_t, int, int, std::uintptr_t, double) {
  no_cuda();
}
void IpcGroup::all_gather(std::uintptr_t, std::uintptr_t, std::size_t, std::uintptr_t, double) { no_cuda(); }
void IpcGroup::broadcast(std::uintptr_t, std::size_t, int, std::uintptr_t, double) { no_cuda(); }
void IpcGroup::barrier(std::uintptr_t, double) { no_cuda(); }
void IpcGroup::send(std::uintptr_t, std::size_t, int, std::uintptr_t, double) { no_cuda(); }
void IpcGroup::send_done(int, std::uintptr_t) { no_cuda(); }
std::uintptr_t IpcGroup::send_stream(int) { no_cuda(); }
void IpcGroup::recv(std::uintptr_t, std::size_t, int, std::uintptr_t, double) { no_cuda(); }
std::uintptr_t IpcGroup::flag_address(int, int) const { no_cuda(); }
void IpcGroup::set_flag(int, int, std::uint32_t, std::uintptr_t) { no_cuda(); }
void IpcGroup::wait_flag(int, std::uint32_t, std::uintptr_t, double) { no_cuda(); }
void IpcGroup::check() { no_cuda(); }
int IpcGroup::rank() const { no_cuda(); }
int IpcGroup::size() const { no_cuda(); }
int IpcGroup::device() const { no_cuda(); }
std::size_t IpcGroup::data_bytes() const { no_cuda(); }
std::size_t IpcGroup::inbox_bytes() const { no_cuda(); }
std::size_t IpcGroup::oneshot_bytes() const { no_cuda(); }

struct SymmetricBuffer::Impl {};

SymmetricBuffer::SymmetricBuffer(int, int, int, std::size_t) { no_cuda(); }
SymmetricBuffer::~SymmetricBuffer() = default;
std::string SymmetricBuffer::handle() const { no_cuda(); }
void SymmetricBuffer::open(const std::vector<std::string>&) { no_cuda(); }
std::uintptr_t SymmetricBuffer::flag_address(int, int) const { no_cuda(); }
std::uintptr_t SymmetricBuffer::data_address(int) const { no_cuda(); }
void SymmetricBuffer::set_flag(int, int, std::uint32_t, std::uintptr_t) { no_cuda(); }
void SymmetricBuffer::wait_flag(int, int, std::uint32_t, std::uintptr_t, double) { no_cuda(); }
void SymmetricBuffer::reduce_rows(std::uintptr_t, std::size_t, int, std::size_t, std::size_t, std::size_t, std::size_t,
                                  int, std::uint32_t, int, std::uintptr_t, double) {
  no_cuda();
}
void SymmetricBuffer::check() { no_cuda(); }
int SymmetricBuffer::rank() const { no_cuda(); }
int SymmetricBuffer::size() const { no_cuda(); }
std::size_t SymmetricBuffer::data_bytes() const { no_cuda(); }

}  // namespace plait::cuda

#endif  // PLAIT_WITH_CUDA
