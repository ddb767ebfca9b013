"""plait's attention function for transformers' decoder layers: one implementation for training,
``logits`` and serving.

plait runs a Hugging Face model's own decoder layers (so every field their code reads, from
rotary scaling to QKV biases and per-head norms, is honoured as transformers honours it) and
registers this function as transformers' attention implementation ``"plait"``. The layer hands
it the projected, rotated queries, keys and values of this rank's heads, with the module's own
``scaling``, ``sliding_window`` and ``softcap``; it adds what plait needs:

- **serving**: when the call carries ``plait_step`` (a serving step, see :mod:`plait.serve.forward`),
  the new keys and values go into the KV cache and attention runs over the cached ones, with the
  step's mask (each row at its own positions, padding never attended);
- **training**: attention-probability dropout with layout-invariant masks
  (:func:`plait.parallel.dropout.dropout_heads`), keyed by the layer and this rank's heads;
- **precision**: scores and softmax in at least float32 for 16-bit models (what transformers'
  eager attention and ``reorder_and_upcast_attn`` do), in the model's dtype otherwise.

The mask is built here from positions, not taken from the caller: causal, within
``sliding_window`` when the layer has one (a query at position i sees keys j with
``i - window < j <= i``, transformers' convention).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .dropout import dropout_heads

IMPLEMENTATION = "plait"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def causal_mask(queries: int, keys: int, window: Optional[int], device) -> torch.Tensor:
    """Boolean ``[queries, keys]`` (True: attend) for queries at the last ``queries`` of ``keys`` positions."""
    i = torch.arange(keys - queries, keys, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window
    return allowed


def _window(sliding_window: Any) -> Optional[int]:
    return sliding_window if isinstance(sliding_window, int) and sliding_window > 0 else None


def plait_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                    sliding_window: Optional[int] = None, softcap: Optional[float] = None, plait_step=None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` ``[b, hq, s, d]``, ``key``/``value`` ``[b, hkv, s, d]``
    -> ``([b, s, hq, d], None)``. ``attention_mask`` is ignored: the mask is built from positions
    (see the module docstring)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = _window(sliding_window)
    if plait_step is not None:
        key, value, mask = plait_step.keys_values(module.layer_idx, key, value, window)
        if softcap is None and not module.training:
            # Serving: one fused call over the cached keys, the query heads reading their shared KV head in place
            # (no repeated or upcast copies of a long cache; the fused kernels accumulate 16-bit inputs in float32).
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                 enable_gqa=query.shape[1] != key.shape[1])
            return out.transpose(1, 2).contiguous(), None
    else:
        length = key.shape[2]
        mask = None if window is None or window >= length else causal_mask(query.shape[2], length, window, query.device)
    p = float(dropout) if module.training else 0.0
    upcast = query.dtype in _LOW_PRECISION
    gqa = query.shape[1] != key.shape[1]
    if p == 0.0 and softcap is None and not upcast:      # fused, the query heads reading their KV head in place
        if mask is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scale,
                                                 enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if gqa:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    compute = torch.float32 if upcast else query.dtype
    scores = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(query.shape[2], key.shape[2], None, query.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(value.dtype)
    if p > 0.0:
        probs = dropout_heads(probs, p, f"layers.{module.layer_idx}.attention_probs",
                              getattr(module, "plait_head_offset", 0),
                              getattr(module, "plait_num_heads", probs.shape[1]))
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_plait_attention(config) -> None:
    """Register :func:`plait_attention` with transformers and make ``config``'s modules call it."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, plait_attention)
    config._attn_implementation = IMPLEMENTATION
