"""A DP replica: a (pp, tp) group of rank processes with its own torch.distributed world,
fed through a queue to its leader.

The router puts commands on ``inbox`` (``("submit", rid, prompt, params, timeout_s)``,
``("cancel", rid)``, ``("stop",)``); the leader runs the :class:`~plait.serve.engine.Engine`
and puts on ``outbox``: ``("ready", replica)`` once the model is loaded, ``("events", replica,
[Event, ...], stats)`` as requests progress, where stats is ``{"running", "waiting", "kv_used"}``.

:class:`Replica` is what the router keeps of any replica; :class:`LocalReplica` is one whose
rank processes run on this host (a replica on another host: :mod:`plait.serve.remote`).
"""
from __future__ import annotations

import queue
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

from .scheduler import Event, Request

STATS_EVERY_S = 0.25
ENGINE_OPTIONS = ("kv_blocks", "kv_memory", "block_size", "max_step_tokens", "prefix_caching")


@dataclass
class Replica:
    """The router's view of one replica: its state, last stats and the requests it holds (by id)."""

    index: int
    capacity: int                     # requests it holds at once: its batch plus its waiting queue
    host: str = field(default_factory=socket.gethostname)
    status: str = "starting"          # starting, up, down, stopped
    reason: str = ""
    stats: dict = field(default_factory=lambda: {"running": 0, "waiting": 0, "kv_used": 0.0})
    inflight: dict = field(default_factory=dict)

    def outstanding(self) -> int:
        """Tokens still to generate for the requests it holds (the router's load measure)."""
        return sum(t.outstanding for t in self.inflight.values())

    def health(self) -> dict:
        return dict(replica=self.index, host=self.host, status=self.status, reason=self.reason,
                    running=self.stats["running"], waiting=self.stats["waiting"], kv_cache_used=self.stats["kv_used"])

    def submit(self, tracked) -> None:
        """Hand ``tracked`` (a :class:`~plait.serve.router.Tracked`, already in ``inflight``) to the replica."""
        raise NotImplementedError

    def cancel(self, rid: str) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the replica to finish what it holds and stop."""

    def kill(self) -> None:
        """Stop at once: processes killed, or (remote) its streams closed."""


@dataclass
class LocalReplica(Replica):
    """A replica whose rank processes this host started; commands and events travel on queues."""

    procs: list = field(default_factory=list)
    results: object = None
    inbox: object = None
    outbox: object = None

    def health(self) -> dict:
        return {**super().health(), "pids": [p.pid for p in self.procs]}

    def submit(self, tracked) -> None:
        self.inbox.put(("submit", tracked.rid, tracked.prompt, tracked.params, tracked.timeout_s))

    def cancel(self, rid: str) -> None:
        if self.status == "up":
            self.inbox.put(("cancel", rid))

    def stop(self) -> None:
        if self.status == "up":
            self.inbox.put(("stop",))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)

    def dead_reason(self) -> Optional[str]:
        """None while every rank process lives; else which exited, with their errors."""
        dead = [(rank, p.exitcode) for rank, p in enumerate(self.procs) if p.exitcode is not None]
        if not dead:
            return None
        errors = []
        try:
            while True:   # a rank's error may still be in the pipe when its exit code is already set: wait a little
                rank, status, payload = self.results.get(timeout=0.5)
                if status == "error":
                    errors.append(f"rank {rank}: {str(payload).strip().splitlines()[-1]}")
        except (queue.Empty, OSError, EOFError, ValueError):
            pass
        text = ", ".join(f"rank {rank} exited with code {code}" for rank, code in dead)
        return text + (f" ({'; '.join(errors)})" if errors else "")

    def close_queues(self) -> None:
        for q in (self.inbox, self.outbox, self.results):
            q.close()
            q.cancel_join_thread()


class QueueSource:
    """The leader's :class:`~plait.serve.engine.Source` over the replica's two queues."""

    def __init__(self, replica: int, inbox, outbox, scheduler) -> None:
        self.replica, self.inbox, self.outbox, self.scheduler = replica, inbox, outbox, scheduler
        self.last_stats = 0.0

    def poll(self, block: bool) -> list[tuple]:
        commands = []
        try:
            commands.append(self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait())
            while True:
                commands.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        out = []
        for command in commands:
            if command[0] == "submit":
                _, rid, prompt, params, timeout_s = command
                request = Request(rid, prompt, params)
                if timeout_s is not None:
                    request.deadline = request.submitted + timeout_s
                out.append(("submit", request))
            else:
                out.append(command)
        if time.monotonic() - self.last_stats > STATS_EVERY_S:
            self.emit([])
        return out

    def emit(self, events: list[Event]) -> None:
        now = time.monotonic()
        if not events and now - self.last_stats < STATS_EVERY_S:
            return
        self.last_stats = now
        self.outbox.put(("events", self.replica, events, self.scheduler.stats()))


def replica_rank(rank: int, world: int, replica: int, job: dict, inbox, outbox) -> None:
    """One rank of a replica: load its part of the model, then serve (leader) or follow until stopped."""
    import torch

    import plait
    from .engine import Engine
    from .text import load_tokenizer

    plait.init_mesh(pp=job["pp"], tp=job["tp"])
    try:
        model = plait.from_pretrained(job["model"], plait.current_mesh(), dtype=getattr(torch, job["dtype"]))
        tokenizer = load_tokenizer(job["model"]) if rank == 0 else None
        engine = Engine(model, max_batch=job["max_batch"], max_queue=job["max_queue"], max_len=job["max_len"],
                        tokenizer=tokenizer, **{k: job[k] for k in ENGINE_OPTIONS if k in job})
        source: Optional[QueueSource] = None
        if engine.is_leader:
            source = QueueSource(replica, inbox, outbox, engine.scheduler)
            outbox.put(("ready", replica))
        engine.run(source)
    finally:
        plait.destroy_mesh()
