"""plait's reference GPT (:mod:`plait.models.gpt`): sequence-first activations, sequence parallelism.

Inside a stage activations are ``[seq(/tp), batch, hidden]`` (Megatron's layout, so sequence
parallelism shards dim 0); the first stage takes ids ``[batch, seq]`` and the last returns
logits ``[batch, seq, V/tp]`` like every other family. The GPT has no dropout and is not served.
"""
from __future__ import annotations

import torch

from ..plan import Plan
from .base import Family, check_ids


def gpt_plan() -> Plan:
    """The GPT's plan: whole heads per rank (QKV rows are head-interleaved), vocab-parallel table and head."""
    return Plan(
        name="plait-gpt", family="plait",
        styles={"embedding.tokens": "vocab_embed", "head.proj": "vocab_head", "blocks.*.attn": "attention",
                "blocks.*.attn.qkv": "colwise", "blocks.*.attn.out": "rowwise", "blocks.*.mlp.fc1": "colwise",
                "blocks.*.mlp.fc2": "rowwise"},
        embed="embedding.tokens", positions="embedding.positions", layers="blocks", norm="head.ln",
        head="head.proj", tied=False)


class PlaitGPTFamily(Family):
    name = "plait"
    sequence_parallel = True
    serves = False

    def shipped_plan(self, model_type: str) -> Plan:
        return gpt_plan()

    def forward(self, stage, x: torch.Tensor, step=None) -> torch.Tensor:
        if step is not None:
            raise ValueError("plait's reference GPT is not served (it has no KV-cache forward)")
        if stage.first:
            check_ids(x)
            h = stage.part("embed")(x.t().contiguous())                 # [seq(/tp), batch, H]
            positions = stage.part("positions")(x.shape[1])             # [seq, H]
            if stage.sequence_parallel:
                positions = positions.chunk(stage.comm.size, dim=0)[stage.comm.rank]
            x = h + positions.unsqueeze(1)
        for layer in stage.layers():
            x = layer(x)
        if stage.last:
            x = stage.part("head")(stage.part("norm")(x)).transpose(0, 1)
        return x
