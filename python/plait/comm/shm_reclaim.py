"""Reclaiming shared-memory segments whose creator died during set-up.

A group's segment is named while its ranks attach and unlinked as soon as they have (see
:mod:`plait.comm.shm_setup`), so a normal exit, or any failure the set-up sees, leaves
nothing in /dev/shm. Only a creator killed between making the segment and unlinking it
(SIGKILL, the OOM killer, a power cut of the process) can leave a name behind. Names carry
the creator's pid (:func:`~plait.comm.shm_config.segment_name`), and every new group's
creator first removes the plait segments whose creator is no longer running.

Safe because: a live creator's segment is never touched (a reused pid only delays the
removal until that process ends too); unlinking a name never disturbs a mapping, so even a
group whose peers still use the segment keeps working; and only names in plait's own format
are considered. (Processes in another pid namespace sharing this /dev/shm would look dead:
such a set-up is not supported.)
"""
from __future__ import annotations

import os
from pathlib import Path

from .shm_config import SEGMENT_PREFIX, creator_pid

SHM_DIR = Path("/dev/shm")


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended: no such process, or a zombie not yet reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, under another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def reclaim_stale_segments(directory: Path = SHM_DIR) -> list[str]:
    """Remove the plait segments in ``directory`` whose creator has ended; their names."""
    removed = []
    try:
        entries = list(directory.glob(f"{SEGMENT_PREFIX}*"))
    except OSError:
        return removed
    for path in entries:
        pid = creator_pid(path.name)
        if pid is None or pid == os.getpid() or not process_gone(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # another job reclaimed it first
        except OSError:
            continue  # another user's: theirs to remove
        removed.append(path.name)
    return removed
