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

// Spins for the current budget, then sleeps. The budget adapts like an adaptive mutex:
// a wait that ended after sleeping but within spin_us_ would have been served by
// spinning, so the budget grows by an eighth of spin_us_; a longer one halves it. On a
// quiet machine waits are short and ranks spin (microsecond hand-offs); when the ranks
// share their cores with other work a spinning rank only burns the CPU time its peer
// needs, waits get long, and the budget falls to zero within a few calls and stays low.
template <typename Ready, typename Describe>
void Group::wait_flag(Flag& flag, Ready ready, Op& op, Describe waiting_for) {
  std::uint32_t seen = flag.value.load(std::memory_order_acquire);
  if (ready(seen)) return;
  const auto start = std::chrono::steady_clock::now();
  const int budget_us = spin_budget_us_.load(std::memory_order_relaxed);
  if (budget_us > 0) {
    const auto spin_end = start + std::chrono::microseconds(budget_us);
    for (unsigned i = 1;; ++i) {
      cpu_relax();
      seen = flag.value.load(std::memory_order_acquire);
      if (ready(seen)) return;
      if ((i & 63) == 0 && std::chrono::steady_clock::now() >= spin_end) break;
    }
  }
  for (;;) {
    check_abort(op);
    const long long left = op.deadline.remaining_ns();
    if (left == 0) timed_out(op, waiting_for());
    sleep_on(flag, seen, static_cast<long>(left < kSleepSliceNs ? left : kSleepSliceNs));
    seen = flag.value.load(std::memory_order_acquire);
    if (ready(seen)) break;
  }
  const auto waited = std::chrono::steady_clock::now() - start;
  const int grown = budget_us + (spin_us_ + 7) / 8;
  spin_budget_us_.store(waited <= std::chrono::microseconds(spin_us_) ? (grown < spin_us_ ? grown : spin_us_)
                                                                     : budget_us / 2,
                        std::memory_order_relaxed);
}

inline std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

}  // namespace plait::shm
