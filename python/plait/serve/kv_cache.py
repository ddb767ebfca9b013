"""The KV cache of one rank: preallocated keys and values of its layers and heads, in slots.

Each running request owns one slot (a row) until it finishes. A slot holds
``max_len`` positions of every local layer:

=========  =================================================
tensor     shape
=========  =================================================
``k, v``   ``[layers on this rank, slots, local KV heads, max_len, head_dim]``
=========  =================================================

Local KV heads are the ones this TP rank's query heads read (replicated KV heads
appear on every rank that reads them, as in the parallel model).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """Where a step's valid tokens go in the cache: found once per step, since every layer writes the same
    places. Token ``(rows[i], cols[i])`` of the step goes to slot ``slots[i]``, position ``positions[i]``."""

    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> "Placement":
        """From each row's table ``[batch, 1]`` (its slot), and ``positions`` and ``valid`` ``[batch, seq]``."""
        rows, cols = valid.nonzero(as_tuple=True)
        return cls(rows, cols, tables[:, 0][rows], positions[rows, cols])


class KVCache:
    """Keys and values of ``num_layers`` layers for ``slots`` requests of up to ``max_len`` positions."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device) -> None:
        if min(slots, max_len) < 1:
            raise ValueError(f"a KV cache needs slots >= 1 and max_len >= 1, got {slots} and {max_len}")
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def write(self, layer: int, where: "Placement", k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ``[batch, kv_heads, seq, head_dim]`` of the valid tokens at ``where``."""
        index = (where.slots, slice(None), where.positions)
        self.k[layer][index] = k.transpose(1, 2)[where.rows, where.cols]
        self.v[layer][index] = v.transpose(1, 2)[where.rows, where.cols]

    def read(self, layer: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, length, head_dim]`` of positions ``[0, length)`` of each row's
        slot (``tables[:, 0]``)."""
        slots = tables[:, 0]
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]


class SlotPool:
    """Which cache slots are free (rank 0's bookkeeping; the lowest free slot goes first)."""

    def __init__(self, slots: int) -> None:
        self.free = list(range(slots))
        self.size = slots

    def take(self) -> int:
        self.free.sort()
        return self.free.pop(0)

    def give(self, slot: int) -> None:
        if slot in self.free or not 0 <= slot < self.size:
            raise ValueError(f"slot {slot} is not in use")
        self.free.append(slot)

    @property
    def used(self) -> int:
        return self.size - len(self.free)
