"""The step message rank 0 sends to every rank of a replica: what to run next.

Two broadcasts of int64 tensors over the replica's world: a fixed header ``[op, batch, seq]``,
then (for a step) the payload. Floats (temperature, top_p) travel as their float64 bits, so
every rank sees exactly the values rank 0 has.

=================  ==========================================
payload part       shape
=================  ==========================================
slots, starts,     ``[batch]`` each
lengths
tokens             ``[batch, seq]`` (0-padded)
temperature bits,  ``[batch]`` each (only the sampling rank
top_k, top_p bits, uses these)
seed, index
=================  ==========================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .forward import StepInputs

STEP, IDLE, STOP = 1, 2, 3
HEADER = 3
ROW_FIELDS = 8     # slots, starts, lengths, temperature, top_k, top_p, seed, index


@dataclass
class StepBatch:
    """One step: per row its slot, first position, new tokens, and sampling settings."""

    slots: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    tokens: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    index: torch.Tensor

    @classmethod
    def build(cls, rows: list[dict]) -> "StepBatch":
        """From rows ``{slot, start, tokens, temperature, top_k, top_p, seed, index}``."""
        seq = max(len(r["tokens"]) for r in rows)
        tokens = torch.zeros(len(rows), seq, dtype=torch.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r["tokens"])] = torch.tensor(r["tokens"], dtype=torch.int64)

        def column(key, dtype=torch.int64):
            return torch.tensor([r[key] for r in rows], dtype=dtype)

        return cls(column("slot"), column("start"), torch.tensor([len(r["tokens"]) for r in rows]), tokens,
                   column("temperature", torch.float64), column("top_k"), column("top_p", torch.float64),
                   column("seed"), column("index"))

    @property
    def inputs(self) -> StepInputs:
        return StepInputs(self.slots, self.starts, self.lengths)

    def header(self) -> torch.Tensor:
        return torch.tensor([STEP, *self.tokens.shape], dtype=torch.int64)

    def payload(self) -> torch.Tensor:
        rows = [self.slots, self.starts, self.lengths, self.temperature.view(torch.int64), self.top_k,
                self.top_p.view(torch.int64), self.seed, self.index]
        return torch.cat([torch.stack(rows, dim=1).reshape(-1), self.tokens.reshape(-1)])

    @classmethod
    def from_payload(cls, payload: torch.Tensor, batch: int, seq: int) -> "StepBatch":
        rows = payload[:batch * ROW_FIELDS].view(batch, ROW_FIELDS)
        tokens = payload[batch * ROW_FIELDS:].view(batch, seq)
        col = [rows[:, i].clone() for i in range(ROW_FIELDS)]
        return cls(col[0], col[1], col[2], tokens, col[3].view(torch.float64), col[4], col[5].view(torch.float64),
                   col[6], col[7])


def payload_size(batch: int, seq: int) -> int:
    return batch * (ROW_FIELDS + seq)
