"""Creating a group's shared-memory segment: the collective handshake of the shm backend.

1. every rank checks that all ranks share a host (one /dev/shm);
2. group rank 0 removes segments left by creators that died during their own set-up
   (:mod:`plait.comm.shm_reclaim`), creates the segment (mode 0600, memory reserved) under
   a new unique name carrying its pid and tells the others the name (or its error);
3. the others attach; every rank learns every rank's outcome;
4. the name is unlinked at once (the rank whose attach completes the group already did;
   every rank repeats it, which is harmless), so nothing stays in /dev/shm after the
   processes exit, however they exit. On any failure every rank unlinks and raises.
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


def same_host_or_raise(comm: TorchCommunicator, where: str) -> None:
    """Raise CommError unless every rank of comm's group runs on this host."""
    keys = hosts_of_group(comm)
    if len(set(keys)) > 1:
        raise CommError(f"{where}: the shm backend needs every rank on one host sharing /dev/shm, but the "
                        f"group spans several ({describe_hosts(keys)}); use Communicator.create('torch', group) "
                        f"or 'auto', which picks per group")


def open_group(comm: TorchCommunicator, config: ShmConfig):
    """Create (group rank 0) or attach to (the others) the group's segment: a plait._C.ShmGroup."""
    _C = shm_extension()
    where = comm.describe("shm setup")
    same_host_or_raise(comm, where)
    if comm.rank == 0:
        reclaim_stale_segments()
    mine = segment_name(comm.global_ranks) if comm.rank == 0 else ""
    name = mine
    group: Optional[object] = None
    error = ""
    try:
        if comm.rank == 0:
            try:
                group = _C.ShmGroup.create(mine, comm.size, config.slot_bytes, config.chan_bytes,
                                           config.oneshot_bytes, config.simd, config.spin_us, config.move)
            except (_C.ShmError, ValueError) as exc:
                error = str(exc)
        name = all_gather_text(comm, "!" + error if error else mine)[0]
        if name.startswith("!"):
            raise CommError(f"{where}: group rank 0 could not create the shared memory: {name[1:]}")
        if comm.rank != 0:
            try:
                group = _C.ShmGroup.attach(name, comm.rank, comm.size, config.simd, config.spin_us,
                                           config.move)
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
