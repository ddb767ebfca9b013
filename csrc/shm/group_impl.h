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

template <typename Ready, typename Describe>
void Group::wait_until(Ready ready, Op& op, Describe waiting_for) {
  Backoff backoff(spin_iters_);
  while (!ready()) {
    if (backoff.pause()) {
      check_abort(op);
      if (op.deadline.passed()) timed_out(op, waiting_for());
    }
  }
}

inline std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

}  // namespace plait::shm
