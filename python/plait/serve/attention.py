"""The cached attention of one serving step: which tokens it runs, where they go, what each attends to.

A step runs rows (requests); row ``r`` brings ``lengths[r]`` new tokens starting at position
``starts[r]`` (a prompt chunk, or one token at decode). The new tokens of all rows are **packed**
into one sequence ``[1, tokens]`` for everything but attention, so a step mixing a long prompt
chunk with many one-token decodes computes no padding in its projections and MLPs:

=================  ====================  ================================================
name               shape                 meaning
=================  ====================  ================================================
``tables``         ``[batch, width]``    each row's KV-cache block table (:mod:`.kv_cache`)
``starts``         ``[batch]``           position of each row's first new token
``lengths``        ``[batch]``           its new tokens
``rows``           ``[tokens]``          the row of each packed token
``positions``      ``[tokens]``          the position of each packed token
``last``           ``[batch]``           packed index of each row's last new token
=================  ====================  ================================================

For attention the rows fall into at most two **groups**, one-token rows and longer rows, each
padded to its own longest row: a decode row never pays for a chunk's length. A group's ``mask``
``[rows, 1, seq, keys]`` lets a token see the cached positions up to its own (within the sliding
window, if any); padding queries see position 0 only, so no softmax row is empty, and their
outputs are dropped.

:func:`cached_attention` is the whole attention of one layer: write the step's keys and values
into the cache, then per group read each row's keys and values and attend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVCache, Placement


@dataclass(frozen=True)
class AttentionGroup:
    """Rows of a step that attend together, padded to ``seq`` new tokens: ``index`` ``[rows, seq]`` are their
    packed tokens (0 where ``valid`` is False), ``tables`` their block tables, ``num_keys`` the positions read."""

    tables: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    num_keys: int


class StepInputs:
    """Where each row of a step reads and writes (see the module docstring); built from CPU tensors, with
    every derived tensor moved to ``device``."""

    def __init__(self, tables: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, device=None) -> None:
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._cpu = (tables, starts, lengths)
        counts = lengths.tolist()
        rows = torch.repeat_interleave(torch.arange(len(counts)), lengths)
        first = torch.cumsum(lengths, 0) - lengths                       # packed index of each row's first token
        positions = starts[rows] + torch.arange(rows.numel()) - first[rows]
        self.tables, self.starts, self.lengths = (t.to(self.device) for t in (tables, starts, lengths))
        self.rows, self.positions = rows.to(self.device), positions.to(self.device)
        self.last = (first + lengths - 1).to(self.device)
        self.tokens = sum(counts)
        self._groups: dict[Optional[int], list[AttentionGroup]] = {}

    def placement(self, block_size: int) -> Placement:
        return Placement.of(self.tables, self.rows, self.positions, block_size)

    def groups(self, window: Optional[int]) -> list[AttentionGroup]:
        """The attention groups of the step (see the module docstring), for a sliding ``window`` or None."""
        if window not in self._groups:
            tables, starts, lengths = self._cpu
            single = lengths == 1
            self._groups[window] = [self._group(tables, starts, lengths, which, window)
                                    for which in (single, ~single) if bool(which.any())]
        return self._groups[window]

    def _group(self, tables, starts, lengths, which: torch.Tensor, window: Optional[int]) -> AttentionGroup:
        first = (torch.cumsum(lengths, 0) - lengths)[which]
        starts, lengths = starts[which], lengths[which]
        offsets = torch.arange(int(lengths.max()))
        valid = offsets[None, :] < lengths[:, None]
        index = torch.where(valid, first[:, None] + offsets[None, :], 0)
        positions = starts[:, None] + offsets[None, :]
        num_keys = int((starts + lengths).max())
        keys = torch.arange(num_keys)
        allowed = keys[None, None, :] <= positions[:, :, None]
        if window:
            allowed &= positions[:, :, None] - keys[None, None, :] < window
        allowed |= (~valid)[:, :, None] & (keys == 0)[None, None, :]
        return AttentionGroup(*(t.to(self.device) for t in (tables[which], index, valid, allowed[:, None])),
                              num_keys)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[b, hq, s, d]`` over ``k``, ``v`` ``[b, hkv, keys, d]``; returns ``[b, s, hq*d]``."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def cached_attention(cache: KVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     step: StepInputs, where: Placement, window: Optional[int], scale: float) -> torch.Tensor:
    """One layer's attention over the cache: ``q`` ``[1, heads, tokens, d]``, ``k``, ``v`` ``[1, kv_heads,
    tokens, d]`` of the step's packed new tokens; returns ``[1, tokens, heads * d]``."""
    cache.write(layer, where, k, v)
    out = q.new_empty(q.shape[2], q.shape[1] * q.shape[3])
    for group in step.groups(window):
        keys, values = cache.read(layer, group.tables, group.num_keys)
        query = q[0][:, group.index].transpose(0, 1)                     # [rows, heads, seq, d]
        out[group.index[group.valid]] = _attend(query, keys, values, group.mask, scale)[group.valid]
    return out[None]
