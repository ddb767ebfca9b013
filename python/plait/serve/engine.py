"""The inference engine of one replica: every rank runs :meth:`Engine.run`; the leader schedules.

    mesh = plait.init_mesh(pp=2, tp=2)
    model = plait.from_pretrained(directory, mesh, dtype=torch.float32)
    engine = plait.serve.Engine(model, max_batch=8, tokenizer=load_tokenizer(directory))
    done = engine.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=8)] * 2)   # on every rank

The leader (first TP rank of the first pipeline stage) owns the :class:`Scheduler`; each
iteration it takes new commands from a :class:`Source` (a list for ``generate``, queues for
the server), admits what the KV cache has room for, runs one step (a decode token for every
running request and prompt chunks under the step's token budget), and hands the events back
to the source. The other ranks follow the step messages. When the leader is idle it sends a
heartbeat every second, so no follower's wait runs into the collective timeout.

With ``pp > 1`` the decode is pipelined (see :mod:`plait.serve.worker`): the running
requests are split into ``pp`` groups, and up to ``pp`` groups are in flight. Each iteration
the leader launches the step of every group that is not in flight, then waits for the oldest
group's tokens and hands them to the scheduler; that group is launched again in the next
iteration while the others are still in later stages. In steady state, with at least ``pp`` requests running,
every stage computes a different group at the same time. ``flight[k]`` counts the launches after which
``k`` groups were in flight.
"""
from __future__ import annotations

import collections
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence

import torch.distributed as dist

from ..parallel.families import family
from .batch import IDLE, STOP
from .options import BLOCK_SIZE, MAX_STEP_TOKENS
from .sampling import SamplingParams
from .scheduler import Event, QueueFull, Request, Scheduler
from .text import eos_ids
from .worker import Worker, cache_blocks, checked_max_len

HEARTBEAT_S = 1.0


class Source(Protocol):
    """Where the leader's commands come from and its events go."""

    def poll(self, block: bool) -> list[tuple]:
        """New commands: ``("submit", Request)``, ``("cancel", rid)`` or ``("stop",)`` (drain, then stop)."""

    def emit(self, events: list[Event]) -> None:
        """Progress of requests (tokens, text, ends)."""


@dataclass
class Completion:
    """A finished request: its generated ids (the EOS included, as transformers returns it) and text."""

    rid: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    logprobs: list[float] = field(default_factory=list)          # per token, when the request asked
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)


class Engine:
    """This rank's part of a replica; see the module docstring.

    Args:
        model: this rank's :class:`~plait.ParallelModel` (one stage per rank, dp=1 inside the replica).
        max_batch: the most requests running (decoded together) at once.
        max_queue: the most requests waiting beyond the batch; more are refused (:class:`QueueFull`).
        max_len: the most positions one request may use (default: the model's context).
        tokenizer: decodes text and stop strings (None: token ids only).
        eos: end-of-sequence ids (default: the model's generation config).
        record: keep the tokens each rank received (``worker.received``) and the step messages it ran
            (``worker.steps``, the same on every rank), for checks.
        tp_backend: communicator of the TP layers during decode ("auto": shm on CPU; "torch": keep gloo/NCCL).
        kv_blocks: KV-cache blocks per rank; or ``kv_memory``: bytes of KV cache per rank, as many blocks as fit
            on the rank that fits fewest (default: ``max_batch`` requests at ``max_len``).
        block_size: positions per KV-cache block.
        prefix_caching: share the blocks of equal prompt prefixes (:mod:`plait.serve.blocks`); off, with a warning,
            for a model whose family says equal prefixes may hold different keys (stateful rotary types).
        max_step_tokens: new tokens per step, at most (prompts longer than that are prefilled in chunks).
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_len: Optional[int] = None,
                 tokenizer=None, eos: Optional[Iterable[int]] = None, record: bool = False,
                 tp_backend: str = "auto", kv_blocks: Optional[int] = None, kv_memory: Optional[float] = None,
                 block_size: int = BLOCK_SIZE, prefix_caching: bool = True,
                 max_step_tokens: int = MAX_STEP_TOKENS) -> None:
        self.model = model
        max_len = checked_max_len(model.model_config, max_len)
        num_blocks = cache_blocks(model, max_batch, max_len, block_size, kv_blocks, kv_memory)
        self.worker = Worker(model, num_blocks, block_size, max_len, record, tp_backend)
        self.is_leader = model.mesh.rank == self.worker.leader
        if eos is None:
            eos = eos_ids(model.model_config, getattr(model, "source_dir", None))
        self.pipeline = model.mesh.pp
        refusal = family(model.plan.family).prefix_cache_refusal(model.model_config)
        if prefix_caching and refusal:
            if self.is_leader:
                warnings.warn(f"prefix caching is off for this model: {refusal}", stacklevel=2)
            prefix_caching = False
        self.scheduler = Scheduler(max_batch, max_queue, max_len, eos, tokenizer, model.dims.vocab_size,
                                   groups=self.pipeline, num_blocks=num_blocks, block_size=block_size,
                                   prefix_caching=prefix_caching, max_step_tokens=max_step_tokens)
        self.flight: collections.Counter[int] = collections.Counter()
        self._stopping = False

    def run(self, source: Optional[Source]) -> None:
        """Serve commands from ``source`` (leader) or follow the leader (other ranks) until a drained stop."""
        if not self.is_leader:
            self.worker.follow()
            return
        self._stopping = False
        if self.pipeline > 1:
            self._run_pipelined(source)
            return
        scheduler, last_message = self.scheduler, time.monotonic()
        while True:
            self._take_commands(source, block=not scheduler.busy)
            if self._stopping and not scheduler.busy:
                self.worker.send_control(STOP)
                return
            scheduler.admit()
            planned = scheduler.plan()
            source.emit(scheduler.take_ended())
            now = time.monotonic()
            if planned is not None:
                source.emit(scheduler.complete(planned, self.worker.step(planned.batch)))
                last_message = now
            elif now - last_message > HEARTBEAT_S:
                self.worker.send_control(IDLE)
                last_message = now

    def _run_pipelined(self, source: Source) -> None:
        """The leader's loop for ``pp > 1``: up to ``pp`` groups in flight (see the module docstring)."""
        scheduler, worker = self.scheduler, self.worker
        in_flight: collections.deque = collections.deque()       # (group, planned, handle), oldest first
        last_message = time.monotonic()
        while True:
            self._take_commands(source, block=not scheduler.busy and not in_flight)
            if self._stopping and not scheduler.busy and not in_flight:
                worker.send_control(STOP)
                return
            scheduler.admit()
            flying = {group for group, _, _ in in_flight}
            for group in range(self.pipeline):
                planned = None if group in flying else scheduler.plan(group)
                if planned is not None:
                    in_flight.append((group, planned, worker.launch(planned.batch)))
                    self.flight[len(in_flight)] += 1
            source.emit(scheduler.take_ended())
            now = time.monotonic()
            if in_flight:
                _, planned, handle = in_flight.popleft()
                source.emit(scheduler.complete(planned, worker.collect(handle)))
                last_message = now
            elif now - last_message > HEARTBEAT_S:
                worker.send_control(IDLE)
                last_message = now

    def _take_commands(self, source: Source, block: bool) -> None:
        """Apply the source's new commands, then end the requests past their deadlines."""
        for command in source.poll(block=block):
            if command[0] == "submit":
                source.emit(self._submit(command[1], refuse=self._stopping))
            elif command[0] == "cancel":
                source.emit(self.scheduler.cancel(command[1]))
            elif command[0] == "stop":
                self._stopping = True
        source.emit(self.scheduler.expire())

    def _submit(self, request: Request, refuse: bool) -> list[Event]:
        if refuse:
            return [Event(request.rid, None, "", "error", error="the server is shutting down")]
        try:
            self.scheduler.submit(request)
        except QueueFull as err:
            return [Event(request.rid, None, "", "error", error=f"queue full: {err}")]
        except ValueError as err:
            return [Event(request.rid, None, "", "error", error=str(err))]
        return []

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 arrivals: Optional[Sequence[int]] = None) -> list[Completion]:
        """Generate for every prompt (a collective; the leader's arguments count) and return the completions
        on every rank. ``arrivals[i]`` is the iteration at which request ``i`` is submitted (default 0): later
        requests join a batch that is already running."""
        source = None
        if self.is_leader:
            source = _ListSource(prompts, params, arrivals)
        self.run(source)
        out = [source.completions() if source else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(out, src=self.worker.leader)
        return out[0]


class _ListSource:
    """Submits a fixed list of requests, request ``i`` at iteration ``arrivals[i]``; collects completions."""

    def __init__(self, prompts, params, arrivals) -> None:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        arrivals = list(arrivals) if arrivals is not None else [0] * len(prompts)
        self.pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        self.prompts, self.params, self.arrivals = prompts, params, arrivals
        self.iteration = 0
        self.done: dict[str, Completion] = {str(i): Completion(str(i), len(p)) for i, p in enumerate(prompts)}
        self.stopped = False

    def poll(self, block: bool) -> list[tuple]:
        commands = []
        while self.pending and (self.arrivals[self.pending[0]] <= self.iteration or block):
            i = self.pending.pop(0)
            commands.append(("submit", Request(str(i), list(self.prompts[i]), self.params[i])))
            block = False
        self.iteration += 1
        if not self.pending and not self.stopped:
            self.stopped = True
            commands.append(("stop",))
        return commands

    def emit(self, events: list[Event]) -> None:
        for event in events:
            done = self.done[event.rid]
            if event.token is not None:
                done.token_ids.append(event.token)
                if event.logprob is not None:
                    done.logprobs.append(event.logprob)
                    done.top_logprobs.append(event.top_logprobs)
            done.text += event.text
            if event.finish_reason is not None:
                done.finish_reason, done.error = event.finish_reason, event.error

    def completions(self) -> list[Completion]:
        return [self.done[str(i)] for i in range(len(self.prompts))]
