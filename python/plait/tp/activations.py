"""Elementwise activations the parallel layers can apply to their output.

Column-parallel output is split along features, so an elementwise activation
can run on each shard with no communication. The fused Triton epilogues of
``plait.kernels`` implement the same functions under the same names.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,                                        # exact (erf) GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def check_activation(name: Optional[str]) -> Optional[str]:
    """Return ``name`` if it is None or a known activation, else raise ValueError."""
    if name is not None and name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use None or one of {sorted(ACTIVATIONS)}")
    return name


def apply_activation(x: torch.Tensor, name: Optional[str]) -> torch.Tensor:
    """``x`` passed through the activation called ``name`` (None: unchanged)."""
    return x if name is None else ACTIVATIONS[name](x)
