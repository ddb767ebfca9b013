"""Settings of the shared-memory backend, read from the environment, and segment names.

=========================  ===========  ====================================================
variable                   default      meaning
=========================  ===========  ====================================================
PLAIT_SHM_SLOT_BYTES       256 KiB      one collective slot per rank (x2, double-buffered);
                                        larger messages go in chunks of this size
PLAIT_SHM_CHANNEL_BYTES    256 KiB      one send/recv ring slot per ordered rank pair (x2)
PLAIT_SHM_ONESHOT_BYTES    64 KiB       all_reduce up to this size is one-shot, above two-shot
                                        (fp16 / bf16 values count as 4 bytes: reduced in fp32)
PLAIT_SHM_SIMD             auto         reduction code path: auto, avx512, avx2 or scalar
PLAIT_SHM_SPIN_US          auto         most microseconds a waiting rank spins (pause, then
                                        sched_yield) before it sleeps on the flag; the budget
                                        adapts below it (auto: 1000; 0: always sleep at once).
                                        See docs/shm-wait.md
PLAIT_SHM_MOVE             1            1: a waiting rank whose peer is queued on its own CPU
                                        moves itself to a free CPU (two sched_setaffinity
                                        calls; it keeps the allowed set it had then); 0: it
                                        only sleeps. See docs/shm-wait.md
PLAIT_SHM_JOB              creator pid  job token in segment names (/dev/shm/plait-JOB-pPID-...)
=========================  ===========  ====================================================

Sizes are rounded up to 4 KiB pages. The defaults shrink for large groups so a
segment stays under about 64 MiB of collective slots and 64 MiB of rings. Only the
creating rank's (group rank 0's) sizes count: the others read them from the segment.

Why these defaults (bench/comm.py, 2-core EPYC, 2 ranks): a 32 MB all-reduce took
3.8 ms with 256 KiB slots, 4.7 ms with 512 KiB and 8.9 ms with 1 MiB, because small
chunks stay in the caches the two cores share; one-shot and two-shot were within
noise of each other up to 64 KiB, and with 4 ranks one-shot was faster up to 64 KiB
and slower at 256 KiB. On the 2-core Intel Xeon (AVX-512), a bf16 all-reduce of 64 KB took 10.6-11.2 us
one-shot and 8.2-8.6 us two-shot (fp32: 8.4 against 8.8-9.4): one-shot makes every rank reduce the whole
message, in fp32, so 16-bit values count as 4 bytes against the threshold.
"""
from __future__ import annotations

import os
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Optional

PAGE = 4096
SEGMENT_PREFIX = "plait-"
_BUDGET = 64 << 20


def _bytes_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+)\s*([kKmMgG]?)i?[bB]?", raw)
    if match is None:
        raise ValueError(f"{name}={raw!r} is not a size; write bytes, or e.g. 256K, 4M")
    value = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _pages(value: int) -> int:
    return max(PAGE, (value + PAGE - 1) // PAGE * PAGE)


@dataclass(frozen=True)
class ShmConfig:
    """Sizes and code path for one shared-memory group (see the module docstring)."""

    slot_bytes: int
    chan_bytes: int
    oneshot_bytes: int
    simd: str
    spin_us: int = -1  # -1: decided by the compiled code from the group size and CPU count
    move: bool = True  # a waiter whose peer is queued on its own CPU may move to a free one

    def __post_init__(self) -> None:
        if self.simd not in ("auto", "avx512", "avx2", "scalar"):
            raise ValueError(f"PLAIT_SHM_SIMD={self.simd!r}: use auto, avx512, avx2 or scalar")

    @classmethod
    def from_env(cls, size: int) -> "ShmConfig":
        pairs = max(1, size * (size - 1))
        slot = _bytes_env("PLAIT_SHM_SLOT_BYTES", min(256 << 10, _BUDGET // (2 * size)))
        chan = _bytes_env("PLAIT_SHM_CHANNEL_BYTES", min(256 << 10, _BUDGET // (2 * pairs)))
        oneshot = _bytes_env("PLAIT_SHM_ONESHOT_BYTES", 64 << 10)
        simd = os.environ.get("PLAIT_SHM_SIMD", "auto").strip().lower() or "auto"
        spin = os.environ.get("PLAIT_SHM_SPIN_US", "auto").strip().lower() or "auto"
        if spin != "auto" and not spin.isdigit():
            raise ValueError(f"PLAIT_SHM_SPIN_US={spin!r}: write a number of microseconds or auto")
        move = os.environ.get("PLAIT_SHM_MOVE", "1").strip() or "1"
        if move not in ("0", "1"):
            raise ValueError(f"PLAIT_SHM_MOVE={move!r}: write 1 (move off a shared CPU) or 0 (only sleep)")
        return cls(slot_bytes=_pages(slot), chan_bytes=_pages(chan), oneshot_bytes=oneshot, simd=simd,
                   spin_us=-1 if spin == "auto" else int(spin), move=move == "1")


def job_token() -> str:
    """PLAIT_SHM_JOB, else this process's pid: shared by the segments one job creates."""
    raw = os.environ.get("PLAIT_SHM_JOB", "").strip() or str(os.getpid())
    return re.sub(r"[^A-Za-z0-9_.]", "_", raw)[:40]


def segment_name(global_ranks: list[int]) -> str:
    """A new, unique POSIX shm name for a group: /plait-JOB-pPID-gRANKS-RANDOM.

    PID is the creating process's: a name whose creator is gone is stale (see
    :func:`plait.comm.shm_reclaim.reclaim_stale_segments`).
    """
    ranks = "_".join(map(str, global_ranks))
    tag = ranks if len(ranks) <= 40 else f"{global_ranks[0]}x{len(global_ranks)}h{zlib.crc32(ranks.encode()):08x}"
    return f"/{SEGMENT_PREFIX}{job_token()}-p{os.getpid()}-g{tag}-{secrets.token_hex(6)}"


def creator_pid(name: str) -> Optional[int]:
    """The creator's pid in a segment name made by :func:`segment_name` (with or without the
    leading slash), else None (not a plait segment, or one from a build before pids in names)."""
    match = _NAME.fullmatch(name.lstrip("/"))
    return int(match.group(1)) if match else None


_NAME = re.compile(re.escape(SEGMENT_PREFIX) + r"[A-Za-z0-9_.]+-p(\d+)-g[0-9a-fx_h]+-[0-9a-f]+")
