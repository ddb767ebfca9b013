"""plait: data, pipeline and tensor parallelism for PyTorch, braided into one library.

    import plait
    mesh = plait.init_mesh(dp=2, pp=2, tp=2)
    layer = plait.ColumnParallelLinear(1024, 4096, activation="gelu")

Names are imported on first use (PEP 562), so ``plait plan`` and other torch-free
tools start without paying for ``import torch``. The compiled extension
``plait._C`` and the Triton kernels ``plait.kernels`` are likewise on demand,
so the pure-Python parts work without them.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import CommError, CommTimeoutError, PlaitError

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_NAMES = {
    "init_mesh": "mesh", "current_mesh": "mesh", "destroy_mesh": "mesh", "ParallelMesh": "mesh",
    "ColumnParallelLinear": "tp", "RowParallelLinear": "tp", "VocabParallelEmbedding": "tp",
    "vocab_parallel_cross_entropy": "tp", "PipelineEngine": "pp",
    "ParallelConfig": "config", "parallelize": "parallel", "ParallelModel": "parallel",
    "from_pretrained": "models.hf", "save_pretrained": "models.hf",
}
_SUBMODULES = ("comm", "dp", "models", "plan", "pp", "tp", "launch", "mesh", "config", "parallel", "plans")

__all__ = [*_LAZY_NAMES, *_SUBMODULES, "CommError", "CommTimeoutError", "PlaitError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
