"""One forward step of this rank's pipeline stage over a batch of requests, reading and writing the KV cache.

The step is the model family's own stage forward (:mod:`plait.parallel.families`, the same code
as training and ``logits``) given a :class:`CachedStep`: plait's attention function then writes
the new keys and values into the (paged) cache and attends over the cached ones with the step's
mask. Row ``r`` brings ``lengths[r]`` new tokens starting at position ``starts[r]`` (a prompt
chunk, or one token at decode); rows are padded to the longest:

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

Padding tokens never reach the cache and no real token attends to them. So that a one-token
decode row never pays for a long prompt chunk's padding, the engine runs a step's decode rows
and its chunk rows as two such batches, or, when the chunks are short, the chunks' tokens as
one-token rows beside the decodes, one batch (:meth:`plait.serve.batch.StepBatch.parts`).

**The cache seam** (what plait's attention function calls, :mod:`plait.parallel.attention`):
``CachedStep.keys_values(layer_idx, k, v, window)`` stores the new keys and values of model layer
``layer_idx`` (:meth:`KVCache.write`) and returns every row's cached keys and values up to the
step's last position (:meth:`KVCache.read` through the block tables) with the boolean mask
``[batch, 1, seq, keys]`` (:meth:`StepInputs.attention_mask`). The family forward also reads
``positions`` and calls ``last_tokens``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kv_cache import KVCache, Placement


class StepInputs:
    """Where each row of a step reads and writes (see the module docstring): built from CPU tensors, kept on
    ``device``."""

    def __init__(self, tables: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, device=None,
                 keep: Optional[torch.Tensor] = None, prompt_lens: Optional[torch.Tensor] = None) -> None:
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.keep = None if keep is None or bool(keep.all()) else keep.nonzero().flatten().to(self.device)
        seq = int(lengths.max())
        offsets = torch.arange(seq)
        positions = starts[:, None] + offsets[None, :]
        valid = offsets[None, :] < lengths[:, None]
        self.num_keys = int((starts + lengths).max())
        self._cpu = (positions, valid)
        self._cpu_tables = tables
        self.tables, self.lengths, self.positions = (t.to(self.device) for t in (tables, lengths, positions))
        self._prompt_lens, self._rope_lengths = prompt_lens, None

    @property
    def rope_lengths(self) -> Optional[torch.Tensor]:
        """Each token's sequence length as transformers' generate sees it: the whole prompt while prefilling,
        then position + 1 (padding: its row's prompt length); built on first use, since only rotary types whose
        tables depend on it read it (:mod:`plait.parallel.families.llama`). None without prompt lengths."""
        if self._rope_lengths is None and self._prompt_lens is not None:
            positions, valid = self._cpu
            prompt = self._prompt_lens[:, None]
            self._rope_lengths = torch.where(valid, torch.maximum(prompt, positions + 1), prompt).to(self.device)
        return self._rope_lengths

    def placement(self, block_size: int) -> Placement:
        """Found on the CPU (no device sync for ``nonzero``), then moved to the device."""
        return Placement.of(self._cpu_tables, *self._cpu, block_size).to(self.device)

    def attention_mask(self, window: Optional[int]) -> torch.Tensor:
        """Boolean ``[batch, 1, seq, keys]``: a token sees cached positions up to its own (within the window).

        Padding queries see position 0 only, so no row of the softmax is empty.
        """
        positions, valid = self._cpu
        keys = torch.arange(self.num_keys)
        allowed = keys[None, None, :] <= positions[:, :, None]
        if window:
            allowed &= positions[:, :, None] - keys[None, None, :] < window
        allowed |= (~valid)[:, :, None] & (keys == 0)[None, None, :]
        return allowed[:, None].to(self.device)


class CachedStep:
    """A serving step as the model family's forward sees it (its ``step`` argument): where each token sits,
    and the KV cache that plait's attention function reads and writes (:mod:`plait.parallel.attention`)."""

    def __init__(self, inputs: StepInputs, cache: KVCache, first_layer: int) -> None:
        self.inputs, self.cache, self.first_layer = inputs, cache, first_layer
        self.positions = inputs.positions
        self.where = inputs.placement(cache.block_size)
        self._masks: dict[Optional[int], torch.Tensor] = {}

    @property
    def rope_lengths(self) -> Optional[torch.Tensor]:
        """Each token's sequence length for the rotary tables (:attr:`StepInputs.rope_lengths`)."""
        return self.inputs.rope_lengths

    def keys_values(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, window: Optional[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's keys and values ``[batch, kv_heads, seq, head_dim]`` of model layer ``layer_idx``;
        return all the rows' cached keys and values and the boolean mask ``[batch, 1, seq, keys]``."""
        if window not in self._masks:
            self._masks[window] = self.inputs.attention_mask(window)
        layer = layer_idx - self.first_layer
        self.cache.write(layer, self.where, k, v)
        keys, values = self.cache.read(layer, self.inputs.tables, self.inputs.num_keys)
        return keys, values, self._masks[window]

    def last_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Each row's hidden state at its last real token: ``[batch, seq, H] -> [batch, H]``; only the rows
        ``keep`` names, when the step has a ``keep`` (a request's tokens spread over one-token rows)."""
        rows = self.inputs.keep
        if rows is None:
            rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, self.inputs.lengths[rows] - 1]


class StageRunner:
    """Runs one :class:`~plait.parallel.stage.DecoderStage` step by step against its own KV cache."""

    def __init__(self, stage, cache: KVCache) -> None:
        if not stage.family.serves:
            raise ValueError(f"plait serve does not run the {stage.family.name!r} family")
        self.stage, self.cache = stage, cache

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        return self.stage(x, CachedStep(step, self.cache, self.stage.layer_range.start))
