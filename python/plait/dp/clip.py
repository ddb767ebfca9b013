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
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def check_max_norm(max_norm: float) -> None:
    """ValueError unless ``max_norm`` is a positive number (checked before any communication)."""
    if not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")


@torch.no_grad()
def clip_gradients(pairs: Sequence[tuple[torch.Tensor, torch.nn.Parameter]], max_norm: float,
                   comms: Sequence[Communicator], counted: Optional[Callable[[torch.nn.Parameter], bool]],
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Scale every gradient of ``pairs`` (gradient, the parameter it belongs to) so the L2 norm of
    all of them over ``comms`` is at most ``max_norm``; returns that norm (as ``dtype``).

    ``counted(param)`` False leaves a pair out of the norm on this rank. A rank with no pairs
    still joins the all-reduce (with 0), so no peer is left waiting; ``max_norm`` is checked
    before any communication.
    """
    check_max_norm(max_norm)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grad, param in pairs:
        if counted is None or counted(param):
            squares += grad.double().square().sum()
    norm = global_norm(squares, comms)
    scale = clip_scale(norm, max_norm)
    scales: dict[torch.dtype, torch.Tensor] = {}   # one cast per dtype, not one per gradient
    for grad, _ in pairs:
        if grad.dtype not in scales:
            scales[grad.dtype] = scale.to(grad.dtype)
        grad.mul_(scales[grad.dtype])
    return norm.to(dtype)


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float, comms: Sequence[Communicator] = (),
                    counted: Optional[Callable[[torch.nn.Parameter], bool]] = None) -> torch.Tensor:
    """Clip ``params``' gradients (complete on this rank, e.g. after a DP all-reduce) to the global
    norm over ``comms`` (the model-parallel groups); returns the norm before clipping. Parameters
    without a gradient count as zero (a rank may hold none and still takes part)."""
    params = list(params)
    if not params:
        raise ValueError("clip_grad_norm_: no parameters given")
    pairs = [(p.grad, p) for p in params if p.grad is not None]
    return clip_gradients(pairs, max_norm, comms, counted, params[0].device, params[0].dtype)
