"""DeepSpeed's shared-memory all-reduce as a peer in bench/comm.py.

DeepSpeed's CPU tensor parallelism reduces through ``deepspeed.comm.inference_all_reduce``,
which calls its C++ shared-memory op (``torch.ops.deepspeed.inference_all_reduce_``, built
with ninja on first use) when the env ``LOCAL_SIZE`` equals the world size and the CPU has
the vector instructions its kernel needs: AVX2 for float32, AVX-512BW for bfloat16 and
float16. Otherwise it falls back to ``torch.distributed.all_reduce`` (gloo); :meth:`path`
says which one a dtype takes here, and the benchmark records it beside each number.

DeepSpeed never removes its shared-memory buffers (``/dev/shm/deepspeed_*``, named after
MASTER_ADDR and MASTER_PORT): :func:`remove_buffers` deletes one job's.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")


def available() -> bool:
    """Whether deepspeed is installed (importing it is slow: only look)."""
    return importlib.util.find_spec("deepspeed") is not None


class DeepSpeedAllReduce:
    """``deepspeed.comm.inference_all_reduce`` on the already initialised WORLD group (call on every rank)."""

    def __init__(self, world: int) -> None:
        os.environ["LOCAL_SIZE"] = str(world)  # what makes DeepSpeed use its shared-memory op
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.comm as dscomm
        from deepspeed.comm import comm as dscomm_state

        dscomm.init_distributed(dist_backend="gloo", verbose=False)
        self._all_reduce = dscomm.inference_all_reduce
        self._level = int(getattr(dscomm_state.cdb, "shm_vector_kernel_level", 0) or 0)
        self._has_op = hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")

    def path(self, dtype: torch.dtype) -> str:
        """"shm" when DeepSpeed reduces ``dtype`` with its shared-memory op here, else why not."""
        if not self._has_op:
            return "gloo (its shm op did not build)"
        if self._level >= (1 if dtype == torch.float32 else 2):
            return "shm"
        return "gloo (its shm kernel needs " + ("AVX2" if dtype == torch.float32 else "AVX-512BW") + ")"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._all_reduce(tensor)
        return tensor


def remove_buffers(addr: str, port: int) -> list[str]:
    """Delete the /dev/shm buffers DeepSpeed made for the job at ``addr:port``; their names."""
    removed = []
    for path in SHM_DIR.glob(f"deepspeed_*_{addr}_{port}_*"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
