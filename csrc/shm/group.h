// A group of processes on one host that communicate through one shared-memory segment.
//
// Collectives (every rank calls them in the same order with the same sizes):
//   all_reduce      in place; one-shot up to oneshot_bytes, 16-bit values counted as 4 bytes (every rank reduces every
//                   rank's input, in rank order), else two-shot (rank r reduces slice r
//                   of each chunk, then every rank gathers the slices), pipelined so a
//                   chunk costs one barrier. Both reduce in rank order 0..n-1, so all
//                   ranks get bitwise the same result.
//   all_gather      rank j's input lands in block j of the output, viewed as
//                   [outer][size][bytes_per_rank/outer] (outer > 1 gathers along an inner dim).
//   reduce_scatter  input viewed as [outer][size][inner]; rank r gets block r, reduced.
//   broadcast       rank src's data to every rank.
//   barrier
// Messages larger than a slot go in chunks. Each step (a chunk, or a small call) takes
// the next of a rank's three slots in turn; a step's data is read only between the
// barrier that follows its writes and the next barrier the reader arrives at, and a
// slot is rewritten only after the writer passed a barrier that every rank reached
// after those reads. So back-to-back calls need no extra synchronisation; the third
// slot is what lets the pipelined two-shot write chunk c+1 before the barrier that
// releases the reads of chunk c.
//
// send/recv: one ring of two slots per ordered pair of ranks, independent of the
// collectives and of other pairs; a send and its recv must have the same size.
//
// Every rank publishes what it calls (operation, dtype, reduce op, sizes, broadcast source)
// with the call's first step and checks the others' after that step's barrier: ranks that
// make different calls all fail with Error naming the calls (the group is then unusable),
// rather than reading each other's data with the wrong size or type. Calls with no data
// (count 0) take part too, so a rank that skips a call cannot pair its next one wrongly.
//
// Every wait is bounded by the call's timeout and throws Timeout naming the ranks that
// did not arrive; the rank that times out also marks the segment aborted so its peers
// fail fast with Aborted. After either, the group is unusable (Error on every call).
// Calls may come from several threads: collectives are serialised, and so is each
// direction of each channel.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "shm/layout.h"
#include "shm/segment.h"
#include "shm/types.h"

namespace plait::shm {

struct Options {
  std::size_t slot_bytes = 256 << 10;    // per rank per collective slot (creator decides)
  std::size_t chan_bytes = 256 << 10;    // per send/recv ring slot (creator decides)
  std::size_t oneshot_bytes = 64 << 10;  // all_reduce one-shot threshold (creator decides)
  Simd simd = Simd::scalar;              // this rank's reduction code path
  int spin_us = -1;                      // most a wait spins before it sleeps; -1: kDefaultSpinUs
  bool move_off_shared_cpu = true;       // a waiter whose peer is queued on its CPU may move (wait.h)
};

class Group {
 public:
  // Rank 0 creates the named segment; the other ranks attach to it once they know the name.
  // A rank whose attach completes the group unlinks the name.
  static std::unique_ptr<Group> create(const std::string& name, int size, const Options& options);
  static std::unique_ptr<Group> attach(const std::string& name, int rank, int size, const Options& options);

  void all_reduce(void* data, std::size_t count, DType dtype, ReduceOp op, double timeout_s);
  void all_gather(const void* in, void* out, std::size_t bytes_per_rank, std::size_t outer, double timeout_s);
  void reduce_scatter(const void* in, void* out, std::size_t count_per_rank, std::size_t outer, DType dtype,
                      ReduceOp op, double timeout_s);
  void broadcast(void* data, std::size_t bytes, int src, double timeout_s);
  void barrier(double timeout_s);
  void send(const void* data, std::size_t bytes, int dst, double timeout_s);
  void recv(void* data, std::size_t bytes, int src, double timeout_s);

  // Removes the segment's name (idempotent); the mapping stays valid.
  void unlink_name() const { Segment::unlink(name_); }
  // How many ranks have attached so far (the creator counts).
  int attached() const;

  int rank() const { return rank_; }
  int size() const { return size_; }
  Simd simd() const { return simd_; }
  const std::string& name() const { return name_; }
  const Layout& layout() const { return layout_; }
  std::size_t oneshot_bytes() const { return oneshot_bytes_; }
  // What a collective's wait spins now before it sleeps (learned, see SpinPolicy), and its cap.
  double spin_budget_us() const { return coll_spin_.budget_ns() / 1000.0; }
  int spin_cap_us() const { return coll_spin_.cap_us(); }
  // How many waits of this rank (collectives and send/recv) slept on a flag, and how many times
  // this rank moved off a CPU it shared with a peer, since the group was opened: diagnostics.
  std::uint64_t sleeps() const { return sleeps_.load(std::memory_order_relaxed); }
  std::uint64_t moves() const { return moves_.load(std::memory_order_relaxed); }

 private:
  struct Op;  // the call in progress: name, deadline, progress (group.cpp)

  Group(Segment segment, std::string name, int rank, const Layout& layout, const Options& options);

  Header* header() const { return reinterpret_cast<Header*>(segment_.data()); }
  Arrival* arrive(int rank) const;
  ChanCtl* chan(int src, int dst) const;
  char* slot(int rank, int index) const;
  char* ring(int src, int dst, std::uint64_t chunk) const;
  int next_slot() { return static_cast<int>(step_++ % kCollSlots); }

  void arrive_and_wait(Op& op);
  // The barrier of a collective's first step (slot `index`): publishes this rank's call
  // first, and throws Error (marking the group unusable) unless every rank made the same call.
  void arrive_and_check(int index, const CallSig& call, Op& op);
  // The barrier of a chunked collective's step: arrive_and_check on the first chunk, else arrive_and_wait.
  void arrive_step(int index, const CallSig& call, Op& op);
  CallSig* call_sig(int rank, int index) const;
  void one_shot(char* data, std::size_t count, DType dtype, ReduceOp op_kind, const CallSig& call, Op& op);
  void two_shot(char* data, std::size_t count, DType dtype, ReduceOp op_kind, const CallSig& call, Op& op);

  // Waits until ready(flag value) holds (the flag is published by group rank `peer`), spinning
  // as `policy` says, then sleeping; on timeout or a peer's abort, throws (see class comment).
  template <typename Ready, typename Describe>
  void wait_flag(Flag& flag, int peer, Ready ready, Op& op, SpinPolicy& policy, Describe waiting_for);
  // Records the CPU this rank runs on in its Arrival block (peers stop spinning on a rank that
  // last ran on their own CPU: it cannot run while they spin) and returns it.
  int note_cpu();
  // After a wait found its peer on this rank's CPU: moves this thread to a CPU no rank of the
  // group last ran on (move_off_cpu), unless moving is off (Options, or ranks outnumber CPUs)
  // or this group's last attempt was under kMoveIntervalNs ago. Returns whether it moved.
  bool move_off_stacked_peer();
  void check_usable(const Op& op);
  void check_abort(const Op& op);
  [[noreturn]] void timed_out(const Op& op, const std::string& waiting_for);
  void mark_broken(const std::string& reason);
  // "group ranks [1, 2]" plus which of them have exited, for timeout messages.
  std::string describe_ranks(const std::vector<int>& ranks) const;

  Segment segment_;
  std::string name_;
  int rank_;
  int size_;
  Layout layout_;
  std::size_t oneshot_bytes_;
  Simd simd_;
  SpinPolicy coll_spin_;  // collective barriers: calls come back to back or not at all
  SpinPolicy chan_spin_;  // send/recv: waits as long as a pipeline stage computes
  bool may_move_;         // Options::move_off_shared_cpu, and ranks do not outnumber CPUs (!yield_only)

  std::uint32_t epoch_ = 0;  // barriers passed (wraps, like the flags)
  std::uint64_t step_ = 0;   // collective slots used (slot index = step % kCollSlots)
  std::mutex coll_mu_;
  std::vector<std::mutex> send_mu_;  // per destination
  std::vector<std::mutex> recv_mu_;  // per source
  mutable std::mutex broken_mu_;
  std::string broken_;  // why the group is unusable; empty while it is fine
  std::atomic<bool> is_broken_{false};
  // steady_clock time of the last attempt of move_off_stacked_peer (0: never), shared by this
  // group's threads: the group moves at most once per kMoveIntervalNs
  std::atomic<long long> last_move_ns_{0};
  std::atomic<std::uint64_t> sleeps_{0};
  std::atomic<std::uint64_t> moves_{0};
};

}  // namespace plait::shm
