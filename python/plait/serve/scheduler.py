"""Continuous batching on the leader rank: a bounded waiting queue, cache slots, stop rules, events.

Every engine iteration the scheduler admits waiting requests into free cache slots (they
are prefilled together, each from position 0), then decodes one token for every running
request, each at its own position. A request leaves the batch the step it finishes
(EOS, a stop string, ``max_tokens``, the context, its deadline or a cancel) and its slot
is free for the next waiting request.

For a pipelined replica (``groups = pp > 1``) the running requests fall into ``groups``
groups by cache slot (slot ``s`` is in group ``s % groups``; a new request takes the lowest
free slot of the group with the fewest running requests, so the groups stay even). :meth:`Scheduler.group_step`
plans one group's next step: the prefill of its newly admitted requests if it has any, else
one decode token for each of its requests. The engine keeps at most one step per group in
flight, so two steps in flight never touch the same cache slot, and a slot freed while its
group's step is in flight is only reused by a later step of that same group.

A request may carry its own deadline (``SamplingParams.timeout``, seconds from submission);
past it the request ends with finish reason ``"deadline"`` and an error, and frees its slot.
"""
from __future__ import annotations

import collections
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .batch import Row, StepBatch
from .kv_cache import SlotPool
from .sampling import MAX_SEED, Sampled, SamplingParams
from .text import TextStream


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; try again later."""


@dataclass
class Request:
    """One generation request and its progress."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    deadline: Optional[float] = None          # time.monotonic() bound
    generated: list[int] = field(default_factory=list)
    slot: Optional[int] = None
    finish_reason: Optional[str] = None
    stream: Optional[TextStream] = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    seq_id: int = -1                          # the request's id in step messages (set by the scheduler)
    mirrored: int = 0                         # positions the sampler has recorded (penalized requests)

    @property
    def tokens(self) -> list[int]:
        """Every token of the request so far: the prompt, then the generated ones."""
        return self.prompt + self.generated


@dataclass
class Event:
    """Progress of a request: a new token (with the text it settles), or its end."""

    rid: str
    token: Optional[int]
    text: str
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: Optional[float] = None
    logprob: Optional[float] = None           # of ``token``, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()


def check_prompt(prompt: list[int], max_len: int, vocab_size: Optional[int]) -> None:
    """ValueError for a prompt that can never run: empty, ids outside the vocabulary, longer than the context."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    if len(prompt) > max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than the context of {max_len}")


class Scheduler:
    """See the module docstring. ``max_len`` is the cache length; ``eos`` the end-of-sequence ids."""

    def __init__(self, max_batch: int, max_queue: int, max_len: int, eos: Iterable[int] = (), tokenizer=None,
                 vocab_size: Optional[int] = None, groups: int = 1) -> None:
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
        self.groups = groups
        self.slots = SlotPool(max_batch)
        self.max_queue, self.max_len, self.eos = max_queue, max_len, frozenset(eos)
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}
        self.seq_ids = itertools.count()
        self.releases: list[int] = []          # ended penalized requests, for the next step message

    # ----------------------------------------------------------------- intake
    def submit(self, request: Request) -> None:
        """Queue ``request``; ValueError if it can never run, QueueFull if the queue is at its bound."""
        check_prompt(request.prompt, self.max_len, self.vocab_size)
        if len(self.waiting) >= self.max_queue + len(self.slots.free):
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
        if request.params.seed is None:
            request.params.seed = random.randrange(MAX_SEED)
        if request.params.timeout is not None:
            own = request.submitted + request.params.timeout
            request.deadline = own if request.deadline is None else min(request.deadline, own)
        request.stream = TextStream(self.tokenizer, request.params.stop)
        request.seq_id = next(self.seq_ids)
        self.waiting.append(request)

    def cancel(self, rid: str, reason: str = "cancelled") -> list[Event]:
        for request in list(self.waiting):
            if request.rid == rid:
                self.waiting.remove(request)
                return [self._end(request, reason)]
        if rid in self.running:
            return [self._end(self.running[rid], reason)]
        return []

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def outstanding_tokens(self) -> int:
        """Tokens still to generate for every queued and running request (the router's load measure)."""
        return sum(r.params.max_tokens - len(r.generated) for r in (*self.waiting, *self.running.values()))

    # ----------------------------------------------------------------- steps
    def expire(self, now: Optional[float] = None) -> list[Event]:
        """End every request past its deadline."""
        now = time.monotonic() if now is None else now
        late = [r for r in (*self.waiting, *self.running.values()) if r.deadline is not None and now > r.deadline]
        events = []
        for request in late:
            if request in self.waiting:
                self.waiting.remove(request)
            limit = request.deadline - request.submitted
            events.append(self._end(request, "deadline",
                                    error=f"the request passed its deadline of {limit:.3g} s"))
        return events

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots (lowest slot first); returns the admitted ones."""
        admitted = []
        while self.waiting and self.slots.free:
            request = self.waiting.popleft()
            request.slot = self._take_slot()
            self.running[request.rid] = request
            admitted.append(request)
        return admitted

    def _take_slot(self) -> int:
        if self.groups == 1:
            return self.slots.take()
        load = collections.Counter(r.slot % self.groups for r in self.running.values())
        slot = min(self.slots.free, key=lambda s: (load[s % self.groups], s))
        self.slots.free.remove(slot)
        return slot

    def prefill_batch(self) -> Optional[tuple[StepBatch, list[Request]]]:
        """Admit waiting requests into free slots; the step that reads their prompts."""
        return self._prefill(self.admit())

    def decode_batch(self) -> Optional[tuple[StepBatch, list[Request]]]:
        """One new token for every running request, each at its own position."""
        return self._decode([r for r in self.running.values() if r.generated])

    def group_step(self, group: int) -> Optional[tuple[StepBatch, list[Request]]]:
        """The next step of slot group ``group`` (pipelined replicas): the prefill of its new requests if it
        has any, else a decode of all of them; None when the group is empty. Call :meth:`admit` first."""
        members = [r for r in self.running.values() if r.slot % self.groups == group]
        return self._prefill([r for r in members if not r.generated]) or self._decode(members)

    def _prefill(self, requests: list[Request]) -> Optional[tuple[StepBatch, list[Request]]]:
        if not requests:
            return None
        return self._build([self._row(r, r.prompt, 0) for r in requests]), requests

    def _decode(self, requests: list[Request]) -> Optional[tuple[StepBatch, list[Request]]]:
        if not requests:
            return None
        return self._build([self._row(r, r.generated[-1:], len(r.tokens) - 1) for r in requests]), requests

    def _build(self, rows: list[Row]) -> StepBatch:
        batch = StepBatch.build(rows, self.releases)
        self.releases = []
        return batch

    def _row(self, request: Request, tokens: list[int], start: int, samples: bool = True) -> Row:
        history = []
        if request.params.penalized:           # the sampler records every position once (plait.serve.sampler)
            history = request.tokens[request.mirrored:start]
            request.mirrored = start + len(tokens)
        return Row([request.slot], start, tokens, request.seq_id, len(request.prompt), samples, request.params,
                   len(request.generated), history)

    def complete(self, requests: list[Request], chosen: list[Optional[Sampled]]) -> list[Event]:
        """Take each request's new token (None: the row drew none); returns its event (and ends the finished
        ones)."""
        now = time.monotonic()
        events = []
        for request, sampled in zip(requests, chosen):
            if request.rid not in self.running or sampled is None:     # cancelled while its step ran
                continue
            token = sampled.token
            if request.first_token_at is None:
                request.first_token_at = now
            request.generated.append(token)
            request.stream.update(request.generated[:-1] if token in request.params.stop_token_ids
                                  else request.generated)
            reason = self._finish_reason(request, token)
            logprobs = {}
            if request.params.logprobs is not None:
                logprobs = dict(logprob=sampled.logprob, top_logprobs=sampled.top[:request.params.logprobs])
            if reason is None:
                events.append(Event(request.rid, token, request.stream.delta(final=False),
                                    prompt_tokens=len(request.prompt), completion_tokens=len(request.generated),
                                    ttft_s=now - request.submitted if len(request.generated) == 1 else None,
                                    **logprobs))
            else:
                events.append(self._end(request, reason, token=token, **logprobs))
        return events

    def _finish_reason(self, request: Request, token: int) -> Optional[str]:
        if token in self.eos and not request.params.ignore_eos:
            return "stop"
        if token in request.params.stop_token_ids or request.stream.stopped:
            return "stop"
        if len(request.generated) >= request.params.max_tokens:
            return "length"
        if len(request.prompt) + len(request.generated) > self.max_len:
            return "length"
        return None

    def _end(self, request: Request, reason: str, token: Optional[int] = None, error: Optional[str] = None,
             logprob: Optional[float] = None, top_logprobs: tuple = ()) -> Event:
        request.finish_reason = reason
        if request.slot is not None and self.running.pop(request.rid, None) is not None:
            self.slots.give(request.slot)
        if request.params.penalized and request.mirrored:
            self.releases.append(request.seq_id)
        text = request.stream.delta(final=True) if request.stream else ""
        ttft = None
        if token is not None and len(request.generated) == 1:
            ttft = time.monotonic() - request.submitted
        return Event(request.rid, token, text, finish_reason=reason, error=error, prompt_tokens=len(request.prompt),
                     completion_tokens=len(request.generated), ttft_s=ttft, logprob=logprob,
                     top_logprobs=top_logprobs)
