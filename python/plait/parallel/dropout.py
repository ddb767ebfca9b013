"""Dropout that gives the same masks on every layout: counter-based, keyed, over the full logical tensor.

``torch.nn.Dropout`` draws from the process's generator, so its masks depend on how many
ranks share the work: two TP ranks holding the same (replicated) activation draw different
masks and their copies silently diverge (the bug Megatron's RNG tracker exists for), and a
(dp, pp, tp) layout never reproduces the one-process run. Here each element's keep/drop
decision is a pure function of

==========  =====================================================================
key part    meaning
==========  =====================================================================
seed        the job's seed (:attr:`DropoutScope.seed`)
step        the optimizer step (:attr:`DropoutScope.step`)
site        where in the model: a module name such as ``transformer.h.3.mlp.dropout``
            or ``layer3.attn_probs`` (global names: the same on every layout)
element     the element's index in the *full* tensor of the whole global batch:
            ``(global sample index) * (elements per sample) + index within the sample``
==========  =====================================================================

so a rank computes exactly the slice of the one-process mask it holds: its DP rows
(:attr:`DropoutScope.sample_offset`, the global index of the microbatch's first row), its
attention heads (``head_offset``), whatever the pipeline cut and microbatching. Replicated
activations get identical masks on every TP rank, and any layout gives the one-process
losses with dropout on.

The hash is Chris Wellons' ``lowbias32`` integer mix applied to 32-bit halves of the key and
counter, written with int64 tensor ops whose products never exceed 2**48 (no overflow, so
CPU and CUDA give the same bits). Kept elements are scaled by ``1 / (1 - p)`` as
``torch.nn.functional.dropout`` does.

The scope is a context variable: :func:`dropout_scope` sets it around a microbatch's forward
(``ParallelModel.pipeline`` does this), and activation recomputation restores the scope the
forward saw (:mod:`plait.train.recompute`), so recomputed masks equal the original ones.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class DropoutScope:
    """What keys the masks of one microbatch's forward (see the module docstring)."""

    seed: int = 0
    step: int = 0
    sample_offset: int = 0


_SCOPE: contextvars.ContextVar[Optional[DropoutScope]] = contextvars.ContextVar("plait_dropout_scope", default=None)


def current_scope() -> Optional[DropoutScope]:
    """The scope set by the innermost :func:`dropout_scope` (None outside any)."""
    return _SCOPE.get()


@contextlib.contextmanager
def dropout_scope(scope: Optional[DropoutScope]) -> Iterator[None]:
    """Key the dropout masks inside the block by ``scope``."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for x in [0, 2**32), in 16-bit pieces so no int64 product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective 32-bit integer hash with low bias (values in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(value: int) -> int:
    return int(_mix32(torch.tensor(value & _MASK32, dtype=torch.int64)))


def site_key(scope: DropoutScope, site: str) -> tuple[int, int]:
    """Two 32-bit words keying the masks of ``site`` within ``scope`` (seed and step mixed in)."""
    site_id = zlib.crc32(site.encode())
    a = _mix_int(scope.seed ^ _mix_int(scope.step ^ _mix_int(site_id)))
    b = _mix_int((scope.seed >> 32) ^ _mix_int((scope.step >> 32) ^ a ^ 0x9E3779B9))
    return a, b


def _hash32(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """A 32-bit hash (in int64) per int64 counter (>= 0), a pure function of (counter, key)."""
    lo, hi = counters & _MASK32, counters >> 32
    h = _mix32(lo ^ key[0])
    h = _mix32(h ^ hi ^ key[1])
    return _mix32(h ^ key[0])


def uniform(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """A uniform value in [0, 1) per int64 counter (>= 0): the hash / 2**32."""
    return _hash32(counters, key).to(torch.float64) * (1.0 / 2 ** 32)


def keep_mask(shape: torch.Size, per_sample_index: torch.Tensor, per_sample: int, p: float, site: str,
              device) -> torch.Tensor:
    """Boolean keep mask of a local tensor whose dim 0 is the batch.

    ``per_sample_index``: the index of each element of one local sample within the *full*
    sample (broadcastable to ``shape[1:]``); ``per_sample``: elements in one full sample.
    """
    scope = current_scope() or DropoutScope()
    rows = torch.arange(shape[0], dtype=torch.int64, device=device) + scope.sample_offset
    counters = rows.view(-1, *([1] * (len(shape) - 1))) * per_sample + per_sample_index.to(device)
    # uniform >= p, compared in integers (h / 2**32 is exact): no float64 tensor of the activations' size
    return _hash32(counters.expand(shape), site_key(scope, site)) >= math.ceil(p * 2 ** 32)


def apply_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with dropped elements zeroed and kept ones scaled by ``1 / (1 - p)``."""
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def dropout_whole(x: torch.Tensor, p: float, site: str) -> torch.Tensor:
    """Dropout of a tensor that holds whole samples (``[batch, ...]``, nothing of a sample split over ranks)."""
    per_sample = x[0].numel() if x.shape[0] else 0
    index = torch.arange(per_sample, dtype=torch.int64, device=x.device).view(x.shape[1:])
    return apply_dropout(x, keep_mask(x.shape, index, per_sample, p, site, x.device), p)


def dropout_heads(probs: torch.Tensor, p: float, site: str, head_offset: int, total_heads: int) -> torch.Tensor:
    """Dropout of attention probabilities ``[batch, local heads, queries, keys]`` holding heads
    ``[head_offset, head_offset + local heads)`` of ``total_heads``."""
    _, heads, queries, keys = probs.shape
    per_head = queries * keys
    head = torch.arange(head_offset, head_offset + heads, dtype=torch.int64, device=probs.device)
    within = torch.arange(per_head, dtype=torch.int64, device=probs.device).view(queries, keys)
    index = head.view(heads, 1, 1) * per_head + within
    keep = keep_mask(probs.shape, index, total_heads * per_head, p, site, probs.device)
    return apply_dropout(probs, keep, p)


class LayoutInvariantDropout(nn.Module):
    """Drop-in for ``nn.Dropout`` on activations that every rank holds whole per sample (after a
    row-parallel layer's all-reduce, embeddings): the mask is keyed by this module's name."""

    def __init__(self, p: float, site: str) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{site}: dropout probability must be in [0, 1), got {p}")
        self.p, self.site = float(p), site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return dropout_whole(x, self.p, self.site)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site!r}"
