"""The reference GPT's pieces: plain single-device modules, no parallel code.

``plait.parallelize`` makes them tensor-parallel from the GPT's plan
(:func:`plait.models.gpt.gpt_plan`): the linears become column/row-parallel layers, the
token table a vocab-parallel embedding, the head a vocab-parallel head, and attention sees
its local head count through ``num_heads``. Activations are ``[seq, batch, hidden]``
(Megatron's layout, so sequence parallelism shards dim 0).

Attention's QKV weight is laid out head by head (``[heads, 3, head_dim]`` rows), so a
contiguous column split hands each rank whole heads with their q, k and v. The QKV
projection has no bias (as in Llama): a key bias shifts every score of a query by the same
amount, which softmax ignores, so its gradient is exactly zero and Adam would only turn
rounding noise into updates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tp.activations import apply_activation
from .config import GPTConfig


class PositionEmbedding(nn.Module):
    """Learned positions: ``forward(seq)`` is the first ``seq`` rows ``[seq, hidden]``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.seq_len, cfg.hidden, dtype=cfg.dtype))

    def forward(self, seq: int) -> torch.Tensor:
        if seq > self.weight.shape[0]:
            raise ValueError(f"token ids must be [batch, seq<={self.weight.shape[0]}], got seq={seq}")
        return self.weight[:seq]


class Attention(nn.Module):
    """Causal self-attention over ``num_heads`` heads (this rank's, once parallelized)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False, dtype=cfg.dtype)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)                                       # [seq, batch, 3 * heads * hd]
        seq, batch = qkv.shape[:2]
        q, k, v = qkv.view(seq, batch, self.num_heads, 3, self.head_dim).permute(3, 1, 2, 0, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [batch, heads, seq, hd]
        return self.out(y.permute(2, 0, 1, 3).reshape(seq, batch, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn_hidden, dtype=cfg.dtype)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.hidden, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(apply_activation(self.fc1(x), self.activation))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps, dtype=cfg.dtype)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps, dtype=cfg.dtype)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))
