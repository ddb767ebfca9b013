"""Gradient clipping by the global L2 norm when the gradients are spread over ranks.

``torch.nn.utils.clip_grad_norm_`` sees only this process's tensors. With TP and
PP each rank holds part of the model, and with ZeRO-1 part of each gradient, so
the squares are summed locally and then all-reduced over the groups that split
the model. A parameter replicated over one of those groups (a TP layer norm)
must be counted on one rank of it only: ``counted(param)`` says where.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..comm import Communicator


def global_norm(squares: torch.Tensor, comms: Sequence[Communicator]) -> torch.Tensor:
    """The square root of ``squares`` (a float64 scalar, this rank's sum of squares) summed over ``comms``."""
    for comm in comms:
        squares = comm.all_reduce(squares, op="sum")
    return squares.sqrt()


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor torch's clip_grad_norm_ multiplies by: ``max_norm / (norm + 1e-6)``, at most 1."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float, comms: Sequence[Communicator] = (),
                    counted: Optional[Callable[[torch.nn.Parameter], bool]] = None) -> torch.Tensor:
    """Clip ``params``' gradients (complete on this rank, e.g. after a DP all-reduce) to the global
    norm over ``comms`` (the model-parallel groups); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        raise ValueError("clip_grad_norm_: no parameter has a gradient")
    squares = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
    for param in params:
        if counted is None or counted(param):
            squares += param.grad.double().square().sum()
    norm = global_norm(squares, comms)
    scale = clip_scale(norm, max_norm)
    for param in params:
        param.grad.mul_(scale.to(param.grad.dtype))
    return norm.to(params[0].dtype)
