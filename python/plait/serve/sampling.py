"""Sampling parameters of one request, and choosing its next token from full-vocabulary logits.

Sampling is stateless: token ``i`` of a request with seed ``s`` is drawn with a generator
seeded from ``(s, i)``, so a request draws the same tokens whatever batch it shares, on
whichever replica, and a rank never needs another rank's generator state. The token is
drawn on one rank (the first TP rank of the last pipeline stage) and sent to all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

MAX_SEED = 2 ** 53      # seeds travel to the sampling rank as exact integers


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature`` 0 is greedy (argmax); ``top_k`` 0 keeps every token; ``top_p`` 1 keeps
    the whole distribution. ``seed`` None draws one when the request is admitted.
    ``timeout`` (seconds > 0, None: no limit of its own) is the request's deadline counted from its
    submission; a server caps it by its own request timeout.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False
    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**53), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = tuple(self.stop)
        if self.timeout is not None:
            if (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                    or not math.isfinite(self.timeout) or self.timeout <= 0):
                raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout!r}")
            self.timeout = float(self.timeout)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_generator(seed: int, index: int) -> torch.Generator:
    """The generator for token ``index`` of a request seeded with ``seed`` (see the module docstring)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))


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
