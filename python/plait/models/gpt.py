"""The reference GPT: a plain model, parallelized like any other through ``plait.parallelize``.

:class:`GPT` has no parallel code; :func:`gpt_plan` is its plan (plain data). ``parallelize``
cuts its ``L`` blocks into ``pp`` x virtual-stage chunks balanced by :meth:`GPT.stage_costs`
(the first chunk also holds the embedding, the last the head). Parameter names are global
(``blocks.7.mlp.fc1.weight``) whatever the layout, and :func:`init_parameters` draws every
parameter from a generator seeded by (seed, name) before it is sharded, so (dp, pp, tp) =
(1, 1, 1) and any other layout start from the very same model.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from ..parallel import Plan
from ..parallel.families import gpt_plan
from .config import GPTConfig
from .layers import Block, PositionEmbedding


class GPT(nn.Module):
    """Token and position embeddings, ``num_layers`` pre-LN blocks, final LayerNorm, untied head.

    ``forward(ids [batch, seq]) -> logits [batch, seq, vocab]``; inside, ``[seq, batch, hidden]``.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embedding = nn.Module()
        self.embedding.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden, dtype=cfg.dtype)
        self.embedding.positions = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Module()
        self.head.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps, dtype=cfg.dtype)
        self.head.proj = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False, dtype=cfg.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding.tokens(ids.t()) + self.embedding.positions(ids.shape[1]).unsqueeze(1)
        for block in self.blocks:
            x = block(x)
        return self.head.proj(self.head.ln(x)).transpose(0, 1)

    def plait_plan(self) -> Plan:
        return gpt_plan()

    def stage_costs(self) -> tuple[float, float, float]:
        """Relative cost of one block, the embedding and the head (for the pipeline split)."""
        embed, block, head = chunk_costs(self.config)
        return block, embed, head


def chunk_costs(cfg: GPTConfig) -> tuple[float, float, float]:
    """Forward FLOPs of the embedding, one block and the head, per sequence."""
    s, h, f, v = cfg.seq_len, cfg.hidden, cfg.ffn_hidden, cfg.vocab_size
    block = 2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h
    return 2.0 * s * h, float(block), 2.0 * s * h * v


def _init_value(name: str, shape: torch.Size, cfg: GPTConfig, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if ".ln" in name or name.startswith("ln"):
        return torch.ones(shape)
    std = 0.02 / math.sqrt(2 * cfg.num_layers) if name.endswith(("out.weight", "fc2.weight")) else 0.02
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Set every parameter of the whole (unsharded) model from (seed, global name)."""
    cfg = model.config
    for name, param in model.named_parameters():
        # The positions' seed key keeps its name from before the GPT became a plain model
        # ("embedding.positions"), so a seed still gives the same model as in earlier versions.
        key = "embedding.positions" if name == "embedding.positions.weight" else name
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        param.copy_(_init_value(name, param.shape, cfg, gen).to(param.dtype))
