"""The reference GPT: a plain model, parallelized like any other through ``plait.parallelize``.

:class:`GPT` has no parallel code; :func:`gpt_plan` is its plan (plain data), and
:func:`build_stages` is ``parallelize`` applied to a GPT initialized from a seed. A model
of ``L`` blocks is cut into ``pp`` x virtual-stage chunks balanced by cost (the first also
holds the embedding, the last the head); chunk ``c`` lives on pipeline rank ``c % pp``.
Parameter names are global (``blocks.7.mlp.fc1.weight``) whatever the layout, and every
parameter is drawn from a generator seeded by (seed, name) before it is sharded, so (dp, pp,
tp) = (1, 1, 1) and any other layout start from the very same model.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..comm import Communicator
from ..config import ParallelConfig
from ..parallel import Plan
from ..parallel.families import gpt_plan
from ..parallel.stage import DecoderStage, balanced_partition
from ..tp import vocab_parallel_cross_entropy
from .config import GPTConfig
from .layers import Block, PositionEmbedding

GPTStage = DecoderStage   # a GPT chunk is a DecoderStage of the "plait" family


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


def partition(cfg: GPTConfig, num_chunks: int) -> list[range]:
    """Contiguous block ranges, one per chunk, minimizing the costliest chunk (embedding and head counted)."""
    embed, block, head = chunk_costs(cfg)
    return balanced_partition(cfg.num_layers, num_chunks, block, embed, head)


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


@dataclass
class StageMesh:
    """The parts of a mesh that ``parallelize`` reads, for building stages over one TP communicator."""

    tp_comm: Communicator
    pp: int
    pp_rank: int
    device: torch.device
    config: ParallelConfig

    dp = property(lambda self: 1)
    tp = property(lambda self: self.tp_comm.size)
    tp_rank = property(lambda self: self.tp_comm.rank)


def build_stages(cfg: GPTConfig, comm: Communicator, pp: int, pp_rank: int, num_virtual: int = 1,
                 seed: int = 0) -> list[DecoderStage]:
    """This pipeline rank's chunks (looping placement) of a GPT initialized from ``seed``, tensor-parallel
    over ``comm``: ``plait.parallelize`` with :func:`gpt_plan`."""
    from ..parallel import parallelize

    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp - 1}")
    config = ParallelConfig(pp=pp, tp=comm.size, num_virtual=num_virtual,
                            schedule="interleaved" if num_virtual > 1 else "1f1b",
                            sequence_parallel=cfg.sequence_parallel)
    config.check_model(cfg.shape())
    model = GPT(cfg)
    init_parameters(model, seed)
    parallel = parallelize(model, StageMesh(comm, pp, pp_rank, torch.device("cpu"), config), config=config)
    stages = list(parallel.stages)
    for stage in stages:
        stage.comm = comm   # the TP communicator, for full_state_dict
    return stages


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``[batch, seq, V/tp]``, targets ``[batch, seq]``."""
    return vocab_parallel_cross_entropy(logits, targets, comm)


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
