// Flag publishing and sleeping (futex on Linux), Deadline, the learned spin budget (see wait.h).
#include "shm/wait.h"

#include <sched.h>
#include <time.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <climits>
#include <stdexcept>

namespace plait::shm {

void publish(Flag& flag, std::uint32_t value) {
  // seq_cst store, then seq_cst load of waiters; a waiter increments waiters, then reloads
  // value (both seq_cst). In the single total order one of the two sees the other, so a
  // waiter either sees the new value or is seen here and woken. The kernel's own
  // compare of the futex word closes the gap between its reload and its sleep.
  flag.value.store(value, std::memory_order_seq_cst);
  if (flag.waiters.load(std::memory_order_seq_cst) != 0) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&flag.value), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
#endif
  }
}

void sleep_on(Flag& flag, std::uint32_t seen, long max_ns) {
  if (max_ns <= 0) return;
  flag.waiters.fetch_add(1, std::memory_order_seq_cst);
  if (flag.value.load(std::memory_order_seq_cst) == seen) {
#if defined(__linux__)
    const timespec slice{max_ns / 1'000'000'000L, max_ns % 1'000'000'000L};
    syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&flag.value), FUTEX_WAIT, seen, &slice, nullptr, 0);
#else
    const timespec nap{0, max_ns < 50'000L ? max_ns : 50'000L};
    nanosleep(&nap, nullptr);
#endif
  }
  flag.waiters.fetch_sub(1, std::memory_order_seq_cst);
}

Deadline::Deadline(double timeout_s) : start_(std::chrono::steady_clock::now()) {
  if (!(timeout_s > 0)) throw std::invalid_argument("timeout must be a positive number of seconds");
  end_ = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeout_s));
}

double Deadline::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

long long Deadline::remaining_ns() const {
  const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(end_ - std::chrono::steady_clock::now());
  return left.count() > 0 ? left.count() : 0;
}

void yield_cpu() { sched_yield(); }

int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

bool move_off_cpu(int from, const std::int32_t* taken, int n_taken) {
#if defined(__linux__)
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (from < 0 || sched_getaffinity(0, sizeof allowed, &allowed) != 0) return false;
  int target = -1;
  for (int cpu = 0; cpu < CPU_SETSIZE && target < 0; ++cpu) {
    if (cpu == from || !CPU_ISSET(cpu, &allowed)) continue;
    if (std::find(taken, taken + n_taken, cpu) == taken + n_taken) target = cpu;
  }
  if (target < 0) return false;
  cpu_set_t only;
  CPU_ZERO(&only);
  CPU_SET(target, &only);
  // A running thread whose allowed set loses its CPU is migrated before the call returns.
  if (sched_setaffinity(0, sizeof only, &only) != 0) return false;
  // Restoring the set moves nothing: the thread runs on `target`, which the set holds.
  sched_setaffinity(0, sizeof allowed, &allowed);
  return true;
#else
  (void)from;
  (void)taken;
  (void)n_taken;
  return false;
#endif
}

bool oversubscribed(int ranks) {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const int available = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  return ranks > available;
}

namespace {
// Longest pause phase: beyond it a waiter checks, by yielding, whether its core is wanted.
constexpr long long kPauseCapNs = 50'000;
// Least a budget grows by after a short wait that slept, and below which a halved budget is 0.
constexpr long long kMinBudgetNs = 2'000;
}  // namespace

SpinPolicy::SpinPolicy(int cap_us, bool yield_only)
    : cap_ns_(cap_us > 0 ? cap_us * 1000LL : 0),
      pause_cap_ns_(yield_only ? 0 : kPauseCapNs),
      budget_ns_(cap_ns_) {}

void SpinPolicy::learn(long long waited_ns, bool slept) {
  const long long budget = budget_ns_.load(std::memory_order_relaxed);
  long long next = budget;
  if (!slept) {
    next = std::max(budget, std::min(cap_ns_, 2 * waited_ns));
  } else if (waited_ns <= cap_ns_) {
    next = std::min(cap_ns_, std::max({2 * budget, 2 * waited_ns, kMinBudgetNs}));
  } else {
    next = budget / 2 < kMinBudgetNs ? 0 : budget / 2;
  }
  if (next != budget) budget_ns_.store(next, std::memory_order_relaxed);
}

}  // namespace plait::shm
