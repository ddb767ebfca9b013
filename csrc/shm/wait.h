// Bounded waiting on shared-memory flags: a deadline, and a backoff that spins briefly
// (ranks on their own cores see a peer's flag within a microsecond), then yields the CPU
// (more ranks than cores: let the peer we wait for run), then sleeps in short naps (a
// long wait, e.g. a pipeline stage idling, should not burn a core).
#pragma once

#include <chrono>

namespace plait::shm {

class Deadline {
 public:
  explicit Deadline(double timeout_s);
  bool passed() const { return std::chrono::steady_clock::now() >= end_; }
  double timeout_s() const { return timeout_s_; }
  // Seconds since the deadline was set.
  double elapsed_s() const;

 private:
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point end_;
  double timeout_s_;
};

class Backoff {
 public:
  explicit Backoff(int spin_iters) : spin_iters_(spin_iters) {}
  // One step of waiting. Returns true when the caller should check the deadline and the
  // group's abort flag (every 256 spins, and after every yield or nap).
  bool pause();

 private:
  int spin_iters_;
  int iters_ = 0;
  std::chrono::steady_clock::time_point slow_since_{};
};

// Spin iterations before yielding: a few thousand when every rank of a group of `ranks`
// can have its own CPU, else none (spinning would only delay the rank we wait for).
int default_spin_iters(int ranks);

}  // namespace plait::shm
