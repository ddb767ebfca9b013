"""A DP replica: a (pp, tp) group of rank processes with its own torch.distributed world,
fed through a queue to its leader.

The router puts commands on ``inbox`` (``("submit", rid, prompt, params, timeout_s)``,
``("cancel", rid)``, ``("stop",)``); the leader runs the :class:`~plait.serve.engine.Engine`
and puts on ``outbox``: ``("ready", replica)`` once the model is loaded, ``("events", replica,
[Event, ...], stats)`` as requests progress, where stats is ``{"running", "waiting", "kv_used"}``.
"""
from __future__ import annotations

import queue
import time
from typing import Optional

from .scheduler import Event, Request

STATS_EVERY_S = 0.25
ENGINE_OPTIONS = ("kv_blocks", "kv_memory", "block_size", "max_step_tokens", "prefix_caching")


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
