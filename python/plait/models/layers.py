"""The GPT's pieces, built from plait's tensor-parallel layers.

Activations are ``[seq, batch, hidden]`` (``[seq/tp, batch, hidden]`` between
blocks under sequence parallelism). Shapes per TP rank:

===============  ======================  ======================
module           input                   output
===============  ======================  ======================
Embedding        ids [batch, seq]        [seq(/tp), batch, H]
Block            [seq(/tp), batch, H]    [seq(/tp), batch, H]
Head             [seq(/tp), batch, H]    logits [seq, batch, V/tp]
===============  ======================  ======================

Attention's QKV weight is laid out head by head (``[heads, 3, head_dim]`` rows),
so a contiguous TP split hands each rank whole heads with their q, k and v.
Parameters replicated across TP but fed a sequence shard under SP (LayerNorm,
position embedding) get their gradient all-reduced over TP through
``copy_to_tp_region``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import Communicator
from ..tp import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, copy_to_tp_region
from .config import GPTConfig


def _replicated(param: torch.Tensor, cfg: GPTConfig, comm: Communicator) -> torch.Tensor:
    return copy_to_tp_region(param, comm) if cfg.sequence_parallel else param


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose parameter gradients are summed over TP when it sees a sequence shard."""

    def __init__(self, cfg: GPTConfig, comm: Communicator) -> None:
        super().__init__(cfg.hidden, eps=cfg.layernorm_eps, dtype=cfg.dtype)
        self.cfg, self.comm = cfg, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _replicated(self.weight, self.cfg, self.comm),
                            _replicated(self.bias, self.cfg, self.comm), self.eps)


class Embedding(nn.Module):
    """Token (vocab-parallel) plus learned position embeddings."""

    def __init__(self, cfg: GPTConfig, comm: Communicator) -> None:
        super().__init__()
        self.cfg, self.comm = cfg, comm
        self.tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, comm,
                                             sequence_parallel=cfg.sequence_parallel, dtype=cfg.dtype)
        self.positions = nn.Parameter(torch.zeros(cfg.seq_len, cfg.hidden, dtype=cfg.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.cfg.seq_len:
            raise ValueError(f"token ids must be [batch, seq<={self.cfg.seq_len}], got {list(ids.shape)}")
        seq = ids.shape[1]
        x = self.tokens(ids.t().contiguous())                 # [seq(/tp), batch, H]
        positions = _replicated(self.positions[:seq], self.cfg, self.comm)
        if self.cfg.sequence_parallel:
            positions = positions.chunk(self.comm.size, dim=0)[self.comm.rank]
        return x + positions.unsqueeze(1)


class Attention(nn.Module):
    """Causal self-attention, heads split over TP.

    The QKV projection has no bias (as in Llama): a key bias shifts every score
    of a query by the same amount, which softmax ignores, so its gradient is
    exactly zero and Adam would only turn rounding noise into updates.
    """

    def __init__(self, cfg: GPTConfig, comm: Communicator) -> None:
        super().__init__()
        self.cfg = cfg
        self.local_heads = cfg.num_heads // comm.size
        sp = cfg.sequence_parallel
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * cfg.hidden, bias=False, sequence_parallel=sp, group=comm,
                                        dtype=cfg.dtype)
        self.out = RowParallelLinear(cfg.hidden, cfg.hidden, sequence_parallel=sp, group=comm, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)                                       # [seq, batch, 3H/tp]
        seq, batch = qkv.shape[:2]
        q, k, v = qkv.view(seq, batch, self.local_heads, 3, self.cfg.head_dim).permute(3, 1, 2, 0, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [batch, heads, seq, hd]
        return self.out(y.permute(2, 0, 1, 3).reshape(seq, batch, -1))


class MLP(nn.Module):
    """Column (activation fused) -> Row."""

    def __init__(self, cfg: GPTConfig, comm: Communicator) -> None:
        super().__init__()
        sp = cfg.sequence_parallel
        self.fc1 = ColumnParallelLinear(cfg.hidden, cfg.ffn_hidden, activation=cfg.activation, sequence_parallel=sp,
                                        group=comm, dtype=cfg.dtype)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden, cfg.hidden, sequence_parallel=sp, group=comm, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig, comm: Communicator) -> None:
        super().__init__()
        self.ln1, self.attn = LayerNorm(cfg, comm), Attention(cfg, comm)
        self.ln2, self.mlp = LayerNorm(cfg, comm), MLP(cfg, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the vocab-parallel LM head (no bias, untied from the embedding)."""

    def __init__(self, cfg: GPTConfig, comm: Communicator) -> None:
        super().__init__()
        self.ln = LayerNorm(cfg, comm)
        self.proj = ColumnParallelLinear(cfg.hidden, cfg.vocab_size, bias=False,
                                         sequence_parallel=cfg.sequence_parallel, group=comm, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x))
