"""The KV cache of one rank: keys and values of its layers and heads, in fixed-size blocks.

A request holds a **block table**, the ids of the blocks that keep its positions in order:
position ``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``. Blocks
are handed out and taken back by the leader (:mod:`plait.serve.blocks`), so the memory a
request holds grows with its tokens, and requests with the same prompt prefix can share the
blocks of that prefix. Every rank of a replica receives the same tables in the step message,
so every rank's cache has the same layout.

=========  =====================================================================
tensor     shape
=========  =====================================================================
``k, v``   ``[layers on this rank, blocks, block_size, local KV heads, head_dim]``
=========  =====================================================================

Local KV heads are the ones this TP rank's query heads read (replicated KV heads appear on
every rank that reads them, as in the parallel model).

The attention of a step talks to the cache through two methods, called by
:meth:`plait.serve.forward.CachedStep.keys_values` (the seam plait's attention function uses):
``write(layer, placement, k, v)`` stores the step's new keys and values (the real tokens of
every row), then ``read(layer, tables, num_keys)`` gives each row its keys and values
``[rows, heads, num_keys, head_dim]`` in position order, to be masked with the step's mask
(:meth:`plait.serve.forward.StepInputs.attention_mask`). A step's keys are written before any
row reads in the same layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold ``positions`` positions."""
    return -(-positions // block_size)


@dataclass(frozen=True)
class Placement:
    """Where a step's real tokens go in the cache: found once per step, since every layer writes the same
    places. Token ``(rows[i], cols[i])`` of the step goes to block ``blocks[i]``, offset ``offsets[i]``."""

    rows: torch.Tensor
    cols: torch.Tensor
    blocks: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def of(cls, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, block_size: int) -> "Placement":
        """From each row's block table ``[batch, width]``, and ``positions`` and ``valid`` ``[batch, seq]``."""
        rows, cols = valid.nonzero(as_tuple=True)
        at = positions[rows, cols]
        return cls(rows, cols, tables[rows, at // block_size], at % block_size)

    def to(self, device) -> "Placement":
        return Placement(*(t.to(device) for t in (self.rows, self.cols, self.blocks, self.offsets)))


class KVCache:
    """Keys and values of ``num_layers`` layers in ``num_blocks`` blocks of ``block_size`` positions; ``max_len``
    is the most positions one request may hold (the model's context, or less)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device) -> None:
        if min(num_blocks, block_size, max_len) < 1:
            raise ValueError(f"a KV cache needs blocks, block_size and max_len >= 1, got {num_blocks}, "
                             f"{block_size} and {max_len}")
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.max_len = num_blocks, block_size, max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def write(self, layer: int, where: Placement, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ``[batch, kv_heads, seq, head_dim]`` of the real tokens at ``where``."""
        self.k[layer][where.blocks, where.offsets] = k.transpose(1, 2)[where.rows, where.cols]
        self.v[layer][where.blocks, where.offsets] = v.transpose(1, 2)[where.rows, where.cols]

    def read(self, layer: int, tables: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[rows, kv_heads, num_keys, head_dim]`` of positions ``[0, num_keys)`` of each row's
        block table ``[rows, width]`` (positions past a row's own are whatever its table points at: mask them)."""
        used = blocks_for(num_keys, self.block_size)
        ids = tables[:, :used].reshape(-1)
        rows = tables.shape[0]

        def gather(store: torch.Tensor) -> torch.Tensor:
            blocks = store[layer].index_select(0, ids)                     # [rows * used, block, heads, dim]
            keys = blocks.view(rows, used * self.block_size, *blocks.shape[2:])[:, :num_keys]
            return keys.transpose(1, 2)

        return gather(self.k), gather(self.v)
