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

// Spins for the policy's budget (pause, then yield), then sleeps on the flag in slices
// until it is ready, the deadline passes or a peer aborts; tells the policy how it went.
template <typename Ready, typename Describe>
void Group::wait_flag(Flag& flag, int peer, Ready ready, Op& op, SpinPolicy& policy, Describe waiting_for) {
  std::uint32_t seen = flag.value.load(std::memory_order_acquire);
  if (ready(seen)) return;
  const auto start = std::chrono::steady_clock::now();
  const long long budget = policy.budget_ns();
  bool slept = false;
  if (budget == 0 || !spin_on(flag, ready, seen, start + std::chrono::nanoseconds(policy.pause_ns(budget)),
                              start + std::chrono::nanoseconds(budget), arrive(peer)->cpu, note_cpu(),
                              policy.yield_only())) {
    slept = true;
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
