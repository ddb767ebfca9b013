// send / recv: one ring of kChanSlots slots per ordered pair of ranks (see layout.h).
//
// The sender copies a chunk into slot (sent % kChanSlots) once the receiver has consumed
// the chunk that used it before, then publishes sent + 1. The receiver waits for
// sent > consumed, copies the chunk out and publishes consumed + 1 (counters wrap; see
// wait.h for the ordering and wake-ups). Each
// chunk also carries the total size of its message, so a recv whose size differs from
// the matching send fails instead of splitting messages wrongly.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "shm/errors.h"
#include "shm/group_impl.h"

namespace plait::shm {
namespace {

void check_peer(int peer, int rank, int size, const char* what) {
  if (peer < 0 || peer >= size || peer == rank) {
    throw std::invalid_argument(std::string(what) + " " + std::to_string(peer) +
                                " must be another rank of this group (0.." +
                                std::to_string(size - 1) + ", not " + std::to_string(rank) + ")");
  }
}

}  // namespace

void Group::send(const void* data, std::size_t bytes, int dst, double timeout_s) {
  check_peer(dst, rank_, size_, "send: dst");
  std::lock_guard<std::mutex> lock(send_mu_[dst]);
  Op op("send", timeout_s);
  check_usable(op);
  ChanCtl* ctl = chan(rank_, dst);
  const auto* src = static_cast<const char*>(data);
  std::uint32_t index = ctl->sent.value.load(std::memory_order_relaxed);  // only this side writes it
  op.chunks = std::max<std::size_t>(1, ceil_div(bytes, layout_.chan_bytes));
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    wait_flag(ctl->consumed, dst, [&](std::uint32_t consumed) { return index - consumed < kChanSlots; }, op, chan_spin_,
              [&] { return describe_ranks({dst}) + " to receive"; });
    const std::size_t b0 = op.chunk * layout_.chan_bytes;
    std::memcpy(ring(rank_, dst, index), src + b0, std::min(layout_.chan_bytes, bytes - b0));
    ctl->msg_bytes[index % kChanSlots] = bytes;
    note_cpu();
    publish(ctl->sent, ++index);
  }
}

void Group::recv(void* data, std::size_t bytes, int src, double timeout_s) {
  check_peer(src, rank_, size_, "recv: src");
  std::lock_guard<std::mutex> lock(recv_mu_[src]);
  Op op("recv", timeout_s);
  check_usable(op);
  ChanCtl* ctl = chan(src, rank_);
  auto* dst = static_cast<char*>(data);
  std::uint32_t index = ctl->consumed.value.load(std::memory_order_relaxed);  // only this side writes it
  op.chunks = std::max<std::size_t>(1, ceil_div(bytes, layout_.chan_bytes));
  for (op.chunk = 0; op.chunk < op.chunks; ++op.chunk) {
    wait_flag(ctl->sent, src, [&](std::uint32_t sent) { return flag_distance(sent, index) > 0; }, op, chan_spin_,
              [&] { return describe_ranks({src}) + " to send"; });
    const std::uint64_t sent_bytes = ctl->msg_bytes[index % kChanSlots];
    if (sent_bytes != bytes) {
      const std::string message = "recv of " + std::to_string(bytes) + " bytes from group rank " + std::to_string(src) +
                                  " matched a send of " + std::to_string(sent_bytes) +
                                  " bytes; a send and its recv must have the same size";
      mark_broken(message);
      throw Error(message);
    }
    const std::size_t b0 = op.chunk * layout_.chan_bytes;
    std::memcpy(dst + b0, ring(src, rank_, index), std::min(layout_.chan_bytes, bytes - b0));
    note_cpu();
    publish(ctl->consumed, ++index);
  }
}

}  // namespace plait::shm
