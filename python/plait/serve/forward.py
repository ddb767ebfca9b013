"""One forward step of this rank's pipeline stage over a batch of requests, reading and writing the KV cache.

The step is the model family's own stage forward (:mod:`plait.parallel.families`, the same code
as training and ``logits``) given a :class:`CachedStep`: plait's attention function then writes
the new keys and values into the cache and attends over the cached ones with the step's mask.
Row ``r`` of a batch brings ``lengths[r]`` new tokens starting at position ``starts[r]``
(a whole prompt at prefill, one token at decode); rows are padded to the longest:

==============  =========================  ==========================================
name            shape                      meaning
==============  =========================  ==========================================
``tokens``      ``[batch, seq]``           new token ids (first stage), padded with 0
``hidden``      ``[batch, seq, H]``        what the previous stage sent (other stages)
``slots``       ``[batch]``                each row's cache slot
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

from .kv_cache import KVCache, Placement


@dataclass
class StepInputs:
    """Where each row of a step reads and writes (see the module docstring)."""

    slots: torch.Tensor
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


class CachedStep:
    """A serving step as the model family's forward sees it (its ``step`` argument): where each token sits,
    and the KV cache that plait's attention function reads and writes (:mod:`plait.parallel.attention`)."""

    def __init__(self, inputs: StepInputs, cache: KVCache, first_layer: int) -> None:
        self.inputs, self.cache, self.first_layer = inputs, cache, first_layer
        self.positions, self.valid = inputs.positions(cache.max_len)
        self.where = Placement.of(inputs.slots, self.positions, self.valid)
        self._masks: dict[Optional[int], torch.Tensor] = {}

    def keys_values(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, window: Optional[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's keys and values ``[batch, kv_heads, seq, head_dim]`` of model layer ``layer_idx``;
        return all the rows' cached keys and values and the boolean mask ``[batch, 1, seq, keys]``."""
        if window not in self._masks:
            self._masks[window] = self.inputs.attention_mask(self.positions, self.valid, window)
        mask = self._masks[window]
        layer = layer_idx - self.first_layer
        self.cache.write(layer, self.where, k, v)
        keys, values = self.cache.read(layer, self.inputs.slots, mask.shape[-1])
        return keys, values, mask

    def last_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Each row's hidden state at its last real token: ``[batch, seq, H] -> [batch, H]``."""
        return h[torch.arange(h.shape[0], device=h.device), self.inputs.lengths.to(h.device) - 1]


class StageRunner:
    """Runs one :class:`~plait.parallel.stage.DecoderStage` step by step against its own KV cache."""

    def __init__(self, stage, cache: KVCache) -> None:
        if not stage.family.serves:
            raise ValueError(f"plait serve does not run the {stage.family.name!r} family")
        self.stage, self.cache = stage, cache

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        return self.stage(x, CachedStep(step, self.cache, self.stage.layer_range.start))
