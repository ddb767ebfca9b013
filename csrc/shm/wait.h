// Bounded waiting on shared-memory flags.
//
// A Flag is a 32-bit counter (compared with wrap-around, so it never overflows) that one
// rank publishes and others wait on. A wait has three phases (docs/shm-wait.md has the
// measurements behind them):
//   1. spin with the CPU's pause instruction: ranks on their own cores see a peer's
//      store within a fraction of a microsecond;
//   2. spin with sched_yield: a rank that shares its core with the rank it waits for
//      hands the core over at once (and costs a system call per check when it does not);
//   3. sleep in the kernel on the flag (a futex on the shared page), woken by the
//      publisher: an idle rank costs nothing. Sleeps last at most a slice, so the caller
//      can check its deadline and the group's abort flag.
// How long phases 1 and 2 last together (the spin budget) is learned from recent waits by
// SpinPolicy. Phase 1 is skipped when the group has more ranks than the CPUs it may use, and
// cut short when the rank waited for last ran on the waiter's own CPU: it cannot run while
// the waiter spins there (two ranks put on one core by other load on the machine).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace plait::shm {

constexpr std::size_t kFlagBlock = 128;  // flags sit in their own 128-byte blocks: no false sharing

// Eight bytes: the block holding it is laid out by its owner (layout.h), so a flag can carry
// data its readers need in the same cache line.
struct Flag {
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

// Most microseconds a wait spins (phases 1 and 2) before it sleeps, by default.
constexpr int kDefaultSpinUs = 1000;

// Whether a group of `ranks` processes has more ranks than the CPUs this process may run on.
bool oversubscribed(int ranks);

// The spin budget of one kind of wait (collectives, or send/recv), learned like an adaptive
// mutex's: a wait that ended while spinning keeps the budget at least twice its length; one
// that had to sleep but ended within the cap would have been served by spinning, so the
// budget grows to twice that wait (at least doubling); one that outlasted the cap (an idle
// rank, a peer busy computing) halves it, so a rank that mostly waits long soon sleeps at
// once and burns no CPU, and one that waits in short bursts spins again after one sleep.
// Thread-safe (relaxed atomics: the budget is a hint, never a correctness matter).
class SpinPolicy {
 public:
  // cap_us: the most the budget may grow to (0: never spin). yield_only: skip the pause phase.
  SpinPolicy(int cap_us, bool yield_only);
  long long budget_ns() const { return budget_ns_.load(std::memory_order_relaxed); }
  // Of a wait with this budget, the nanoseconds spent spinning with pause before yielding.
  long long pause_ns(long long budget_ns) const { return budget_ns < pause_cap_ns_ ? budget_ns : pause_cap_ns_; }
  void learn(long long waited_ns, bool slept);
  int cap_us() const { return static_cast<int>(cap_ns_ / 1000); }
  // Whether ranks outnumber CPUs, so that they must take turns on a core (see spin_on).
  bool yield_only() const { return pause_cap_ns_ == 0; }

 private:
  long long cap_ns_;
  long long pause_cap_ns_;
  std::atomic<long long> budget_ns_;
};

// How phases 1 and 2 of a wait ended.
enum class SpinEnd {
  ready,    // the flag became ready
  spent,    // the spin budget ran out
  stacked,  // the publisher last ran on this thread's CPU, so it cannot run while this thread spins
};

// Phases 1 and 2 of a wait: spin with pause until pause_end, then with sched_yield until
// spin_end, while ready(flag value) does not hold; `seen` is the last value read. Every 64
// reads the waiter reads its CPU, records it in *my_cpu unless my_cpu is null (its peers' hint,
// so a rank that migrated while it waited is not mistaken for one still on its old CPU; only
// one kind of wait per rank should record, or threads of one rank on different CPUs would
// overwrite each other's hint in the line peers spin on), and compares it with peer_cpu,
// the CPU the publisher last ran on. When they are equal the peer cannot run while this
// thread spins: the pause phase ends at once, and unless yield_on_shared_cpu (ranks outnumber
// CPUs and must take turns) the spin ends with `stacked`, so the caller can move this thread
// to a free CPU (move_off_cpu) or sleep on the flag.
template <typename Ready>
SpinEnd spin_on(const Flag& flag, Ready ready, std::uint32_t& seen, std::chrono::steady_clock::time_point pause_end,
                std::chrono::steady_clock::time_point spin_end, const std::atomic<std::int32_t>& peer_cpu,
                std::atomic<std::int32_t>* my_cpu, bool yield_on_shared_cpu);

// Moves the calling thread to a CPU it may run on other than `from` and those in `taken`
// (the CPUs its peers last ran on; the first such CPU after `from`, cyclically), then gives it
// back the allowed set it had: the scheduler leaves a running thread where it is, so the thread
// stays on the new CPU. Since Linux 6.2, setting a thread's affinity also records it as the
// thread's request, so a thread that moved keeps the set it had at that moment if its cpuset
// later grows (PLAIT_SHM_MOVE=0 turns moving off). Used when two
// ranks of a group with a core each end up queued on one core (the scheduler's wake-up
// placement after other traffic, such as TCP, can put them there for milliseconds): one
// sched_setaffinity pair ends that at once. Returns false when no such CPU is free or the
// system refuses the move (nothing changed), or, rarely, refuses to restore the set (the
// cpuset shrank in between; the thread then stays on the new CPU only).
bool move_off_cpu(int from, const std::int32_t* taken, int n_taken);

// The CPU this thread runs on now, or -1 when unknown.
int current_cpu();

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Gives the CPU to another runnable thread, if there is one (sched_yield).
void yield_cpu();

// Records this thread's CPU in `slot` (a store only when it changed: peers read the line) and returns it.
inline int note_cpu_in(std::atomic<std::int32_t>& slot) {
  const int cpu = current_cpu();
  if (slot.load(std::memory_order_relaxed) != cpu) slot.store(cpu, std::memory_order_relaxed);
  return cpu;
}

template <typename Ready>
SpinEnd spin_on(const Flag& flag, Ready ready, std::uint32_t& seen, std::chrono::steady_clock::time_point pause_end,
                std::chrono::steady_clock::time_point spin_end, const std::atomic<std::int32_t>& peer_cpu,
                std::atomic<std::int32_t>* my_cpu, bool yield_on_shared_cpu) {
  for (unsigned i = 0;; ++i) {  // reading the clock costs tens of pause instructions: check it every 64
    if ((i & 63) == 0) {
      const int cpu = my_cpu != nullptr ? note_cpu_in(*my_cpu) : current_cpu();
      if (cpu >= 0 && peer_cpu.load(std::memory_order_relaxed) == cpu) {
        if (!yield_on_shared_cpu) return SpinEnd::stacked;
        break;
      }
      if (std::chrono::steady_clock::now() >= pause_end) break;
    }
    cpu_relax();
    seen = flag.value.load(std::memory_order_acquire);
    if (ready(seen)) return SpinEnd::ready;
  }
  while (std::chrono::steady_clock::now() < spin_end) {
    yield_cpu();
    seen = flag.value.load(std::memory_order_acquire);
    if (ready(seen)) return SpinEnd::ready;
  }
  return SpinEnd::spent;
}

}  // namespace plait::shm
