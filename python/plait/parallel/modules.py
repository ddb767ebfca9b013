"""The few modules a plan needs beyond plait's TP layers.

- :class:`VocabParallelHead`: the LM head as a column-parallel layer over a padded
  vocabulary; logits of padding rows are ``-inf``, so they never win a max, never add to a
  softmax and never show once gathered and cut to the real vocabulary.
- :class:`ReplicatedRowsColumn`: a column-parallel layer whose rows are also held by other
  ranks (replicated KV heads). In backward, the gradients of each row are summed over every
  rank (and every local copy) that holds it, so all copies see the one-process gradient and
  stay equal through any optimizer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..comm import Communicator
from ..tp import ColumnParallelLinear, copy_to_tp_region


class _SumReplicatedRows(torch.autograd.Function):
    """Identity forward; backward sums gradient rows over all their holders (index -> full rows)."""

    @staticmethod
    def forward(ctx, tensor, index: torch.Tensor, full_rows: int, comm: Communicator):
        ctx.index, ctx.full_rows, ctx.comm = index, full_rows, comm
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros((ctx.full_rows, *grad.shape[1:]))
        full.index_add_(0, ctx.index, grad)
        ctx.comm.all_reduce(full)
        return full.index_select(0, ctx.index), None, None, None


def sum_replicated_rows(tensor: torch.Tensor, index: torch.Tensor, full_rows: int, comm: Communicator):
    """``tensor`` (rows ``index`` of a ``full_rows``-row tensor) whose gradient is summed per row over ``comm``."""
    return _SumReplicatedRows.apply(tensor, index, full_rows, comm)


class ReplicatedRowsColumn(ColumnParallelLinear):
    """Column-parallel linear over rows ``index`` of a ``full_rows``-row weight (rows may repeat across ranks)."""

    def setup_rows(self, index: list[int], full_rows: int) -> None:
        self.register_buffer("row_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.full_rows = full_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp_region(x, self.comm)
        weight = sum_replicated_rows(self.weight, self.row_index, self.full_rows, self.comm)
        bias = None if self.bias is None else sum_replicated_rows(self.bias, self.row_index, self.full_rows,
                                                                  self.comm)
        return F.linear(x, weight, bias)


class VocabParallelHead(ColumnParallelLinear):
    """LM head over this rank's slice of a padded vocabulary; padding logits are ``-inf``.

    ``valid`` is how many of this rank's rows are real tokens (the rest is padding).
    """

    def setup_vocab(self, vocab_size: int, valid: int) -> None:
        self.vocab_size, self.valid = vocab_size, valid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_padding(super().forward(x))

    def mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[..., local vocab]`` with this rank's padding rows set to ``-inf`` (again, after a
        family's elementwise transform such as a soft-cap)."""
        if self.valid < logits.shape[-1]:
            mask = torch.arange(logits.shape[-1], device=logits.device) >= self.valid
            logits = logits.masked_fill(mask, float("-inf"))
        return logits

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vocab_size={getattr(self, 'vocab_size', None)}"
