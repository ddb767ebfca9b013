"""Creating a group's shared-memory segment: the collective handshake of the shm backend.

1. every rank checks that all ranks of its segment share a host (one /dev/shm);
2. the segment's first rank removes segments left by creators that died during their own set-up
   (:mod:`plait.comm.shm_reclaim`), creates the segment (mode 0600, memory reserved) under
   a new unique name carrying its pid and tells the others the name (or its error);
3. the others attach; every rank learns every rank's outcome;
4. the name is unlinked at once (the rank whose attach completes the group already did;
   every rank repeats it, which is harmless), so nothing stays in /dev/shm after the
   processes exit, however they exit. On any failure every rank unlinks and raises.

A group spanning hosts may open one segment per host in one handshake (``members``: the
group ranks sharing this rank's segment); the exchanges then run over the whole group, so a
failure on any host raises on every rank alike.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

from ..errors import CommError
from .rendezvous import all_gather_text, describe_hosts, hosts_of_group
from .shm_config import ShmConfig, segment_name
from .shm_reclaim import reclaim_stale_segments
from .torch_backend import TorchCommunicator


def shm_extension():
    """plait._C when it has the shared-memory collectives, else raise CommError saying why."""
    try:
        from plait import _C
    except ImportError as exc:
        raise CommError(f"the shm backend needs plait's compiled extension plait._C, which did not import "
                        f"({exc}); rebuild with `make build` or `pip install -e .`") from exc
    if not hasattr(_C, "ShmGroup"):
        raise CommError("this build of plait._C has no shared-memory collectives; rebuild plait")
    return _C


def shm_status() -> tuple[bool, str]:
    """Whether the shm backend can run here (plait._C built with it, /dev/shm writable), and why."""
    try:
        _C = shm_extension()
    except CommError as exc:
        return False, str(exc)
    if not os.access("/dev/shm", os.W_OK):
        return False, "/dev/shm is missing or not writable"
    free_mib = shutil.disk_usage("/dev/shm").free >> 20
    return True, (f"CPU collectives through /dev/shm ({free_mib} MiB free), reductions with "
                  f"{_C.shm_simd_levels()[-1]}")


def same_host_or_raise(comm: TorchCommunicator, where: str, members: Optional[list[int]] = None) -> None:
    """Raise CommError unless every rank of comm's group (or of ``members``, its group ranks) runs on this host."""
    keys = hosts_of_group(comm)
    mine = [keys[m] for m in members] if members is not None else keys
    if len(set(mine)) > 1:
        raise CommError(f"{where}: the shm backend needs every rank on one host sharing /dev/shm, but the "
                        f"group spans several ({describe_hosts(keys)}); use Communicator.create('torch', group) "
                        f"or 'auto', which picks per group")


def open_group(comm: TorchCommunicator, config: ShmConfig, members: Optional[list[int]] = None):
    """Create (the segment's first rank) or attach to (the others) this rank's segment: a plait._C.ShmGroup.

    ``members`` (group ranks of ``comm``, this rank among them; default all) share one segment;
    every rank of the group calls this at once with its own members, the groups of members
    partitioning the group. A rank alone in its members takes part in the exchanges and gets None
    (it needs no segment).
    """
    _C = shm_extension()
    where = comm.describe("shm setup")
    members = list(range(comm.size)) if members is None else members
    same_host_or_raise(comm, where, members)
    local, leader = members.index(comm.rank), members[0]
    creates = local == 0 and len(members) > 1
    if creates:
        reclaim_stale_segments()
    mine = segment_name([comm.global_ranks[m] for m in members]) if creates else ""
    name = mine
    group: Optional[object] = None
    error = ""
    try:
        if creates:
            try:
                group = _C.ShmGroup.create(mine, len(members), config.slot_bytes, config.chan_bytes,
                                           config.oneshot_bytes, config.simd, config.spin_us, config.move)
            except (_C.ShmError, ValueError) as exc:
                error = str(exc)
        names = all_gather_text(comm, "!" + error if error else mine)
        failed = {r: text[1:] for r, text in enumerate(names) if text.startswith("!")}
        if failed:
            detail = "; ".join(f"group rank {r}: {text}" for r, text in failed.items())
            raise CommError(f"{where}: creating the shared memory failed on {detail}")
        name = names[leader]
        if name and not creates:
            try:
                group = _C.ShmGroup.attach(name, local, len(members), config.simd, config.spin_us, config.move)
            except (_C.ShmError, ValueError) as exc:
                error = str(exc)
        outcomes = all_gather_text(comm, error)
        failed = {r: text for r, text in enumerate(outcomes) if text}
        if failed:
            detail = "; ".join(f"group rank {r}: {text}" for r, text in failed.items())
            raise CommError(f"{where}: attaching to the shared memory failed on {detail}")
    finally:
        for created in {mine, name}:
            if created.startswith("/"):
                _C.shm_unlink(created)  # ignores a name already gone
    return group
