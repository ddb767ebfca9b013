"""Pieces every tensor-parallel module shares: which communicator, input checks, init."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..comm import Communicator
from ..mesh import current_mesh

OVERLAP_MODES = ("auto", "none", "chunked", "fused")


def resolve_comm(group=None) -> Communicator:
    """The communicator for ``group``: a Communicator as is, a ProcessGroup wrapped,
    or None: the TP axis of :func:`plait.init_mesh`'s mesh, else WORLD."""
    if isinstance(group, Communicator):
        return group
    if group is None:
        mesh = current_mesh()
        if mesh is not None:
            return mesh.tp_comm
        return Communicator.create("torch", None, name="world")
    return Communicator.create("torch", group)


def check_overlap(overlap: str) -> str:
    """Validate an ``overlap`` argument (what "fused" needs is checked per input: :func:`plait.tp.fused.check_fused`)."""
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"unknown overlap {overlap!r}; use one of {OVERLAP_MODES}")
    return overlap


def resolve_overlap(overlap: str, comm: Communicator, device: torch.device) -> str:
    """The mode that runs for an input on ``device``.

    "auto" is "chunked" on CUDA with more than one rank, else "none". On CPU
    the collectives (gloo) need the very cores the GEMMs use, so there is no
    idle resource to overlap into: bench/tp_layers.py measured chunked at
    0.83x-1.10x of none on a 2-core machine, no consistent gain. On CUDA
    the collective runs on its own stream and SMs while the GEMM runs.
    "fused" (CUDA, plait's IPC communicator) is never chosen automatically: it has
    not yet been measured against "chunked" on a GPU (bench/tp_layers.py).
    """
    if overlap == "auto":   # the device first: every decode step asks, and ``comm.size`` is a call chain
        return "chunked" if device.type == "cuda" and comm.size > 1 else "none"
    if overlap == "fused" and device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return "chunked"   # the fused Triton GEMMs do not follow autocast; torch's GEMMs in "chunked" do
    return overlap


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, or a ValueError saying how to fix a remainder."""
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by the TP size {denominator}; "
                         f"choose {what} as a multiple of {denominator} or a TP size that divides it")
    return numerator // denominator


def _under_autocast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (devices autocast does not know never are)."""
    if not (x.is_floating_point() and weight.is_floating_point()):
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        return False


def check_input(module: str, x: torch.Tensor, features: int, weight: torch.Tensor) -> None:
    """Reject an input whose last dim, dtype or device does not fit ``weight``, before any collective."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{module}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != features:
        raise ValueError(f"{module}: input shape {list(x.shape)} does not end in {features} features; "
                         f"inputs are [..., {features}]")
    if x.dtype != weight.dtype and not _under_autocast(x, weight):   # autocast's GEMM casts both operands
        raise ValueError(f"{module}: input dtype {x.dtype} differs from the weight dtype {weight.dtype}; "
                         f"cast one of them (x.to({weight.dtype}) or layer.to({x.dtype}))")
    if x.device != weight.device:
        raise ValueError(f"{module}: input is on {x.device} but the weight is on {weight.device}; "
                         f"move one of them")


def init_full_linear(out_features: int, in_features: int, bias: bool, dtype, device
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias drawn exactly as ``nn.Linear`` draws them (same RNG calls, same order),
    so a layer built under a seed shards the very matrix ``nn.Linear`` would have."""
    weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    full_bias = None
    if bias:
        full_bias = torch.empty(out_features, dtype=dtype, device=device)
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(full_bias, -bound, bound)
    return weight, full_bias
