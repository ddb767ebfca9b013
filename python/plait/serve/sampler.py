"""The sampling rank's part of a step: the token history penalties need, and the answer it sends back.

The sampler (first TP rank of the last stage) is not the leader when ``pp > 1``, so it keeps its
own record of each penalized request's tokens, built from the step messages alone: a row's new
tokens at positions ``[start, start + length)``, preceded by the row's ``history`` tokens (a
prefix the row read from the cache instead of computing it, sent once). Positions below the
row's ``prompt_len`` are prompt tokens, the rest output tokens. The leader sends a request's
sequence id in ``releases`` once it ends, and the record is dropped.

==========  =====================  ======================================================
record      shape                  what
==========  =====================  ======================================================
``seen``    ``[vocab]`` bool       ids in the prompt or the output (repetition penalty)
``counts``  ``[vocab]`` int64      occurrences of each id in the output (presence, frequency)
``length``  int                    positions recorded; the next row must start here
==========  =====================  ======================================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import ROW_FIELDS, StepBatch, float_bits
from .sampling import logprobs_of, penalize, sample


@dataclass
class _Record:
    seen: torch.Tensor
    counts: torch.Tensor
    length: int = 0


class Histories:
    """Token records of the penalized requests of one replica, on its sampler (see the module docstring)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.records: dict[int, _Record] = {}

    def feed(self, seq_id: int, start: int, tokens: list[int], prompt_len: int) -> None:
        """Record ``tokens`` at positions ``[start, start + len(tokens))`` of request ``seq_id``."""
        record = self.records.get(seq_id)
        if record is None:
            record = self.records[seq_id] = _Record(torch.zeros(self.vocab_size, dtype=torch.bool),
                                                    torch.zeros(self.vocab_size, dtype=torch.int64))
        if start != record.length:
            raise RuntimeError(f"sampler: request {seq_id} sent positions from {start}, but {record.length} are "
                               f"recorded (a step message was lost or reordered)")
        ids = torch.tensor(tokens, dtype=torch.int64)
        record.seen[ids] = True
        output = ids[max(0, prompt_len - start):]
        record.counts.index_add_(0, output, torch.ones_like(output))
        record.length = start + len(tokens)

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self.records.pop(seq_id, None)

    def penalized(self, logits: torch.Tensor, seq_id: int, presence: float, frequency: float,
                  repetition: float) -> torch.Tensor:
        record = self.records[seq_id]
        return penalize(logits, record.seen, record.counts, presence, frequency, repetition)


def sample_step(logits: torch.Tensor, batch: StepBatch, histories: Histories) -> torch.Tensor:
    """The answer ``[batch, out_width]`` (see :mod:`plait.serve.batch`) for full-vocabulary ``logits``
    ``[batch, vocab]`` of each row's last new token (16-bit logits are read in float32); updates ``histories``
    first."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    col = {name: batch.column(name).tolist() for name in ROW_FIELDS}
    tokens = batch.row_tokens() if any(col["track"]) else []
    offset = 0
    for r in range(batch.size):
        if col["track"][r]:
            count = col["history"][r]
            before = batch.history[offset:offset + count].tolist()
            offset += count
            histories.feed(col["seq_id"][r], col["start"][r] - count, before + tokens[r], col["prompt_len"][r])
    histories.release(batch.releases.tolist())
    out = torch.full((batch.size, batch.out_width), -1, dtype=torch.int64)
    for r in range(batch.size):
        if not col["samples"][r]:
            continue
        scores = logits[r]
        if col["track"][r]:
            scores = histories.penalized(scores, col["seq_id"][r], col["presence"][r], col["frequency"][r],
                                         col["repetition"][r])
        token = sample(scores, col["temperature"][r], col["top_k"][r], col["top_p"][r], col["seed"][r],
                       col["index"][r])
        out[r, 0] = token
        if col["logprobs"][r] >= 0:
            logprob, top = logprobs_of(logits[r], token, col["logprobs"][r])
            out[r, 1] = float_bits(logprob)
            for j, (i, lp) in enumerate(top):
                out[r, 2 + 2 * j], out[r, 3 + 2 * j] = i, float_bits(lp)
    return out
