// Private to the Group implementation files (group.cpp, collectives.cpp, channel.cpp):
// the per-call context and the bounded wait loop they all use.
#pragma once

#include <string>

#include "shm/group.h"
#include "shm/wait.h"

namespace plait::shm {

// The call in progress, for deadlines and messages: "all_reduce, chunk 3 of 8".
struct Group::Op {
  Op(const char* name, double timeout_s) : name(name), deadline(timeout_s) {}
  std::string where() const {
    return chunks > 1 ? std::string(name) + " (chunk " + std::to_string(chunk + 1) + " of " +
                            std::to_string(chunks) + ")"
                      : std::string(name);
  }
  const char* name;
  Deadline deadline;
  std::size_t chunk = 0;
  std::size_t chunks = 1;
};

// Longest single sleep: how late a rank notices a peer's abort or its own deadline.
constexpr long long kSleepSliceNs = 50'000'000;
// Least time between two moves of a rank off a CPU it shares with a peer: when other load keeps
// putting ranks together, moving on every wait would cost more than sleeping.
constexpr long long kMoveIntervalNs = 1'000'000;

// Spins for the policy's budget (pause, then yield), then sleeps on the flag in slices
// until it is ready, the deadline passes or a peer aborts; tells the policy how it went.
// A spin that ends because the peer is queued on this rank's CPU first moves this rank to a
// free CPU and spins on (at most once per kMoveIntervalNs, see move_off_stacked_peer); when
// it cannot move, it sleeps at once, which lets the peer run.
template <typename Ready, typename Describe>
void Group::wait_flag(Flag& flag, int peer, Ready ready, Op& op, SpinPolicy& policy, Describe waiting_for) {
  std::uint32_t seen = flag.value.load(std::memory_order_acquire);
  if (ready(seen)) return;
  const auto start = std::chrono::steady_clock::now();
  const long long budget = policy.budget_ns();
  SpinEnd end = SpinEnd::spent;
  if (budget > 0) {
    const auto pause_end = start + std::chrono::nanoseconds(policy.pause_ns(budget));
    const auto spin_end = start + std::chrono::nanoseconds(budget);
    // Collective waits keep this rank's CPU hint fresh; send/recv, often on other threads, only read theirs.
    std::atomic<std::int32_t>* hint = &policy == &coll_spin_ ? &arrive(rank_)->cpu : nullptr;
    end = spin_on(flag, ready, seen, pause_end, spin_end, arrive(peer)->cpu, hint, policy.yield_only());
    if (end == SpinEnd::stacked && move_off_stacked_peer()) {
      end = spin_on(flag, ready, seen, pause_end, spin_end, arrive(peer)->cpu, hint, policy.yield_only());
    }
  }
  const bool slept = end != SpinEnd::ready;
  if (slept) {
    sleeps_.fetch_add(1, std::memory_order_relaxed);
    for (;;) {
      check_abort(op);
      const long long left = op.deadline.remaining_ns();
      if (left == 0) timed_out(op, waiting_for());
      sleep_on(flag, seen, static_cast<long>(left < kSleepSliceNs ? left : kSleepSliceNs));
      seen = flag.value.load(std::memory_order_acquire);
      if (ready(seen)) break;
    }
  }
  policy.learn(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count(),
               slept);
}

inline std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

}  // namespace plait::shm
