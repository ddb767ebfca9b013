"""One forward step of this rank's pipeline stage over a batch of requests, reading and writing the KV cache.

The step calls the decoder's own submodules (norms, TP projections, MLP) and does only the
attention itself, over the cache (:func:`plait.serve.attention.cached_attention`). The step's new
tokens are packed into one sequence (see :mod:`plait.serve.attention` for the step's layout):

==============  =========================  ==========================================
name            shape                      meaning
==============  =========================  ==========================================
``tokens``      ``[1, tokens]``            new token ids of every row, packed (first stage)
``hidden``      ``[1, tokens, H]``         what the previous stage sent (other stages)
``step``        :class:`StepInputs`        rows, block tables, positions
result          ``[1, tokens, H]``         hidden states for the next stage, or on the
                ``[batch, V/tp]``          last stage the vocab-parallel logits of each
                                           row's last new token
==============  =========================  ==========================================
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import StepInputs, cached_attention
from .kv_cache import KVCache, Placement


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (the rotary convention of Llama-style models)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of ``q``, ``k`` ``[batch, heads, seq, head_dim]`` by ``cos``, ``sin`` ``[batch, seq, head_dim]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[batch, seq, heads*head_dim] -> [batch, heads, seq, head_dim]``."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


class StageRunner:
    """Runs one :class:`~plait.parallel.stage.DecoderStage` step by step against its own KV cache."""

    def __init__(self, stage, family: str, cache: KVCache, window: Optional[int] = None) -> None:
        if family not in ("llama", "gpt2"):
            raise ValueError(f"plait serve runs the 'llama' and 'gpt2' families, not {family!r}")
        self.stage, self.family, self.cache, self.window = stage, family, cache, window
        self.layers = stage.layers()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        stage = self.stage
        positions = step.positions[None]
        if stage.first:
            h = stage.part("embed")(x)
            if stage.part("positions") is not None:
                h = h + stage.part("positions")(positions)
        else:
            h = x
        where = step.placement(self.cache.block_size)
        rotary = None
        if self.family == "llama" and self.layers:
            rotary = stage.part("rotary")(h, positions)
        for index, layer in enumerate(self.layers):
            if self.family == "llama":
                h = self._llama_layer(index, layer, h, step, where, rotary)
            else:
                h = self._gpt2_layer(index, layer, h, step, where)
        if not stage.last:
            return h
        last = h[0, step.last]
        return stage.part("head")(stage.part("norm")(last))

    def _cached_attention(self, index: int, q, k, v, step: StepInputs, where: Placement, scale) -> torch.Tensor:
        return cached_attention(self.cache, index, q, k, v, step, where, self.window, scale)

    def _llama_layer(self, index, layer, h, step, where, rotary) -> torch.Tensor:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        q, k, v = (proj(x).view(*x.shape[:2], -1, hd) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if getattr(attn, "q_norm", None) is not None:       # Qwen3: per-head RMSNorm before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, k, *rotary)
        out = self._cached_attention(index, q, k, v, step, where, attn.scaling)
        h = h + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _gpt2_layer(self, index, layer, h, step, where) -> torch.Tensor:
        attn = layer.attn
        q, k, v = attn.c_attn(layer.ln_1(h)).split(attn.split_size, dim=2)
        q, k, v = (_heads(t, attn.head_dim) for t in (q, k, v))
        out = self._cached_attention(index, q, k, v, step, where, attn.scaling)
        h = h + attn.c_proj(out)
        return h + layer.mlp(layer.ln_2(h))
