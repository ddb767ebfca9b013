// Group setup (create / attach), the barrier, and failure handling (see group.h).
#include "shm/group.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>

#include "shm/errors.h"
#include "shm/group_impl.h"

namespace plait::shm {

namespace {

// Whether process `pid` has ended: gone, or a zombie its parent has not reaped yet.
bool process_exited(int pid) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0) return errno == ESRCH;
  std::FILE* stat = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (stat == nullptr) return false;
  char text[512] = {0};
  const std::size_t n = std::fread(text, 1, sizeof text - 1, stat);
  std::fclose(stat);
  const char* paren = std::strrchr(text, ')');  // the state follows the command name "(...)"
  return n > 0 && paren != nullptr && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X');
}

}  // namespace

std::unique_ptr<Group> Group::create(const std::string& name, int size, const Options& options) {
  const Layout layout = Layout::compute(size, options.slot_bytes, options.chan_bytes);
  Segment segment = Segment::create(name, layout.total);
  auto* h = new (segment.data()) Header();
  h->magic = kMagic;
  h->version = kVersion;
  h->size = static_cast<std::uint32_t>(size);
  h->slot_bytes = layout.slot_bytes;
  h->chan_bytes = layout.chan_bytes;
  h->oneshot_bytes = options.oneshot_bytes < layout.slot_bytes ? options.oneshot_bytes : layout.slot_bytes;
  h->total_bytes = layout.total;
  h->abort_rank.store(-1, std::memory_order_relaxed);
  h->pids[0] = static_cast<std::int32_t>(::getpid());
  for (int r = 0; r < size; ++r) {
    (new (segment.data() + layout.arrive_off + r * sizeof(Arrival)) Arrival())->cpu.store(-1, std::memory_order_relaxed);
  }
  for (int p = 0; p < size * (size - 1); ++p) {
    new (segment.data() + layout.chan_ctl_off + p * sizeof(ChanCtl)) ChanCtl();
  }
  h->attached.store(1, std::memory_order_release);
  std::unique_ptr<Group> group(new Group(std::move(segment), name, 0, layout, options));
  if (size == 1) group->unlink_name();
  return group;
}

std::unique_ptr<Group> Group::attach(const std::string& name, int rank, int size, const Options& options) {
  if (rank < 1 || rank >= size) {
    throw std::invalid_argument("attach is for ranks 1.." + std::to_string(size - 1) + ", not " +
                                std::to_string(rank) + " (rank 0 creates the segment)");
  }
  Segment segment = Segment::open(name);
  if (segment.size() < sizeof(Header)) throw Error("shared memory " + name + " is too small to be a plait group");
  auto* h = reinterpret_cast<Header*>(segment.data());
  if (h->magic != kMagic || h->version != kVersion) {
    throw Error("shared memory " + name + " is not a plait group of this version (a different plait build?)");
  }
  if (static_cast<int>(h->size) != size) {
    throw Error("shared memory " + name + " was created for " + std::to_string(h->size) + " ranks, this rank expects " +
                std::to_string(size));
  }
  const Layout layout = Layout::compute(size, h->slot_bytes, h->chan_bytes);
  if (layout.total != h->total_bytes || segment.size() != layout.total) {
    throw Error("shared memory " + name + " has an unexpected layout (a different plait build?)");
  }
  h->pids[rank] = static_cast<std::int32_t>(::getpid());
  std::unique_ptr<Group> group(new Group(std::move(segment), name, rank, layout, options));
  if (h->attached.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<std::uint32_t>(size)) {
    group->unlink_name();  // everyone has it mapped: the name is no longer needed
  }
  return group;
}

Group::Group(Segment segment, std::string name, int rank, const Layout& layout, const Options& options)
    : segment_(std::move(segment)),
      name_(std::move(name)),
      rank_(rank),
      size_(layout.size),
      layout_(layout),
      oneshot_bytes_(reinterpret_cast<Header*>(segment_.data())->oneshot_bytes),
      simd_(options.simd),
      coll_spin_(options.spin_us >= 0 ? options.spin_us : kDefaultSpinUs, oversubscribed(layout.size)),
      chan_spin_(options.spin_us >= 0 ? options.spin_us : kDefaultSpinUs, oversubscribed(layout.size)),
      may_move_(options.move_off_shared_cpu && !coll_spin_.yield_only()),
      send_mu_(layout.size),
      recv_mu_(layout.size) {}

int Group::note_cpu() { return note_cpu_in(arrive(rank_)->cpu); }

bool Group::move_off_stacked_peer() {
  if (!may_move_) return false;
  const long long now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now().time_since_epoch()).count();
  long long last = last_move_ns_.load(std::memory_order_relaxed);
  if (last != 0 && now - last < kMoveIntervalNs) return false;
  if (!last_move_ns_.compare_exchange_strong(last, now, std::memory_order_relaxed)) return false;
  std::vector<std::int32_t> taken;
  for (int k = 0; k < size_; ++k) {
    if (k != rank_) taken.push_back(arrive(k)->cpu.load(std::memory_order_relaxed));
  }
  if (!move_off_cpu(current_cpu(), taken.data(), static_cast<int>(taken.size()))) return false;
  note_cpu();
  moves_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

int Group::attached() const { return static_cast<int>(header()->attached.load(std::memory_order_acquire)); }

Arrival* Group::arrive(int rank) const {
  return reinterpret_cast<Arrival*>(segment_.data() + layout_.arrive_off) + rank;
}

ChanCtl* Group::chan(int src, int dst) const {
  return reinterpret_cast<ChanCtl*>(segment_.data() + layout_.chan_ctl_off) + layout_.pair(src, dst);
}

char* Group::slot(int rank, int index) const {
  const std::size_t slot_index = static_cast<std::size_t>(rank) * kCollSlots + index;
  return segment_.data() + layout_.coll_off + slot_index * layout_.slot_bytes;
}

char* Group::ring(int src, int dst, std::uint64_t chunk) const {
  const std::size_t index = static_cast<std::size_t>(layout_.pair(src, dst)) * kChanSlots + chunk % kChanSlots;
  return segment_.data() + layout_.ring_off + index * layout_.chan_bytes;
}

// Publishes this rank's arrival at the next barrier, then waits for every other rank's.
void Group::arrive_and_wait(Op& op) {
  const std::uint32_t epoch = ++epoch_;
  note_cpu();
  publish(arrive(rank_)->flag, epoch);
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    wait_flag(arrive(j)->flag, j, [&](std::uint32_t v) { return flag_distance(v, epoch) >= 0; }, op, coll_spin_, [&] {
      std::vector<int> late;
      for (int k = 0; k < size_; ++k) {
        if (k != rank_ && flag_distance(arrive(k)->flag.value.load(std::memory_order_acquire), epoch) < 0) late.push_back(k);
      }
      return describe_ranks(late) + " to arrive";
    });
  }
}

void Group::barrier(double timeout_s) {
  std::lock_guard<std::mutex> lock(coll_mu_);
  Op op("barrier", timeout_s);
  check_usable(op);
  if (size_ == 1) return;
  const CallSig call{CallKind::barrier, 0, 0, 1};
  arrive_and_check(next_slot(), call, op);
}

void Group::arrive_step(int index, const CallSig& call, Op& op) {
  if (op.chunk == 0) {
    arrive_and_check(index, call, op);
  } else {
    arrive_and_wait(op);
  }
}

CallSig* Group::call_sig(int rank, int index) const { return &arrive(rank)->calls[index]; }

// The call is written before the barrier publishes it, read by the peers after that barrier
// and rewritten only kCollSlots steps later, exactly like the slot's data.
void Group::arrive_and_check(int index, const CallSig& call, Op& op) {
  *call_sig(rank_, index) = call;
  arrive_and_wait(op);
  std::string others;
  for (int j = 0; j < size_; ++j) {
    const CallSig theirs = *call_sig(j, index);
    if (j != rank_ && theirs != call) others += "; group rank " + std::to_string(j) + " called " + theirs.describe();
  }
  if (others.empty()) return;
  const std::string message = "the ranks made different collective calls: this rank (group rank " +
                              std::to_string(rank_) + ") called " + call.describe() + others +
                              ". Every rank of a group must make the same collective calls, in the same order, with "
                              "the same sizes, dtypes and reduce op";
  mark_broken(message);
  throw Error(std::string(op.name) + ": " + message);
}

// At the start of every call: fail at once when this rank already failed, or when a peer
// gave up (its peers must not wait out a timeout of their own to learn that).
void Group::check_usable(const Op& op) {
  if (is_broken_.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(broken_mu_);
    throw Error(std::string(op.name) + " on an unusable group: " + broken_ + "; create a new communicator");
  }
  check_abort(op);
}

void Group::check_abort(const Op& op) {
  const int who = header()->abort_rank.load(std::memory_order_acquire);
  if (who < 0 || who == rank_) return;
  const char* text = header()->abort_reason;
  const std::string reason(text, strnlen(text, kReasonBytes));
  const std::string message = "group rank " + std::to_string(who) + " gave up (" + reason + "), so " + op.where() +
                              " cannot complete";
  mark_broken(message);
  throw Aborted(message);
}

void Group::timed_out(const Op& op, const std::string& waiting_for) {
  char seconds[32];
  std::snprintf(seconds, sizeof seconds, "%.3g", op.deadline.elapsed_s());
  const std::string message = op.where() + " waited " + seconds + " s for " + waiting_for;
  Header* h = header();
  std::uint32_t unclaimed = 0;
  if (h->abort_claim.compare_exchange_strong(unclaimed, 1, std::memory_order_acq_rel)) {
    const std::string reason = "rank " + std::to_string(rank_) + ": " + message;
    std::strncpy(h->abort_reason, reason.c_str(), kReasonBytes - 1);
    h->abort_rank.store(rank_, std::memory_order_release);
  }
  mark_broken("it timed out earlier: " + message);
  throw Timeout(message);
}

void Group::mark_broken(const std::string& reason) {
  std::lock_guard<std::mutex> lock(broken_mu_);
  if (broken_.empty()) broken_ = reason;
  is_broken_.store(true, std::memory_order_release);
}

std::string Group::describe_ranks(const std::vector<int>& ranks) const {
  std::string text = ranks.size() == 1 ? "group rank " : "group ranks [";
  std::string exited;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(ranks[i]);
    const int pid = header()->pids[ranks[i]];
    if (process_exited(pid)) {
      exited += (exited.empty() ? "" : ", ") + std::to_string(ranks[i]) + " (pid " + std::to_string(pid) + ")";
    }
  }
  if (ranks.size() != 1) text += "]";
  if (!exited.empty()) text += "; rank " + exited + " is no longer running";
  return text;
}

}  // namespace plait::shm
