"""Sampling parameters of one request, and choosing its next token from full-vocabulary logits.

Sampling is stateless: token ``i`` of a request with seed ``s`` is drawn with a generator
seeded from ``(s, i)``, so a request draws the same tokens whatever batch it shares, on
whichever replica, and a rank never needs another rank's generator state. The token is
drawn on one rank (the first TP rank of the last pipeline stage) and sent to all.

The logits of a row go through, in this order (vLLM's and transformers' order):

1. ``repetition_penalty`` (transformers' definition): every token id seen in the prompt or the
   output so far has its logit divided by the penalty when positive, multiplied when negative;
2. ``frequency_penalty`` and ``presence_penalty`` (OpenAI's definition): a token's logit drops by
   ``frequency * count + presence * (count > 0)``, ``count`` its occurrences in the output so far;
3. temperature, top-k, top-p, then the draw (or the argmax when greedy).

Log-probabilities (``logprobs``) are those of the model itself, ``log_softmax`` of the raw logits
in float64, before penalties and temperature (what vLLM returns by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

MAX_SEED = 2 ** 53      # seeds travel to the sampling rank as exact integers
MAX_LOGPROBS = 20       # top log-probabilities per token, at most (OpenAI's bound for chat)


class BadParam(ValueError):
    """A sampling parameter out of its range: ``param`` names it, ``rule`` says what it must be."""

    def __init__(self, param: str, rule: str, value) -> None:
        super().__init__(f"{param} {rule}, got {value!r}")
        self.param, self.rule, self.value = param, rule, value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How one request picks its tokens, what it reports, and when it stops.

    ``temperature`` 0 is greedy (argmax); ``top_k`` 0 keeps every token; ``top_p`` 1 keeps
    the whole distribution. ``seed`` None draws one when the request is admitted. Penalties
    (see the module docstring): ``presence_penalty`` and ``frequency_penalty`` in [-2, 2] (0: off),
    ``repetition_penalty`` > 0 (1: off). ``logprobs`` None reports none; ``k`` in [0, 20] reports
    each chosen token's log-probability and the ``k`` likeliest alternatives.
    ``stop`` strings end the text before them; ``stop_token_ids`` end the request (the id is kept in
    the token ids, as EOS is, but adds no text).
    ``timeout`` (seconds > 0, None: no limit of its own) is the request's deadline counted from its
    submission; a server caps it by its own request timeout.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    timeout: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise BadParam("max_tokens", "must be an integer >= 1", self.max_tokens)
        if not _is_number(self.temperature) or self.temperature < 0:
            raise BadParam("temperature", "must be a finite number >= 0", self.temperature)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise BadParam("top_k", "must be an integer >= 0 (0: no limit)", self.top_k)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise BadParam("top_p", "must be a number in (0, 1]", self.top_p)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise BadParam("seed", "must be an integer in [0, 2**53)", self.seed)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise BadParam("stop", "must be a string or a list of non-empty strings", self.stop)
        self.stop = tuple(self.stop)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise BadParam("stop_token_ids", "must be a list of token ids >= 0", self.stop_token_ids)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.timeout is not None:
            if not _is_number(self.timeout) or self.timeout <= 0:
                raise BadParam("timeout", "must be a finite number of seconds > 0", self.timeout)
            self.timeout = float(self.timeout)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise BadParam(name, "must be a number in [-2, 2]", value)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise BadParam("repetition_penalty", "must be a finite number > 0 (1: off)", self.repetition_penalty)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise BadParam("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token)",
                           self.logprobs)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.presence_penalty, self.frequency_penalty = float(self.presence_penalty), float(self.frequency_penalty)
        self.repetition_penalty = float(self.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a penalty applies, so the sampler must know the request's tokens."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class Sampled:
    """What the sampler chose for one row: the token, and when asked its log-probability and the
    ``logprobs`` likeliest ``(token, log-probability)`` pairs, likeliest first."""

    token: int
    logprob: Optional[float] = None
    top: tuple[tuple[int, float], ...] = ()


def token_generator(seed: int, index: int) -> torch.Generator:
    """The generator for token ``index`` of a request seeded with ``seed`` (see the module docstring)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))


def penalize(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float,
             repetition: float) -> torch.Tensor:
    """``logits`` ``[vocab]`` with the penalties applied (steps 1 and 2 of the module docstring): ``seen``
    marks the ids in the prompt or the output, ``counts`` counts each id in the output."""
    out = logits
    if repetition != 1.0:
        hit = logits[seen]
        out = out.clone()
        out[seen] = torch.where(hit < 0, hit * repetition, hit / repetition)
    if frequency != 0.0 or presence != 0.0:
        out = out - frequency * counts.to(out.dtype) - presence * (counts > 0).to(out.dtype)
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, index: int) -> int:
    """One token id from full-vocabulary ``logits`` ``[vocab]`` (float), by the rules of :class:`SamplingParams`."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    scores = logits.double() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs           # mass of the tokens ranked above each one
        drop = before >= top_p                                  # the first token is always kept
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=token_generator(seed, index)))


def logprobs_of(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of ``token`` under ``logits`` ``[vocab]`` (float64 ``log_softmax``) and the ``top``
    likeliest ``(id, log-probability)`` pairs."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    best = torch.topk(logp, top) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return float(logp[token]), pairs
