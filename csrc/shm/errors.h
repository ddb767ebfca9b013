// Exceptions the shared-memory collectives throw. bindings.cpp maps each to a Python
// exception class, and the Python backend turns those into plait's CommError and
// CommTimeoutError with the communicator's rank, group and operation in the message.
#pragma once

#include <stdexcept>
#include <string>

namespace plait::shm {

// Setup or usage failed (segment could not be created, size mismatch, broken group).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A wait ran past its deadline: a peer died, hangs, or skipped the call.
class Timeout : public Error {
 public:
  using Error::Error;
};

// Another rank of the group gave up (timed out) and marked the group unusable.
class Aborted : public Error {
 public:
  using Error::Error;
};

}  // namespace plait::shm
