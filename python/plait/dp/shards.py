"""ZeRO-1's layout: flat parameter buffers and this rank's slice of each, cut at parameter boundaries.

Every gradient bucket (padded to a multiple of ``dp`` elements) gets a flat
parameter buffer of the same layout, and its parameters become views into it.
DP rank ``r`` owns elements ``[r*s, (r+1)*s)`` of each buffer, ``s = len/dp``.
That range is cut where parameters begin and end into :class:`Piece` s, each a
1-D view of the buffer (so updating a piece updates the model), and it is these
pieces the wrapped optimizer sees, not one big flat tensor: its temporaries then
stay as small as the plain optimizer's (at most one parameter), and each piece
knows its parameter (for clipping that counts replicated parameters once).
Padding inside the range is a piece of its own, with no parameter, whose
gradient is always zero: it keeps every rank's pieces covering the whole range.

Example, a bucket of parameters a (5 elements) and b (2), dp = 2: padded to 8,
``s = 4``; rank 0 has pieces a[0:4]; rank 1 has a[4:5], b[0:2], padding[7:8].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .buckets import Bucket


@dataclass
class Piece:
    """Elements ``[lo, hi)`` of bucket ``bucket``'s flat buffer: part of ``param``, or padding if None."""

    bucket: int
    lo: int
    hi: int
    param: Optional[nn.Parameter]
    tensor: nn.Parameter  # the view the optimizer updates


@torch.no_grad()
def flatten_params(bucket: Bucket) -> torch.Tensor:
    """A flat buffer laid out like the bucket's gradients; each parameter becomes a view into it.

    The parameter objects stay the same (hooks, optimizers, module attributes
    keep working); only their storage moves (``param.data``).
    """
    flat = torch.zeros_like(bucket.buffer)
    for i, param in enumerate(bucket.params):
        view = flat[bucket.offsets[i]:bucket.offsets[i] + param.numel()].view_as(param)
        view.copy_(param.detach())
        param.data = view
    return flat


def shard_range(bucket: Bucket, rank: int, size: int) -> tuple[int, int]:
    """The elements ``[lo, hi)`` of the bucket's buffer that DP rank ``rank`` of ``size`` owns."""
    per_rank = bucket.buffer.numel() // size
    return rank * per_rank, (rank + 1) * per_rank


def shard_pieces(bucket: Bucket, flat: torch.Tensor, rank: int, size: int) -> list[Piece]:
    """This rank's range of ``flat`` cut at parameter boundaries, in order, covering it exactly."""
    lo, hi = shard_range(bucket, rank, size)
    bounds = [(bucket.offsets[i], bucket.offsets[i] + p.numel(), p) for i, p in enumerate(bucket.params)]
    bounds.append((bucket.numel, bucket.buffer.numel(), None))  # the padding
    pieces = []
    for start, end, param in bounds:
        a, b = max(start, lo), min(end, hi)
        if a < b:
            pieces.append(Piece(bucket.index, a, b, param, nn.Parameter(flat[a:b])))
    return pieces
