"""The reference GPT as pipeline chunks, balanced by cost, initialized identically in every layout.

A model of ``L`` blocks is cut into ``num_chunks`` contiguous chunks (``pp`` x
virtual stages); the first chunk also holds the embedding, the last the head.
Chunk ``c`` lives on pipeline rank ``c % pp`` (looping placement), so rank
``r`` holds chunks ``r, r + pp, r + 2pp, ...``. Parameter names are global
(``blocks.7.mlp.fc1.weight``) whatever the layout, and every parameter is drawn
from a generator seeded by (seed, name) and then sharded, so (dp, pp, tp) = (1,
1, 1) and any other layout start from the very same model.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import torch
from torch import nn

from ..comm import Communicator
from ..tp import vocab_parallel_cross_entropy
from .config import GPTConfig
from .layers import Block, Embedding, Head


class GPTStage(nn.Module):
    """One chunk: the embedding if first, blocks ``layers``, the head if last. Tensor in, tensor out."""

    def __init__(self, cfg: GPTConfig, comm: Communicator, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.cfg, self.comm, self.layers = cfg, comm, layers
        self.embedding = Embedding(cfg, comm) if first else None
        self.blocks = nn.ModuleDict({str(i): Block(cfg, comm) for i in layers})
        self.head = Head(cfg, comm) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        for block in self.blocks.values():
            x = block(x)
        return self.head(x) if self.head is not None else x

    def extra_repr(self) -> str:
        return f"layers={self.layers.start}..{self.layers.stop - 1}, tp={self.comm.size}"


def chunk_costs(cfg: GPTConfig) -> tuple[float, float, float]:
    """Forward FLOPs of the embedding, one block and the head, per sequence."""
    s, h, f, v = cfg.seq_len, cfg.hidden, cfg.ffn_hidden, cfg.vocab_size
    block = 2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h
    return 2.0 * s * h, float(block), 2.0 * s * h * v


def partition(cfg: GPTConfig, num_chunks: int) -> list[range]:
    """Contiguous block ranges, one per chunk, minimizing the costliest chunk (embedding and head counted)."""
    layers = cfg.num_layers
    if not 1 <= num_chunks <= layers:
        raise ValueError(f"cannot cut {layers} layers into {num_chunks} chunks; need 1 <= chunks <= layers")
    embed, block, head = chunk_costs(cfg)

    def cost(start: int, stop: int) -> float:
        return (stop - start) * block + (embed if start == 0 else 0.0) + (head if stop == layers else 0.0)

    # best[c][i]: minimal max-cost of cutting the first i layers into c chunks
    inf = float("inf")
    best = [[inf] * (layers + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (layers + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, num_chunks + 1):
        for i in range(c, layers - (num_chunks - c) + 1):
            for j in range(c - 1, i):
                value = max(best[c - 1][j], cost(j, i))
                if value < best[c][i]:
                    best[c][i], cut[c][i] = value, j
    bounds, i = [], layers
    for c in range(num_chunks, 0, -1):
        bounds.append(range(cut[c][i], i))
        i = cut[c][i]
    return bounds[::-1]


def _init_value(name: str, shape: torch.Size, cfg: GPTConfig, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if ".ln" in name or name.startswith("ln"):
        return torch.ones(shape)
    std = 0.02 / math.sqrt(2 * cfg.num_layers) if name.endswith(("out.weight", "fc2.weight")) else 0.02
    return torch.randn(shape, generator=gen) * std


def full_shape(param: torch.Tensor, tp: int) -> list[int]:
    """The shape of the whole parameter whose TP shard ``param`` is (its ``tp_split_dim`` times ``tp``)."""
    shape = list(param.shape)
    split = getattr(param, "tp_split_dim", None)
    if split is not None:
        shape[split] *= tp
    return shape


def tp_shard(full, param: torch.Tensor, comm: Communicator):
    """This rank's TP shard of ``full`` (a whole parameter, or a per-parameter optimizer value) for
    ``param``; ``full`` as is when ``param`` is not split or ``full`` is a scalar or already the shard."""
    split = getattr(param, "tp_split_dim", None)
    if not torch.is_tensor(full) or split is None or full.dim() == 0 or full.shape == param.shape:
        return full
    return full.chunk(comm.size, dim=split)[comm.rank]


@torch.no_grad()
def init_parameters(stage: GPTStage, seed: int) -> None:
    """Set every parameter from (seed, global name), then keep this rank's TP shard."""
    for name, param in stage.named_parameters():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        full = _init_value(name, torch.Size(full_shape(param, stage.comm.size)), stage.cfg, gen)
        param.copy_(tp_shard(full, param, stage.comm).to(param.dtype))


def build_stages(cfg: GPTConfig, comm: Communicator, pp: int, pp_rank: int, num_virtual: int = 1,
                 seed: int = 0) -> list[GPTStage]:
    """This pipeline rank's chunks (looping placement), built over TP communicator ``comm`` and initialized."""
    cfg.check_layout(comm.size, pp, num_virtual)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp - 1}")
    ranges = partition(cfg, pp * num_virtual)
    stages = []
    for chunk in range(pp_rank, pp * num_virtual, pp):
        stage = GPTStage(cfg, comm, ranges[chunk], first=chunk == 0, last=chunk == len(ranges) - 1)
        init_parameters(stage, seed)
        stages.append(stage)
    return stages


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``[seq, batch, V/tp]``, targets ``[batch, seq]``."""
    return vocab_parallel_cross_entropy(logits, targets.t(), comm)


def full_state_dict(stages: Sequence[GPTStage], grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's chunks' parameters (or their gradients) gathered over TP into full tensors.

    A TP collective: every rank of the TP group calls it. A missing gradient is zeros.
    """
    out = {}
    for stage in stages:
        for name, param in stage.named_parameters():
            value = param.detach()
            if grads:
                value = param.grad if param.grad is not None else torch.zeros_like(param)
            split = getattr(param, "tp_split_dim", None)
            out[name] = (value if split is None else stage.comm.all_gather(value.contiguous(), dim=split)).clone()
    return out
