"""plait.comm: one Communicator API over several backends.

``Communicator.create("torch", group)`` runs on ``torch.distributed`` (NCCL on
CUDA, gloo on CPU); ``"shm"`` runs CPU collectives between the processes of one
host through shared memory (csrc/shm/); ``"ipc"`` runs CUDA collectives between
the GPU processes of one node over CUDA IPC (csrc/cuda/ipc*); ``"hier"`` runs CPU collectives of a
group spanning hosts with shm inside each host and gloo between them; ``"auto"`` picks per group and per tensor
(see :mod:`plait.comm.auto`). Every operation is bounded by a timeout
(``PLAIT_TIMEOUT_S``, default 300 s) and fails with
:class:`~plait.errors.CommTimeoutError` naming the rank, group and operation.
"""
from __future__ import annotations

import torch.distributed as dist

from ..errors import CommError, CommTimeoutError
from .base import Communicator, DoneHandle, Handle
from .auto import AutoCommunicator
from .hier import HierCommunicator
from .ipc_backend import IpcCommunicator, ipc_local_status
from .shm_backend import ShmCommunicator
from .shm_setup import shm_status
from .torch_backend import TorchCommunicator, TorchHandle

__all__ = ["Communicator", "Handle", "DoneHandle", "TorchCommunicator", "TorchHandle", "ShmCommunicator",
           "IpcCommunicator", "AutoCommunicator", "HierCommunicator", "CommError", "CommTimeoutError", "available_backends"]


def available_backends() -> dict[str, tuple[bool, str]]:
    """Which communication backends this machine can use: name -> (usable, why)."""
    result: dict[str, tuple[bool, str]] = {}
    if not dist.is_available():
        result["torch"] = (False, "this torch build has no torch.distributed")
        return result
    engines = [name for name, ok in (("nccl", dist.is_nccl_available()),
                                     ("gloo", dist.is_gloo_available())) if ok]
    result["torch"] = (bool(engines), "torch.distributed with " + (", ".join(engines) or "no engine"))
    result["shm"] = shm_status()
    usable, why = ipc_local_status()
    result["ipc"] = (usable, "CUDA IPC between the GPU processes of one node (P2P checked per group)" if usable
                     else why)
    return result
