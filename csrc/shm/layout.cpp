// Layout::compute: region offsets inside a segment (see layout.h).
#include "shm/layout.h"

#include <stdexcept>
#include <string>

namespace plait::shm {
namespace {

std::size_t round_up(std::size_t value, std::size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

Layout Layout::compute(int size, std::size_t slot_bytes, std::size_t chan_bytes) {
  if (size < 1 || size > kMaxRanks) {
    throw std::invalid_argument("a shared-memory group has 1.." + std::to_string(kMaxRanks) + " ranks, not " +
                                std::to_string(size));
  }
  if (slot_bytes < kPage || slot_bytes % kPage || chan_bytes < kPage || chan_bytes % kPage) {
    throw std::invalid_argument("slot sizes must be positive multiples of 4096 bytes (got slot " +
                                std::to_string(slot_bytes) + ", channel " + std::to_string(chan_bytes) + ")");
  }
  Layout l;
  l.size = size;
  l.slot_bytes = slot_bytes;
  l.chan_bytes = chan_bytes;
  const std::size_t pairs = static_cast<std::size_t>(size) * (size - 1);
  l.arrive_off = round_up(sizeof(Header), kPage);
  l.chan_ctl_off = round_up(l.arrive_off + size * sizeof(Arrival), kPage);
  l.coll_off = round_up(l.chan_ctl_off + pairs * sizeof(ChanCtl), kPage);
  l.ring_off = l.coll_off + static_cast<std::size_t>(size) * kCollSlots * slot_bytes;
  l.total = l.ring_off + pairs * kChanSlots * chan_bytes;
  return l;
}

std::string CallSig::describe() const {
  const auto dtype = [this] { return std::string(dtype_name(static_cast<DType>(param / 16))); };
  const auto op = [this] { return std::string(op_name(static_cast<ReduceOp>(param % 16))); };
  const auto rows = [this] { return outer != 1 ? ", " + std::to_string(outer) + " rows" : std::string(); };
  switch (kind) {
    case CallKind::all_reduce:
      return "all_reduce(" + dtype() + " x " + std::to_string(count) + ", " + op() + ")";
    case CallKind::reduce_scatter:
      return "reduce_scatter(" + dtype() + " x " + std::to_string(count) + " per rank" + rows() + ", " + op() + ")";
    case CallKind::all_gather:
      return "all_gather(" + std::to_string(count) + " bytes per rank" + rows() + ")";
    case CallKind::broadcast:
      return "broadcast(" + std::to_string(count) + " bytes from group rank " + std::to_string(param) + ")";
    case CallKind::barrier:
      return "barrier";
  }
  return "an unknown call (kind " + std::to_string(static_cast<std::uint32_t>(kind)) + ")";
}

}  // namespace plait::shm
