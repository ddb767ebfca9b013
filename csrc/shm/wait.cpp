// Deadline and Backoff (see wait.h).
#include "shm/wait.h"

#include <sched.h>
#include <time.h>

#include <stdexcept>

namespace plait::shm {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

constexpr auto kYieldPhase = std::chrono::milliseconds(2);  // then nap
constexpr long kNapNs = 20'000;

}  // namespace

Deadline::Deadline(double timeout_s) : start_(std::chrono::steady_clock::now()), timeout_s_(timeout_s) {
  if (!(timeout_s > 0)) throw std::invalid_argument("timeout must be a positive number of seconds");
  end_ = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeout_s));
}

double Deadline::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

bool Backoff::pause() {
  if (iters_ < spin_iters_) {
    ++iters_;
    cpu_relax();
    return (iters_ & 255) == 0;
  }
  const auto now = std::chrono::steady_clock::now();
  if (iters_ == spin_iters_) {
    ++iters_;
    slow_since_ = now;
  }
  if (now - slow_since_ < kYieldPhase) {
    sched_yield();
  } else {
    const timespec nap{0, kNapNs};
    nanosleep(&nap, nullptr);
  }
  return true;
}

int default_spin_iters(int ranks) {
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const int available = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  return ranks <= available ? 4000 : 0;
}

}  // namespace plait::shm
