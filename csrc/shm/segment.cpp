// POSIX shm_open / mmap wrapper; see segment.h.
#include "shm/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "shm/errors.h"

namespace plait::shm {
namespace {

std::string errno_text(int err) { return std::string(std::strerror(err)); }

// Closes a file descriptor when leaving scope.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

char* map(int fd, std::size_t bytes, const std::string& name) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) throw Error("mmap of shared memory " + name + " failed: " + errno_text(errno));
  return static_cast<char*>(p);
}

}  // namespace

Segment Segment::create(const std::string& name, std::size_t bytes) {
  Fd fd{::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, S_IRUSR | S_IWUSR)};
  if (fd.fd < 0) throw Error("shm_open(" + name + ", create) failed: " + errno_text(errno));
  try {
    if (::fchmod(fd.fd, S_IRUSR | S_IWUSR) != 0 || ::ftruncate(fd.fd, static_cast<off_t>(bytes)) != 0) {
      throw Error("sizing shared memory " + name + " to " + std::to_string(bytes) + " bytes failed: " +
                  errno_text(errno));
    }
    // Reserve the pages now: writing to a sparse tmpfs file that cannot grow raises SIGBUS.
    const int err = ::posix_fallocate(fd.fd, 0, static_cast<off_t>(bytes));
    if (err == ENOSPC || err == ENOMEM) {
      throw Error("/dev/shm has no room for " + std::to_string(bytes >> 20) +
                  " MiB of plait shared memory; enlarge /dev/shm (docker: --shm-size) or lower "
                  "PLAIT_SHM_SLOT_BYTES / PLAIT_SHM_CHANNEL_BYTES");
    }
    if (err != 0 && err != EOPNOTSUPP && err != EINVAL) {
      throw Error("reserving shared memory " + name + " failed: " + errno_text(err));
    }
    return Segment(map(fd.fd, bytes, name), bytes);
  } catch (...) {
    unlink(name);
    throw;
  }
}

Segment Segment::open(const std::string& name) {
  Fd fd{::shm_open(name.c_str(), O_RDWR, 0)};
  if (fd.fd < 0) {
    throw Error("shm_open(" + name + ") failed: " + errno_text(errno) +
                " (are all ranks of the group on one host, sharing /dev/shm?)");
  }
  struct stat info {};
  if (::fstat(fd.fd, &info) != 0) throw Error("fstat of shared memory " + name + " failed: " + errno_text(errno));
  const auto bytes = static_cast<std::size_t>(info.st_size);
  return Segment(map(fd.fd, bytes, name), bytes);
}

void Segment::unlink(const std::string& name) noexcept { ::shm_unlink(name.c_str()); }

Segment::Segment(Segment&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

Segment& Segment::operator=(Segment&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

Segment::~Segment() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

}  // namespace plait::shm
