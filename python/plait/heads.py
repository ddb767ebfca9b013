"""Which attention heads each TP rank holds: the one answer for the weight shards, the attention
modules' local head counts, the serving KV cache and the planner's cost model.

Query heads are split in contiguous blocks (tp must divide them: :func:`plait.config.head_misfit`).
With ``g = num_heads / num_kv_heads`` query heads per KV head and ``q = num_heads / tp`` query
heads per rank, a rank holds

==================  ==============================  =========================================
case                KV heads of rank r              example (heads, kv, tp)
==================  ==============================  =========================================
``q % g == 0``      its own block of ``kv / tp``    (8, 4, 2): ranks hold [0, 1], [2, 3]
``g % q == 0``      the one its query heads share   (8, 2, 4): ranks hold [0], [0], [1], [1]
otherwise           one per query head, repeated    (12, 3, 4): rank 1 holds [0, 1, 1]
==================  ==============================  =========================================

so every rank holds equally many KV heads and the rows of its shards gather. In the last two
cases KV heads are replicated across ranks (their gradients are summed over their holders).
Pure Python, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .config import head_misfit


class HeadDims(Protocol):
    """Anything that names a model's head counts (``ModelDims``, the planner's ``ModelSpec``...)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads of TP rank ``rank`` of ``tp``: its query heads and the KV heads they use (module doc)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    tp: int
    rank: int

    def __post_init__(self) -> None:
        reason = head_misfit(self.num_heads, self.num_kv_heads, self.tp)
        if reason:
            raise ValueError(reason)
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} is outside 0..{self.tp - 1}")

    @property
    def q_heads(self) -> range:
        per = self.num_heads // self.tp
        return range(self.rank * per, (self.rank + 1) * per)

    @property
    def kv_heads(self) -> list[int]:
        group, per = self.num_heads // self.num_kv_heads, self.num_heads // self.tp
        if per % group == 0:                     # whole groups: a plain split of the KV heads
            return list(range(self.rank * per // group, (self.rank + 1) * per // group))
        if group % per == 0:                     # inside one group: that group's KV head
            return [self.rank * per // group]
        return [q // group for q in self.q_heads]  # uneven: one KV head per query head

    @property
    def replicated_kv(self) -> bool:
        """True when some KV head is held by more than one rank (or twice by one)."""
        return self.num_kv_heads % self.tp != 0

    @property
    def kv_groups(self) -> int:
        """Query heads per local KV head (``num_key_value_groups`` on this rank)."""
        return len(self.q_heads) // len(self.kv_heads)

    def rows(self, heads: Sequence[int], offset: int = 0) -> list[int]:
        """Rows ``offset + h * head_dim + i`` of a projection holding ``heads`` (in order)."""
        return [offset + h * self.head_dim + i for h in heads for i in range(self.head_dim)]


def heads_for(dims: HeadDims, tp: int, rank: int) -> HeadLayout:
    """The heads TP rank ``rank`` of ``tp`` holds for a model of ``dims``."""
    return HeadLayout(dims.num_heads, dims.num_kv_heads, dims.head_dim, tp, rank)
