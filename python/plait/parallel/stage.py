"""Cut a decoder's layer stack into pipeline chunks, each a module the PipelineEngine runs.

A chunk keeps the model's own submodules under their own names (``model.layers.5...``),
so its ``named_parameters()`` are the checkpoint's names in any layout. The first chunk
also holds the embedding (and learned positions), the last the final norm and the head;
every chunk with layers holds the rotary embedding (a parameter-free module) and computes
position ids, rotary tables and the causal mask for itself.

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


def _causal_mask(config, seq: int, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """None where SDPA's own causal flag is exact; else an explicit mask for the attention implementation.

    Eager attention adds its mask (``[1, 1, seq, seq]``, finfo.min above the diagonal); a
    sliding window shorter than the sequence needs an explicit mask too.
    """
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    window = getattr(config, "sliding_window", None)
    windowed = isinstance(window, int) and 0 < window < seq and getattr(config, "use_sliding_window", True)
    if implementation != "eager" and not windowed:
        return None
    i = torch.arange(seq, device=device)
    allowed = i[None, :] <= i[:, None]
    if windowed:
        allowed &= i[:, None] - i[None, :] < window
    if implementation == "sdpa":
        return allowed[None, None]
    mask = torch.zeros(seq, seq, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class DecoderStage(nn.Module):
    """One pipeline chunk of a decoder: see the module docstring. Tensor in, tensor out."""

    def __init__(self, model: nn.Module, plan: Plan, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.plan, self.layer_range, self.first, self.last = plan, layers, first, last
        self.hf_config = getattr(model, "config", None)
        self.paths: dict[str, Optional[str]] = {"embed": None, "positions": None, "norm": None, "head": None,
                                                "rotary": None}
        if first:
            self._keep(model, "embed", plan.embed)
            if plan.positions:
                self._keep(model, "positions", plan.positions)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.family == "plait":
            return self._forward_seq_first(x)
        if self.first:
            if x.dim() != 2 or x.is_floating_point():
                raise ValueError(f"the first pipeline stage takes token ids [batch, seq], got {x.dtype} "
                                 f"{list(x.shape)}")
            seq = x.shape[1]
            positions = torch.arange(seq, device=x.device).unsqueeze(0)
            h = self.part("embed")(x)
            if self.paths["positions"]:
                h = h + self.part("positions")(positions)
        else:
            h = x
            seq = h.shape[1]
            positions = torch.arange(seq, device=h.device).unsqueeze(0)
        h = self.run_layers(h, positions)
        if self.last:
            h = self.part("head")(self.part("norm")(h))
        return h

    def _forward_seq_first(self, x: torch.Tensor) -> torch.Tensor:
        """plait's GPT: ``[seq(/tp), batch, hidden]`` inside (sequence shards under SP), logits ``[batch, seq, V/tp]``."""
        if self.first:
            if x.dim() != 2 or x.is_floating_point():
                raise ValueError(f"the first pipeline stage takes token ids [batch, seq], got {x.dtype} "
                                 f"{list(x.shape)}")
            h = self.part("embed")(x.t().contiguous())                 # [seq(/tp), batch, H]
            positions = self.part("positions")(x.shape[1])             # [seq, H]
            if self.sequence_parallel:
                positions = positions.chunk(self.comm.size, dim=0)[self.comm.rank]
            x = h + positions.unsqueeze(1)
        for layer in self.layers():
            x = layer(x)
        if self.last:
            x = self.part("head")(self.part("norm")(x)).transpose(0, 1)
        return x

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.layer_paths:
            return h
        mask = _causal_mask(self.hf_config, h.shape[1], h.dtype, h.device)
        kwargs = {"attention_mask": mask}
        if self.plan.family == "llama":
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = self.part("rotary")(h, positions)
        for layer in self.layers():
            out = layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

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
