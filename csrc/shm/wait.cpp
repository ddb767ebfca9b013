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

#if defined(__linux__)
namespace {

// A CPU set sized for every CPU the system may have (a fixed cpu_set_t holds 1024, and
// sched_getaffinity fails with EINVAL on larger machines).
class CpuSet {
 public:
  CpuSet() : count_(possible_cpus()), set_(CPU_ALLOC(count_)), bytes_(CPU_ALLOC_SIZE(count_)) {
    if (set_ != nullptr) CPU_ZERO_S(bytes_, set_);
  }
  ~CpuSet() {
    if (set_ != nullptr) CPU_FREE(set_);
  }
  CpuSet(const CpuSet&) = delete;
  CpuSet& operator=(const CpuSet&) = delete;

  // This thread's allowed CPUs; false when they cannot be read.
  bool read_mine() { return set_ != nullptr && sched_getaffinity(0, bytes_, set_) == 0; }
  // Makes them this thread's allowed CPUs (a running thread off them is migrated first).
  bool apply() const { return set_ != nullptr && sched_setaffinity(0, bytes_, set_) == 0; }
  bool has(int cpu) const { return cpu >= 0 && cpu < count_ && CPU_ISSET_S(cpu, bytes_, set_); }
  void only(int cpu) {
    CPU_ZERO_S(bytes_, set_);
    CPU_SET_S(cpu, bytes_, set_);
  }
  int count() const { return set_ != nullptr ? CPU_COUNT_S(bytes_, set_) : 1; }
  int size() const { return count_; }

 private:
  static int possible_cpus() {
    const long n = sysconf(_SC_NPROCESSORS_CONF);
    return n > CPU_SETSIZE ? static_cast<int>(n) : CPU_SETSIZE;
  }
  int count_;
  cpu_set_t* set_;
  std::size_t bytes_;
};

}  // namespace
#endif

bool move_off_cpu(int from, const std::int32_t* taken, int n_taken) {
#if defined(__linux__)
  CpuSet allowed;
  if (from < 0 || !allowed.read_mine()) return false;
  // The first allowed CPU after `from` (cyclically) that no peer holds: neighbours first, so a
  // rank on a multi-socket machine tends to stay near its caches, and groups that move at once
  // do not all land on CPU 0.
  int target = -1;
  for (int step = 1; step < allowed.size() && target < 0; ++step) {
    const int cpu = (from + step) % allowed.size();
    if (allowed.has(cpu) && std::find(taken, taken + n_taken, cpu) == taken + n_taken) target = cpu;
  }
  if (target < 0) return false;
  CpuSet only;
  only.only(target);
  if (!only.apply()) return false;
  // Restoring the set moves nothing: the thread runs on `target`, which the set holds. If it
  // fails (the cpuset shrank just now), try once more; the caller then sleeps instead of spinning.
  return allowed.apply() || allowed.apply();
#else
  (void)from;
  (void)taken;
  (void)n_taken;
  return false;
#endif
}

bool oversubscribed(int ranks) {
#if defined(__linux__)
  CpuSet cpus;
  return ranks > (cpus.read_mine() ? cpus.count() : 1);
#else
  return false;
#endif
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
