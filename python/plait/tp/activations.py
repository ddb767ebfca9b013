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


def _fused_kernel():
    """plait.kernels.fused_linear when Triton can run it on a GPU, else None (imported on first use)."""
    global _FUSED
    if _FUSED is None:
        try:
            from .. import kernels
        except ImportError:
            _FUSED = False
        else:
            _FUSED = kernels.fused_linear if kernels.HAVE_TRITON else False
    return _FUSED or None


_FUSED = None
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton GEMMs take


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the fused kernel computes what ``F.linear`` would here (device aside): one float dtype
    of its own for x, weight and bias, and no autocast, which would change F.linear's dtype while the
    kernel computes in the inputs' dtype (and rejects the mixed dtypes autocast allows)."""
    same_dtype = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    return x.dtype in FUSED_DTYPES and same_dtype and not torch.is_autocast_enabled(x.device.type)


def linear_activation(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: Optional[str]) -> torch.Tensor:
    """``activation(x @ weight.T + bias)``: one fused Triton kernel (forward and backward) on CUDA,
    ``F.linear`` plus the activation elsewhere (CPU, float64, mixed dtypes, autocast, no Triton).
    Same math either way."""
    if x.is_cuda and fusable(x, weight, bias):
        fused = _fused_kernel()
        if fused is not None:
            return fused(x, weight, bias, activation)
    return apply_activation(F.linear(x, weight, bias), activation)
