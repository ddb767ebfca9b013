// Where everything lives inside a group's shared-memory segment.
//
//   Header                       one page: sizes, attach count, abort flag, rank pids
//   Arrival arrive[size]         per rank: how many barriers it has arrived at (wrapping), and
//                                the collective call of each slot (checked across ranks)
//   ChanCtl chan[size*(size-1)]  per ordered pair (src, dst): chunks sent and consumed
//   coll[size][3][slot_bytes]    per rank: three collective slots (used in turn)
//   ring[size*(size-1)][2][chan_bytes]  per ordered pair: the send/recv ring
//
// Each flag sits on its own 128-byte block so ranks spinning on one never share a cache
// line (or its prefetch pair) with a writer of another; what readers of a flag need next
// (the calls) shares its block, so the barrier and the call check cost one line transfer per
// peer. Regions start on 4 KiB pages.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "shm/reduce.h"
#include "shm/wait.h"

namespace plait::shm {

constexpr std::uint64_t kMagic = 0x706C616974534D31ULL;  // "plaitSM1"
constexpr std::uint32_t kVersion = 3;
constexpr std::size_t kLine = 128;
constexpr std::size_t kPage = 4096;
constexpr int kMaxRanks = kMaxSources;
constexpr int kCollSlots = 3;
constexpr int kChanSlots = 2;
constexpr std::size_t kReasonBytes = 512;

static_assert(std::atomic<std::int32_t>::is_always_lock_free, "shared-memory flags need lock-free 32-bit atomics");
static_assert(kLine == kFlagBlock, "flags sit in blocks of one size");

struct Header {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t size;            // ranks in the group
  std::uint64_t slot_bytes;      // bytes of one collective slot
  std::uint64_t chan_bytes;      // bytes of one send/recv ring slot
  std::uint64_t oneshot_bytes;   // all_reduce up to this size is one-shot (the same on every rank)
  std::uint64_t total_bytes;     // size of the whole segment
  std::atomic<std::uint32_t> attached;    // ranks that mapped the segment
  std::atomic<std::uint32_t> abort_claim; // 0, or 1 once a rank started writing abort_reason
  std::atomic<std::int32_t> abort_rank;   // -1, or the group rank that gave up
  std::int32_t pids[kMaxRanks];           // process id of each rank, for error messages
  char abort_reason[kReasonBytes];        // written before abort_rank is published
};

// One direction of a send/recv channel: `sent` and `msg_bytes` are written by the sender,
// `consumed` by the receiver, each in its own cache block.
struct ChanCtl {
  alignas(kLine) Flag sent;      // chunks published (wraps around; compared as distances)
  alignas(kLine) Flag consumed;  // chunks copied out
  alignas(kLine) std::uint64_t msg_bytes[kChanSlots];  // total size of the message each slot's chunk is part of
};

// What one rank's collective call is. A call publishes it with its first step (in that
// step's slot of the rank's Arrival block, under the same reuse rule as the slot's data)
// and, after the barrier that ends the step, compares every rank's: ranks that disagree (a different operation, dtype,
// reduce op, size, layout or broadcast source) fail on every rank with an error naming the
// calls, instead of reading each other's slots as data of the wrong size or type.
enum class CallKind : std::uint32_t { all_reduce = 1, all_gather, reduce_scatter, broadcast, barrier };

struct CallSig {
  CallKind kind;
  std::uint32_t param;  // all_reduce, reduce_scatter: dtype * 16 + reduce op; broadcast: src
  std::uint64_t count;  // elements (reductions) or bytes (copies) per rank
  std::uint64_t outer;  // rows of an all_gather / reduce_scatter along an inner dim; else 1

  bool operator==(const CallSig& o) const {
    return kind == o.kind && param == o.param && count == o.count && outer == o.outer;
  }
  bool operator!=(const CallSig& o) const { return !(*this == o); }
  // "all_reduce(float32 x 100, sum)", for error messages.
  std::string describe() const;
};

// One rank's barrier flag and its call of each collective slot, in one block: a peer that
// saw the flag reach a barrier finds the call beside it, in the line it has just read.
struct alignas(kLine) Arrival {
  Flag flag;
  std::atomic<std::int32_t> cpu;  // the CPU the rank last ran on (-1 unknown), a hint for waiters
  CallSig calls[kCollSlots];
};
static_assert(sizeof(Arrival) == kLine, "a rank's arrival flag and calls fill one block");

// Byte offsets of the regions for a given group size and slot sizes.
struct Layout {
  int size = 0;
  std::size_t slot_bytes = 0;
  std::size_t chan_bytes = 0;
  std::size_t arrive_off = 0;
  std::size_t chan_ctl_off = 0;
  std::size_t coll_off = 0;
  std::size_t ring_off = 0;
  std::size_t total = 0;

  static Layout compute(int size, std::size_t slot_bytes, std::size_t chan_bytes);
  // Index of the ordered pair (src, dst), src != dst, in 0 .. size*(size-1)-1.
  int pair(int src, int dst) const { return src * (size - 1) + (dst < src ? dst : dst - 1); }
};

}  // namespace plait::shm
