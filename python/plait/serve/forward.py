"""One forward step of this rank's pipeline stage over a batch of requests, reading and writing the KV cache.

The step calls the decoder's own submodules (norms, TP projections, MLP) and does only the
attention itself, over the cache, with ``torch.nn.functional.scaled_dot_product_attention``.
Row ``r`` of a batch brings ``lengths[r]`` new tokens starting at position ``starts[r]``
(a whole prompt at prefill, one token at decode); rows are padded to the longest:

==============  =========================  ==========================================
name            shape                      meaning
==============  =========================  ==========================================
``tokens``      ``[batch, seq]``           new token ids (first stage), padded with 0
``hidden``      ``[batch, seq, H]``        what the previous stage sent (other stages)
``tables``      ``[batch, width]``         each row's KV-cache block table (:mod:`.kv_cache`)
``starts``      ``[batch]``                position of each row's first new token
``lengths``     ``[batch]``                how many of its ``seq`` tokens are real
result          ``[batch, seq, H]``        hidden states for the next stage, or on the
                ``[batch, V/tp]``          last stage the vocab-parallel logits of each
                                           row's last real token
==============  =========================  ==========================================
Padding tokens never reach the cache and no real token attends to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVCache, Placement


@dataclass
class StepInputs:
    """Where each row of a step reads and writes (see the module docstring)."""

    tables: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor

    @property
    def seq(self) -> int:
        return int(self.lengths.max())

    def positions(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions ``[batch, seq]`` clamped into the cache, which tokens are real ``[batch, seq]``)."""
        offsets = torch.arange(self.seq)
        positions = self.starts[:, None] + offsets[None, :]
        valid = offsets[None, :] < self.lengths[:, None]
        return positions.clamp(max=max_len - 1), valid

    def attention_mask(self, positions: torch.Tensor, valid: torch.Tensor, window: Optional[int]) -> torch.Tensor:
        """Boolean ``[batch, 1, seq, keys]``: a token sees cached positions up to its own (within the window).

        Padding queries see position 0 only, so no row of the softmax is empty.
        """
        keys = torch.arange(int((self.starts + self.lengths).max()))
        allowed = keys[None, None, :] <= positions[:, :, None]
        if window:
            allowed &= positions[:, :, None] - keys[None, None, :] < window
        allowed |= (~valid)[:, :, None] & (keys == 0)[None, None, :]
        return allowed[:, None]


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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[b, hq, s, d]`` over ``k``, ``v`` ``[b, hkv, keys, d]``; returns ``[b, s, hq*d]``."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


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
        positions, valid = step.positions(self.cache.max_len)
        if stage.first:
            h = stage.part("embed")(x)
            if stage.part("positions") is not None:
                h = h + stage.part("positions")(positions)
        else:
            h = x
        mask = step.attention_mask(positions, valid, self.window)
        where = Placement.of(step.tables, positions, valid)
        rotary = None
        if self.family == "llama" and self.layers:
            rotary = stage.part("rotary")(h, positions)
        for index, layer in enumerate(self.layers):
            if self.family == "llama":
                h = self._llama_layer(index, layer, h, step.tables, where, mask, rotary)
            else:
                h = self._gpt2_layer(index, layer, h, step.tables, where, mask)
        if not stage.last:
            return h
        last = h[torch.arange(h.shape[0]), step.lengths - 1]
        return stage.part("head")(stage.part("norm")(last))

    def _cached_attention(self, index: int, q, k, v, tables: torch.Tensor, where: Placement, mask, scale
                          ) -> torch.Tensor:
        self.cache.write(index, where, k, v)
        keys, values = self.cache.read(index, tables, mask.shape[-1])
        return _attend(q, keys, values, mask, scale)

    def _llama_layer(self, index, layer, h, tables, where, mask, rotary) -> torch.Tensor:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        hd = attn.head_dim
        q, k, v = (proj(x).view(*x.shape[:2], -1, hd) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if getattr(attn, "q_norm", None) is not None:       # Qwen3: per-head RMSNorm before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, k, *rotary)
        out = self._cached_attention(index, q, k, v, tables, where, mask, attn.scaling)
        h = h + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _gpt2_layer(self, index, layer, h, tables, where, mask) -> torch.Tensor:
        attn = layer.attn
        q, k, v = attn.c_attn(layer.ln_1(h)).split(attn.split_size, dim=2)
        q, k, v = (_heads(t, attn.head_dim) for t in (q, k, v))
        out = self._cached_attention(index, q, k, v, tables, where, mask, attn.scaling)
        h = h + attn.c_proj(out)
        return h + layer.mlp(layer.ln_2(h))
