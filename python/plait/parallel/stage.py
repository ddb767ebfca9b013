"""Cut a decoder's layer stack into pipeline chunks, each a module the PipelineEngine runs.

A chunk keeps the model's own submodules under their own names (``model.layers.5...``),
so its ``named_parameters()`` are the checkpoint's names in any layout. The first chunk
also holds the embedding (and learned positions, embedding dropout), the last the final norm
and the head; every chunk with layers holds the rotary embedding (a parameter-free module).
How a chunk runs is its model family's business (:mod:`plait.parallel.families`): the
stage's ``forward`` is the family's.

=============  ============================  ============================
chunk          input                         output
=============  ============================  ============================
first          token ids ``[batch, seq]``    hidden ``[batch, seq, H]``
middle         hidden ``[batch, seq, H]``    hidden ``[batch, seq, H]``
last           hidden ``[batch, seq, H]``    logits ``[batch, seq, V/tp]``
=============  ============================  ============================
(a one-chunk model maps ids to logits).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .families import family
from .plan import Plan


def balanced_partition(num_layers: int, num_chunks: int, layer_cost: float, first_cost: float,
                       last_cost: float) -> list[range]:
    """Contiguous layer ranges, one per chunk, minimizing the costliest chunk.

    ``first_cost`` is added to the chunk holding layer 0 (the embedding), ``last_cost`` to
    the one holding the last layer (norm and head). Exact dynamic programming, O(chunks x layers^2).
    """
    if not 1 <= num_chunks <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_chunks} chunks; need 1 <= chunks <= layers")

    def cost(start: int, stop: int) -> float:
        return ((stop - start) * layer_cost + (first_cost if start == 0 else 0.0)
                + (last_cost if stop == num_layers else 0.0))

    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, num_chunks + 1):
        for i in range(c, num_layers - (num_chunks - c) + 1):
            for j in range(c - 1, i):
                value = max(best[c - 1][j], cost(j, i))
                if value < best[c][i]:
                    best[c][i], cut[c][i] = value, j
    bounds, i = [], num_layers
    for c in range(num_chunks, 0, -1):
        bounds.append(range(cut[c][i], i))
        i = cut[c][i]
    return bounds[::-1]


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating plain containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part) or getattr(node, part) is None:
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


class DecoderStage(nn.Module):
    """One pipeline chunk of a decoder: see the module docstring. Tensor in, tensor out."""

    def __init__(self, model: nn.Module, plan: Plan, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.plan, self.layer_range, self.first, self.last = plan, layers, first, last
        self.hf_config = getattr(model, "config", None)
        self.family = family(plan.family)
        self.paths: dict[str, Optional[str]] = {"embed": None, "positions": None, "embed_dropout": None,
                                                "norm": None, "head": None, "rotary": None}
        if first:
            self._keep(model, "embed", plan.embed)
            for role in ("positions", "embed_dropout"):
                if getattr(plan, role):
                    self._keep(model, role, getattr(plan, role))
        stack = model.get_submodule(plan.layers)
        self.layer_paths = [f"{plan.layers}.{i}" for i in layers]
        for i, path in zip(layers, self.layer_paths):
            _attach(self, path, stack[i])
        if plan.rotary and len(layers):
            self._keep(model, "rotary", plan.rotary)
        if last:
            self._keep(model, "norm", plan.norm)
            self._keep(model, "head", plan.head)

    def _keep(self, model: nn.Module, role: str, path: str) -> None:
        _attach(self, path, model.get_submodule(path))
        self.paths[role] = path

    def part(self, role: str) -> Optional[nn.Module]:
        path = self.paths[role]
        return None if path is None else self.get_submodule(path)

    def layers(self) -> list[nn.Module]:
        return [self.get_submodule(p) for p in self.layer_paths]

    # set by parallelize: the TP communicator and whether activations are sequence shards
    comm = None
    sequence_parallel = False

    def forward(self, x: torch.Tensor, step=None) -> torch.Tensor:
        """The stage's forward, as its model family runs it (``step``: a serving step, see
        :meth:`plait.parallel.families.Family.forward`)."""
        return self.family.forward(self, x, step)

    def extra_repr(self) -> str:
        layers = self.layer_range
        span = f"{layers.start}..{layers.stop - 1}" if len(layers) else "none"
        return f"layers={span}, first={self.first}, last={self.last}"


def stage_costs(model: nn.Module, plan: Plan, num_layers: int) -> tuple[float, float, float]:
    """Relative cost of one layer, the first chunk's extras and the last's, by parameter count
    (the FLOPs per token of a matmul are twice its weights; an embedding lookup is nearly free)."""
    stack = model.get_submodule(plan.layers)
    layer = sum(p.numel() for p in stack[0].parameters()) if num_layers else 0
    head = sum(p.numel() for p in model.get_submodule(plan.head).parameters())
    return float(layer), 0.0, float(head)


def build_stages(model: nn.Module, plan: Plan, num_chunks: int, chunks: Sequence[int]) -> list[DecoderStage]:
    """The stages of chunk numbers ``chunks`` of ``model`` cut into ``num_chunks`` balanced chunks."""
    stack = model.get_submodule(plan.layers)
    num_layers = len(stack)
    costs = model.stage_costs() if hasattr(model, "stage_costs") else stage_costs(model, plan, num_layers)
    ranges = balanced_partition(num_layers, num_chunks, *costs)
    return [DecoderStage(model, plan, ranges[c], first=c == 0, last=c == num_chunks - 1) for c in chunks]
