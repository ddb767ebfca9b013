"""Vocabulary-parallel embedding and cross-entropy: the vocabulary split over the TP group.

Rank ``r`` owns token ids ``[r*V/tp, (r+1)*V/tp)``: its rows of the embedding
table, and its slice of the LM head's logits. Neither the full table nor the
full ``[tokens, V]`` logits ever exist on one rank.

===============================  ==========================  ==========================
function                         input                       output
===============================  ==========================  ==========================
VocabParallelEmbedding(V, D)     ids [...]                   [..., D]
  ... sequence_parallel=True     ids [S, ...]                [S/tp, ..., D]
vocab_parallel_cross_entropy     logits [..., V/tp], [...]   [...] or scalar (reduction)
===============================  ==========================  ==========================
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import Communicator
from ..comm.agree import check_agreement
from .common import divide, resolve_comm
from .layers import check_sizes
from .mappings import reduce_from_tp_region, reduce_scatter_to_sequence_region


def _vocab_range(vocab_size: int, comm: Communicator) -> tuple[int, int]:
    per_rank = divide(vocab_size, comm.size, "vocab_size")
    return comm.rank * per_rank, (comm.rank + 1) * per_rank


def _check_ids(where: str, ids: torch.Tensor, vocab_size: int, allowed: Optional[int] = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32, torch.int16,
                                                              torch.int8, torch.uint8):
        raise ValueError(f"{where}: token ids must be an integer tensor, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.numel() == 0:
        return
    # One min/max pass and one device sync; ``allowed`` (ignore_index) is mapped to 0, a valid id.
    valid = ids if allowed is None else ids.masked_fill(ids == allowed, 0)
    low, high = torch.stack(torch.aminmax(valid)).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{where}: token ids must lie in [0, {vocab_size}), got range [{low}, {high}]")


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding`` with the table's rows (the vocabulary) split over the TP group.

    Each rank looks up the ids it owns, writes zeros for the rest, and the
    partial results are all-reduced (reduce-scattered along dim 0, the sequence,
    with ``sequence_parallel=True``). Initialized like ``nn.Embedding`` (N(0, 1))
    from the full table, so the same seed gives the same table. ``check_ranks`` (default
    True): check on construction that every rank builds the same table (sizes, dtype);
    see :class:`~plait.tp.layers.ColumnParallelLinear`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, *,
                 sequence_parallel: bool = False, padding_idx: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device=None, check_ranks: bool = True) -> None:
        super().__init__()
        check_sizes("VocabParallelEmbedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx={padding_idx} must lie in [0, {num_embeddings})")
        self.padding_idx = padding_idx   # as nn.Embedding: that row gets no gradient
        self.sequence_parallel = bool(sequence_parallel)
        self.comm = resolve_comm(group)
        if check_ranks:
            check_agreement({"num_embeddings": num_embeddings, "embedding_dim": embedding_dim,
                             "dtype": dtype or torch.get_default_dtype(),
                             "device": torch.device(device or "cpu").type,
                             "sequence_parallel": self.sequence_parallel, "padding_idx": padding_idx},
                            self.comm, what="VocabParallelEmbedding")
        self.vocab_start, self.vocab_end = _vocab_range(num_embeddings, self.comm)
        full = torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device)
        nn.init.normal_(full)
        self.weight = nn.Parameter(full[self.vocab_start:self.vocab_end].contiguous())
        self.weight.tp_split_dim = 0

    @classmethod
    def from_embedding(cls, dense: nn.Embedding, group=None, **kwargs) -> "VocabParallelEmbedding":
        """Shard an existing ``nn.Embedding`` (without padding_idx or max_norm)."""
        if dense.max_norm is not None:
            raise ValueError("from_embedding supports nn.Embedding without max_norm")
        layer = cls(dense.num_embeddings, dense.embedding_dim, group, padding_idx=dense.padding_idx,
                    dtype=dense.weight.dtype,
                    device=dense.weight.device, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(dense.weight[layer.vocab_start:layer.vocab_end])
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids("VocabParallelEmbedding", ids, self.num_embeddings)
        if ids.device != self.weight.device:
            raise ValueError(f"VocabParallelEmbedding: ids are on {ids.device}, the table on {self.weight.device}")
        if self.sequence_parallel and (ids.dim() < 1 or ids.shape[0] % self.comm.size):
            raise ValueError(f"VocabParallelEmbedding(sequence_parallel=True) splits dim 0 (the sequence) "
                             f"over {self.comm.size} ranks; ids of shape {list(ids.shape)} do not divide")
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids.long() - self.vocab_start).masked_fill(outside, 0)
        pad = self.padding_idx
        local_pad = pad - self.vocab_start if pad is not None and self.vocab_start <= pad < self.vocab_end else None
        partial = F.embedding(local, self.weight, local_pad).masked_fill_(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(partial, self.comm)
        return reduce_from_tp_region(partial, self.comm, in_place=True)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.comm.size}, "
                f"vocab=[{self.vocab_start}, {self.vocab_end}), sequence_parallel={self.sequence_parallel}")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss ``logsumexp(logits) - logits[target]`` over a vocabulary split across ranks.

    Two collectives: a max all-reduce (for stability), then one sum all-reduce
    carrying both the target logit and the sum of exponentials.
    """

    @staticmethod
    def forward(ctx, logits, target, comm: Communicator, vocab_start: int, ignore_index: int):
        work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        row_max = work.max(dim=-1).values
        comm.all_reduce(row_max, op="max")
        shifted = work - row_max.unsqueeze(-1)
        local_vocab = logits.shape[-1]
        local_target = target.long() - vocab_start
        mine = (local_target >= 0) & (local_target < local_vocab)
        index = local_target.masked_fill(~mine, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp_()   # shifted is this function's own temporary
        sums = torch.stack([target_logit, exp.sum(dim=-1)])
        comm.all_reduce(sums)
        target_logit, sum_exp = sums[0], sums[1]
        loss = torch.log(sum_exp) - target_logit
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, index, mine, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, mine, ignored = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, index, -mine.unsqueeze(-1).to(grad.dtype))
        scale = grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.mul_(scale).to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None, *,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits whose last dim is this rank's vocabulary shard.

    ``logits`` [..., V/tp], ``target`` [...] with full-vocabulary ids (replicated
    across the TP group). ``reduction``: "none" (per token), "sum", or "mean"
    over tokens whose target is not ``ignore_index`` (as ``F.cross_entropy``).
    Half-precision logits are reduced in float32 and the loss is float32.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    comm = resolve_comm(group)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("vocab_parallel_cross_entropy: logits must be a floating-point tensor")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"vocab_parallel_cross_entropy: target shape {list(target.shape)} must equal the "
                         f"logits shape without its last dim, {list(logits.shape[:-1])}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    vocab_size = logits.shape[-1] * comm.size
    _check_ids("vocab_parallel_cross_entropy", target, vocab_size, allowed=ignore_index)
    vocab_start = comm.rank * logits.shape[-1]
    loss = _VocabParallelCrossEntropy.apply(logits, target, comm, vocab_start, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
