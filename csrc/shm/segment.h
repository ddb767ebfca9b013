// A POSIX shared-memory segment mapped into this process: create (mode 0600, memory
// reserved up front so a full /dev/shm is an error here rather than a SIGBUS later),
// open an existing one, unlink by name. The mapping is released on destruction; the
// name is independent of the mapping and is unlinked explicitly, as early as possible.
#pragma once

#include <cstddef>
#include <string>

namespace plait::shm {

class Segment {
 public:
  // Creates `name` (must start with '/', must not exist) of `bytes` zeroed bytes.
  static Segment create(const std::string& name, std::size_t bytes);
  // Maps an existing segment, all of it.
  static Segment open(const std::string& name);
  // Removes the name; a segment already unlinked is fine. Never throws.
  static void unlink(const std::string& name) noexcept;

  Segment(Segment&& other) noexcept;
  Segment& operator=(Segment&& other) noexcept;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment();

  char* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  Segment(char* data, std::size_t size) : data_(data), size_(size) {}
  char* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace plait::shm
