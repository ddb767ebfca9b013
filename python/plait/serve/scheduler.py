"""Continuous batching on the leader rank: admission by free KV-cache blocks, prefix caching, chunked
prefill under a token budget, stop rules, events.

**Admission.** Waiting requests are admitted in order while fewer than ``max_batch`` run and the
cache has the blocks for the request's prompt (:mod:`plait.serve.blocks`): first the longest run
of its prompt's full blocks that the prefix cache holds (those positions are not computed again),
then fresh blocks for the rest. A request whose next block another running request is computing
right now waits one more iteration, so a burst of requests sharing a system prompt computes it
once. ``submit`` refuses only what can never run; a full waiting queue is :class:`QueueFull`.

**Steps.** Every step feeds each running request its pending tokens (all known tokens whose keys
and values are not in the cache yet), under a budget of ``max_step_tokens`` per step: one-token
decodes first, then prompt chunks in admission order, so a long prompt is prefilled over several
steps while the running requests keep decoding. A row whose last fed token is the request's last
known token draws the next token. Blocks a request fills with known tokens are offered to the
prefix cache at once (every rank runs the steps in order, so a later step that reads them finds
them written; a row of the same step does too, see :mod:`plait.serve.attention`).

**Preemption.** A decode that needs a new block when none is available takes the blocks of the
most recently admitted request that has no row in this step: that request goes back to the head
of the waiting queue with the tokens it has, and is prefilled again when readmitted (mostly from
the prefix cache). Its seeded sampling draws the same tokens, since a draw depends on (seed, index).

**Pipelined replicas** (``groups = pp > 1``): a request belongs to the group that had the fewest
requests when it was admitted; :meth:`Scheduler.plan` plans one group's step, and the engine keeps
at most one step per group in flight, so a request never has two steps in flight. An answer that
comes back for a request that ended or was preempted meanwhile is dropped (its ``seq_id`` changed).

A request may carry its own deadline (``SamplingParams.timeout``, seconds from submission);
past it the request ends with finish reason ``"deadline"`` and an error, and frees its blocks.
"""
from __future__ import annotations

import collections
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .batch import Row, StepBatch
from .blocks import BlockPool, block_keys
from .kv_cache import blocks_for
from .options import BLOCK_SIZE, MAX_STEP_TOKENS
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
    finish_reason: Optional[str] = None
    stream: Optional[TextStream] = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    seq_id: int = -1                          # the request's id in step messages; new when it is readmitted
    mirrored: int = 0                         # positions the sampler has recorded (penalized requests)
    blocks: list[int] = field(default_factory=list)       # its block table
    keys: list[bytes] = field(default_factory=list)       # hash chain keys of the full blocks of its tokens
    computed: int = 0                         # positions whose keys and values are in the cache (or on the way)
    registered: int = 0                       # blocks offered to the prefix cache
    cached: int = 0                           # prompt tokens read from the prefix cache at first admission
    group: int = 0
    order: int = -1                           # admission order (the latest is preempted first)
    promised: int = 0                         # keys[registered:promised] are being computed (see Scheduler.computing)

    @property
    def tokens(self) -> list[int]:
        """Every token of the request so far: the prompt, then the generated ones (a new list)."""
        return self.prompt + self.generated

    @property
    def length(self) -> int:
        """``len(tokens)``, without building it."""
        return len(self.prompt) + len(self.generated)

    def span(self, start: int, stop: int) -> list[int]:
        """``tokens[start:stop]`` (0 <= start <= stop <= length), without joining the whole context."""
        cut = len(self.prompt)
        if stop <= cut:
            return self.prompt[start:stop]
        if start >= cut:
            return self.generated[start - cut:stop - cut]
        return self.prompt[start:] + self.generated[:stop - cut]

    @property
    def pending(self) -> int:
        """Known tokens not yet fed to the model."""
        return self.length - self.computed


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
    cached_tokens: int = 0                    # prompt tokens read from the prefix cache


@dataclass
class Planned:
    """A step as planned: its message, and per row the request and the ``seq_id`` it had."""

    batch: StepBatch
    requests: list[Request]
    seq_ids: list[int]


def check_prompt(prompt: list[int], max_len: int, vocab_size: Optional[int]) -> None:
    """ValueError for a prompt that can never run: empty, ids outside the vocabulary, longer than the context."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    if len(prompt) > max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than the context of {max_len}")


class Scheduler:
    """See the module docstring. ``max_len`` is the most positions a request may use; ``eos`` the
    end-of-sequence ids; ``num_blocks`` the cache's blocks (default: ``max_batch`` requests at ``max_len``)."""

    def __init__(self, max_batch: int, max_queue: int, max_len: int, eos: Iterable[int] = (), tokenizer=None,
                 vocab_size: Optional[int] = None, groups: int = 1, num_blocks: Optional[int] = None,
                 block_size: int = BLOCK_SIZE, prefix_caching: bool = True,
                 max_step_tokens: int = MAX_STEP_TOKENS) -> None:
        for name, value, least in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("groups", groups, 1),
                                   ("block_size", block_size, 1), ("max_step_tokens", max_step_tokens, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if num_blocks is None:
            num_blocks = max_batch * blocks_for(max_len, block_size)
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        self.max_batch, self.max_queue, self.max_len, self.eos = max_batch, max_queue, max_len, frozenset(eos)
        self.groups, self.block_size, self.max_step_tokens = groups, block_size, max_step_tokens
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[str, Request] = {}
        self.seq_ids = itertools.count()
        self.orders = itertools.count()
        self.releases: list[int] = []          # sampler records to drop, sent with the next step message
        self.computing: collections.Counter[bytes] = collections.Counter()   # keys of blocks being filled
        self.cache_hits = 0                    # prompt tokens read from the prefix cache, so far
        self.preemptions = 0
        self.ended: list[Event] = []           # requests ended while a step was planned (see take_ended)

    # ----------------------------------------------------------------- intake
    def submit(self, request: Request) -> None:
        """Queue ``request``; ValueError if it can never run, QueueFull if the queue is at its bound."""
        check_prompt(request.prompt, self.max_len, self.vocab_size)
        need = blocks_for(len(request.prompt), self.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"the prompt needs {need} KV-cache blocks of {self.block_size} tokens, the cache has "
                             f"{self.pool.num_blocks}")
        if len(self.waiting) >= self.max_queue + max(0, self.max_batch - len(self.running)):
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
        if request.params.seed is None:
            request.params.seed = random.randrange(MAX_SEED)
        if request.params.timeout is not None:
            own = request.submitted + request.params.timeout
            request.deadline = own if request.deadline is None else min(request.deadline, own)
        request.stream = TextStream(self.tokenizer, request.params.stop)
        request.seq_id = next(self.seq_ids)
        request.keys = block_keys(request.prompt, self.block_size)
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

    @property
    def held_tokens(self) -> int:
        """Tokens the running requests hold (prompt and generated; their blocks are allocated for them)."""
        return sum(len(r.prompt) + len(r.generated) for r in self.running.values())

    def stats(self) -> dict:
        """What a replica reports: requests running and waiting, the cache's use, prefix cache hits."""
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_used": self.pool.used / self.pool.num_blocks, "kv_blocks": self.pool.num_blocks,
                "held_tokens": self.held_tokens, "cache_hits": self.cache_hits, "preemptions": self.preemptions}

    # ----------------------------------------------------------------- admission
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
        """Admit waiting requests in order while the batch and the cache have room (see the module docstring);
        returns the admitted ones."""
        admitted, deferred = [], []
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            tokens = request.length
            usable = request.keys[:(tokens - 1) // self.block_size]        # leave one token to compute
            hit = self.pool.match(usable)
            if len(hit) < len(usable) and usable[len(hit)] in self.computing:
                self.pool.release(hit)                 # its next block is being computed: take it next time
                deferred.append(request)
                continue
            need = blocks_for(tokens, self.block_size) - len(hit)
            if need > self.pool.available:
                self.pool.release(hit)
                self.waiting.appendleft(request)
                break
            self._start(request, hit, need)
            admitted.append(request)
        self.waiting.extendleft(reversed(deferred))
        return admitted

    def _start(self, request: Request, hit: list[int], need: int) -> None:
        request.blocks = hit + self.pool.allocate(need)
        request.computed, request.registered = len(hit) * self.block_size, len(hit)
        if request.order < 0:
            request.cached = request.computed
            self.cache_hits += request.computed
        load = collections.Counter(r.group for r in self.running.values())
        request.group = min(range(self.groups), key=lambda g: (load[g], g))
        request.order = next(self.orders)
        request.promised = len(request.keys) if self.pool.caching else 0
        self.computing.update(request.keys[len(hit):request.promised])
        self.running[request.rid] = request

    # ----------------------------------------------------------------- steps
    def plan(self, group: int = 0) -> Optional[Planned]:
        """The next step of ``group``: each of its requests' pending tokens under the token budget (decodes
        first), or None when it has nothing to run. Call :meth:`admit` first."""
        budget, rows, requests = self.max_step_tokens, [], []
        members = [r for r in self.running.values() if r.group == group and r.pending > 0]
        members.sort(key=lambda r: (r.computed < r.length - 1, r.order))     # decodes, then prompt chunks
        for request in members:
            if budget == 0:
                break
            if request.rid not in self.running:                  # preempted for a request planned before it
                continue
            count = min(request.pending, budget)
            if not self._grow(request, request.computed + count, requests):
                continue
            start = request.computed
            tokens = request.span(start, start + count)
            rows.append(self._row(request, tokens, start, samples=start + count == request.length))
            requests.append(request)
            request.computed += count
            budget -= count
            self._register(request)
        if not rows:
            return None
        batch = StepBatch.build(rows, self.releases)
        self.releases = []
        return Planned(batch, requests, [r.seq_id for r in requests])

    def _grow(self, request: Request, positions: int, in_step: list[Request]) -> bool:
        """Blocks for ``positions`` positions of ``request``, preempting the latest admitted request without a
        row in this step when the cache is short; False when ``request`` itself had to go."""
        need = blocks_for(positions, self.block_size) - len(request.blocks)
        while need > self.pool.available:
            others = [r for r in self.running.values() if r is not request and r not in in_step]
            if not others:
                if len(in_step) == 0:                            # alone and the cache is full of its own tokens
                    self.ended.append(self._end(request, "length"))
                else:
                    self._preempt(request)
                return False
            self._preempt(max(others, key=lambda r: r.order))
        if need > 0:
            request.blocks += self.pool.allocate(need)
        return True

    def _preempt(self, request: Request) -> None:
        """Send a running request back to the head of the queue, its blocks released (see the module docstring)."""
        self._release(request)
        del self.running[request.rid]
        request.seq_id, request.mirrored, request.computed = next(self.seq_ids), 0, 0
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _release(self, request: Request) -> None:
        self.pool.release(request.blocks)
        for key in request.keys[request.registered:request.promised]:
            self._computed(key)
        request.blocks, request.registered, request.promised = [], 0, 0
        if request.params.penalized and request.mirrored:
            self.releases.append(request.seq_id)

    def _register(self, request: Request) -> None:
        """Offer the blocks ``request`` has filled with known tokens to the prefix cache."""
        full = min(request.computed // self.block_size, len(request.keys))
        for j in range(request.registered, full):
            self.pool.register(request.blocks[j], request.keys[j])
            if j < request.promised:
                self._computed(request.keys[j])
        request.registered = max(request.registered, full)

    def _computed(self, key: bytes) -> None:
        """One request no longer computes the block of ``key``."""
        self.computing[key] -= 1
        if self.computing[key] <= 0:
            del self.computing[key]

    def _row(self, request: Request, tokens: list[int], start: int, samples: bool) -> Row:
        history = []
        if request.params.penalized:           # the sampler records every position once (plait.serve.sampler)
            history = request.span(request.mirrored, start)
            request.mirrored = start + len(tokens)
        return Row(list(request.blocks), start, tokens, request.seq_id, len(request.prompt), samples,
                   request.params, len(request.generated), history)

    # ----------------------------------------------------------------- results
    def complete(self, planned: Planned, chosen: list[Optional[Sampled]]) -> list[Event]:
        """Take the token each row drew (None: the row drew none); returns the events (and ends the finished
        requests)."""
        now = time.monotonic()
        events = []
        for request, seq_id, sampled in zip(planned.requests, planned.seq_ids, chosen):
            if sampled is None or request.rid not in self.running or request.seq_id != seq_id:
                continue                       # a prompt chunk, or ended / preempted while its step ran
            token = sampled.token
            if request.first_token_at is None:
                request.first_token_at = now
            request.generated.append(token)
            if request.length % self.block_size == 0:
                parent = request.keys[-1] if request.keys else None
                request.keys += block_keys(request.tokens, self.block_size, len(request.keys), parent)
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
                                    cached_tokens=request.cached, **logprobs))
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

    def take_ended(self) -> list[Event]:
        """The events of requests that ended while a step was planned (the cache could not hold them)."""
        ended, self.ended = self.ended, []
        return ended

    def _end(self, request: Request, reason: str, token: Optional[int] = None, error: Optional[str] = None,
             logprob: Optional[float] = None, top_logprobs: tuple = ()) -> Event:
        request.finish_reason = reason
        if self.running.pop(request.rid, None) is not None:
            self._release(request)
        text = request.stream.delta(final=True) if request.stream else ""
        ttft = None
        if token is not None and len(request.generated) == 1:
            ttft = time.monotonic() - request.submitted
        return Event(request.rid, token, text, finish_reason=reason, error=error, prompt_tokens=len(request.prompt),
                     completion_tokens=len(request.generated), ttft_s=ttft, logprob=logprob,
                     top_logprobs=top_logprobs, cached_tokens=request.cached)
