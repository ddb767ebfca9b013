// Bounded waiting on shared-memory flags.
//
// A Flag is a 32-bit counter (compared with wrap-around, so it never overflows) that one
// rank publishes and others wait on. Waiting spins for a short time (ranks on their own
// cores see a peer's store within a microsecond), then sleeps in the kernel on the flag
// (a futex on the shared page), woken by the publisher: when ranks share cores with each
// other or with other processes, a sleeping waiter costs nothing and is woken at once,
// where spinning or yielding would only delay the rank it waits for. Sleeps last at most
// a slice, so the caller can check its deadline and the group's abort flag.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace plait::shm {

constexpr std::size_t kFlagBlock = 128;  // one flag per 128-byte block: no false sharing

struct alignas(kFlagBlock) Flag {
  std::atomic<std::uint32_t> value;    // the futex word
  std::atomic<std::uint32_t> waiters;  // ranks asleep (or about to sleep) on value
};

static_assert(std::atomic<std::uint32_t>::is_always_lock_free, "shared-memory flags need lock-free atomics");

// a - b as a signed distance, correct across wrap-around while |a - b| < 2^31.
inline std::int32_t flag_distance(std::uint32_t a, std::uint32_t b) { return static_cast<std::int32_t>(a - b); }

// Stores value (release) and wakes every waiter of the flag.
void publish(Flag& flag, std::uint32_t value);

// Sleeps while flag.value == seen, for at most max_ns nanoseconds (or until woken).
void sleep_on(Flag& flag, std::uint32_t seen, long max_ns);

class Deadline {
 public:
  explicit Deadline(double timeout_s);
  double elapsed_s() const;
  // Nanoseconds left, at least 0.
  long long remaining_ns() const;

 private:
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point end_;
};

// Most microseconds to spin before sleeping: 20 when every rank of a group of `ranks` can
// have its own CPU, else none (spinning would only delay the rank we wait for).
int default_spin_us(int ranks);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace plait::shm
