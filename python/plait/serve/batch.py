"""The step message the leader sends to every rank of a replica: what to run next.

A fixed header of int64 ``[op, batch, tokens, width, history, releases]``, then (for a step) one
int64 payload. Floats (temperature, top_p, penalties) travel as their float64 bits, so every rank
sees exactly the values the leader has.

=================  =======================  ==================================================
payload part       shape                    what
=================  =======================  ==================================================
rows               ``[batch, ROW_FIELDS]``  per row: see :data:`ROW_FIELDS`
tokens             ``[tokens]``             new tokens of every row, packed row after row
tables             ``[batch, width]``       each row's KV-cache block table (0-padded)
history            ``[history]``            tokens the sampler has not seen for rows that track
                                            penalties (a prefix read from the cache), row by row
releases           ``[releases]``           sequence ids whose penalty state the sampler drops
=================  =======================  ==================================================

Row fields: ``start`` (position of the row's first new token), ``length`` (its new tokens),
``seq_id`` (the request's id on this replica), ``prompt_len``, ``samples`` (1 when the row's last
new token is the last one known, so a token is drawn; 0 for a prefill chunk that is not the
prompt's last), ``track`` (1 when the sampler keeps the request's tokens for penalties),
``history`` (how many history tokens are the row's), then the sampling settings.

The sampler answers each step with ``[batch, out_width]`` int64 (:attr:`StepBatch.out_width`): the
token (-1 for a row that does not sample) and, when some row asks for log-probabilities, the
token's log-probability and ``k`` (id, log-probability) pairs, the log-probabilities as float64 bits.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import torch

from .forward import StepInputs
from .sampling import Sampled, SamplingParams

STEP, IDLE, STOP = 1, 2, 3
SPLIT_TOKENS = 32       # a step's multi-token rows up to this many tokens in all run as one-token rows
HEADER = 6
ROW_FIELDS = ("start", "length", "seq_id", "prompt_len", "samples", "track", "history", "temperature", "top_k",
              "top_p", "seed", "index", "presence", "frequency", "repetition", "logprobs")
FLOAT_FIELDS = frozenset({"temperature", "top_p", "presence", "frequency", "repetition"})
_COLUMN = {name: i for i, name in enumerate(ROW_FIELDS)}


def control(op: int) -> torch.Tensor:
    """The header of an IDLE or STOP message."""
    return torch.tensor([op] + [0] * (HEADER - 1), dtype=torch.int64)


@dataclass
class Row:
    """One row of a step as the leader plans it."""

    table: list[int]
    start: int
    tokens: list[int]
    seq_id: int
    prompt_len: int
    samples: bool
    params: SamplingParams
    index: int
    history: list[int]

    def fields(self) -> list[int]:
        p = self.params
        logprobs = -1 if p.logprobs is None else p.logprobs
        values = dict(start=self.start, length=len(self.tokens), seq_id=self.seq_id, prompt_len=self.prompt_len,
                      samples=int(self.samples), track=int(p.penalized), history=len(self.history),
                      temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed, index=self.index,
                      presence=p.presence_penalty, frequency=p.frequency_penalty, repetition=p.repetition_penalty,
                      logprobs=logprobs)
        return [float_bits(values[name]) if name in FLOAT_FIELDS else int(values[name]) for name in ROW_FIELDS]


def float_bits(value: float) -> int:
    """The float64 bits of ``value`` as an int64 (how floats travel in int64 messages)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


@dataclass
class StepBatch:
    """One step: see the module docstring for its parts."""

    rows: torch.Tensor
    tokens: torch.Tensor
    tables: torch.Tensor
    history: torch.Tensor
    releases: torch.Tensor

    @classmethod
    def build(cls, rows: list[Row], releases: Optional[list[int]] = None) -> "StepBatch":
        width = max(1, max(len(r.table) for r in rows))
        tables = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            tables[i, :len(r.table)] = torch.tensor(r.table, dtype=torch.int64)
        tokens = torch.tensor([t for r in rows for t in r.tokens], dtype=torch.int64)
        history = [t for r in rows for t in r.history]
        return cls(torch.tensor([r.fields() for r in rows], dtype=torch.int64).view(len(rows), len(ROW_FIELDS)),
                   tokens, tables, torch.tensor(history, dtype=torch.int64),
                   torch.tensor(list(releases or ()), dtype=torch.int64))

    def column(self, name: str) -> torch.Tensor:
        """Row field ``name`` of every row (float64 for the float fields)."""
        values = self.rows[:, _COLUMN[name]]
        return values.view(torch.float64) if name in FLOAT_FIELDS else values

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    def parts(self) -> list["Part"]:
        """The step as the forward runs it (see :mod:`plait.serve.forward`): one padded batch of its one-token
        rows and one of its longer rows; or, when the longer rows bring at most :data:`SPLIT_TOKENS` tokens in
        all, one batch in which each of their tokens is a one-token row of its own (so the whole step reads the
        weights once). No row reads what another row of its step writes in an earlier part, so the order of
        the parts is free."""
        lengths, starts, prompt_lens = self.column("length"), self.column("start"), self.column("prompt_len")
        single = lengths == 1
        if int(lengths[~single].sum()) <= SPLIT_TOKENS:
            rows = torch.repeat_interleave(torch.arange(self.size), lengths)
            first = torch.cumsum(lengths, 0) - lengths
            offset = torch.arange(rows.numel()) - first[rows]
            keep = offset == lengths[rows] - 1                           # each row's last token gives its logits
            return [Part(rows, self.tokens[:, None].clone(), self.tables[rows], starts[rows] + offset,
                         torch.ones_like(rows), keep, prompt_lens[rows])]
        offsets = torch.cumsum(lengths, 0) - lengths
        parts = []
        for which in (~single, single):
            rows = which.nonzero().flatten()
            if rows.numel() == 0:
                continue
            seq = int(lengths[rows].max())
            tokens = torch.zeros(rows.numel(), seq, dtype=torch.int64)
            for i, r in enumerate(rows.tolist()):
                tokens[i, :lengths[r]] = self.tokens[offsets[r]:offsets[r] + lengths[r]]
            parts.append(Part(rows, tokens, self.tables[rows], starts[rows], lengths[rows],
                              torch.ones(rows.numel(), dtype=torch.bool), prompt_lens[rows]))
        return parts

    def row_tokens(self) -> list[list[int]]:
        """The new tokens of each row."""
        return [part.tolist() for part in self.tokens.split(self.column("length").tolist())]

    @property
    def out_width(self) -> int:
        """Columns of the sampler's answer: the token, then (when a row asks) logprob and k pairs."""
        k = int(self.column("logprobs").max())
        return 1 if k < 0 else 2 + 2 * k

    def header(self) -> torch.Tensor:
        return torch.tensor([STEP, self.size, self.tokens.numel(), self.tables.shape[1], self.history.numel(),
                             self.releases.numel()], dtype=torch.int64)

    def payload(self) -> torch.Tensor:
        return torch.cat([self.rows.reshape(-1), self.tokens, self.tables.reshape(-1), self.history, self.releases])

    @classmethod
    def from_payload(cls, payload: torch.Tensor, header: list[int]) -> "StepBatch":
        _, batch, tokens, width, history, releases = header
        sizes = [batch * len(ROW_FIELDS), tokens, batch * width, history, releases]
        rows, toks, tables, hist, rel = (part.clone() for part in payload.split(sizes))
        return cls(rows.view(batch, len(ROW_FIELDS)), toks, tables.view(batch, width), hist, rel)


@dataclass
class Part:
    """Part of a step as one padded batch: its row ``i`` runs ``tokens[i]`` of step row ``rows[i]`` (with that
    row's block table) from position ``starts[i]``; ``keep[i]`` when its last token is the step row's last, so
    its logits are the step row's."""

    rows: torch.Tensor
    tokens: torch.Tensor
    tables: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    keep: torch.Tensor
    prompt_lens: torch.Tensor

    def inputs(self, device=None) -> StepInputs:
        """The part's layout for the forward (:class:`~plait.serve.forward.StepInputs`), on ``device``."""
        return StepInputs(self.tables, self.starts, self.lengths, device, self.keep, self.prompt_lens)


def payload_size(header: list[int]) -> int:
    _, batch, tokens, width, history, releases = header
    return batch * (len(ROW_FIELDS) + width) + tokens + history + releases


def unpack_outputs(out: torch.Tensor) -> list[Optional[Sampled]]:
    """The sampler's answer ``[batch, out_width]`` as one :class:`Sampled` per row (None: the row drew none)."""
    chosen = []
    for row in out:
        token = int(row[0])
        if token < 0:
            chosen.append(None)
            continue
        if row.numel() == 1:
            chosen.append(Sampled(token))
            continue
        floats = row.clone().view(torch.float64)        # [token, logprob, id, logprob, id, logprob, ...]
        top = tuple((i, lp) for i, lp in zip(row[2::2].tolist(), floats[3::2].tolist()) if i >= 0)
        chosen.append(Sampled(token, float(floats[1]), top))
    return chosen
