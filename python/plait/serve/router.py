"""The router: DP replicas behind one front door.

It starts each replica's rank processes (:mod:`plait.serve.replica`), sends every request to
the replica with the fewest outstanding tokens, and turns the leaders' events into one
``asyncio.Queue`` per request. A thread per replica reads its outbox; a monitor thread
watches the processes: when a rank dies, the replica is marked down within a poll interval,
its other ranks are stopped, requests it had not started go to another replica, and the
ones it had started end with an error naming the replica.

All request state is touched on the event loop's thread only (threads hand over with
``call_soon_threadsafe``).
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..launch import start_ranks
from .replica import replica_rank
from .sampling import SamplingParams
from .scheduler import Event

MONITOR_EVERY_S = 0.2


class Overloaded(RuntimeError):
    """Every replica's queue is full."""


class NoReplica(RuntimeError):
    """No replica is up."""


@dataclass
class Tracked:
    """A request on its way through a replica."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    timeout_s: Optional[float]
    events: asyncio.Queue
    replica: int = -1
    produced: int = 0

    @property
    def outstanding(self) -> int:
        return self.params.max_tokens - self.produced


@dataclass
class Replica:
    index: int
    procs: list
    results: object
    inbox: object
    outbox: object
    status: str = "starting"
    reason: str = ""
    stats: dict = field(default_factory=lambda: {"running": 0, "waiting": 0, "kv_used": 0.0, "cache_hits": 0,
                                                 "preemptions": 0})
    inflight: dict = field(default_factory=dict)

    def outstanding(self) -> int:
        return sum(t.outstanding for t in self.inflight.values())

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)


class Router:
    """See the module docstring. ``job``: model, tp, pp, dtype, max_batch, max_queue, max_len."""

    def __init__(self, job: dict, dp: int, on_stats=None) -> None:
        self.job, self.dp, self.on_stats = job, dp, on_stats
        self.replicas: list[Replica] = []
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.closing = threading.Event()
        self.ids = itertools.count()
        self.threads: list[threading.Thread] = []

    @property
    def capacity(self) -> int:
        """Requests one replica holds at once: its batch plus its waiting queue."""
        return self.job["max_batch"] + self.job["max_queue"]

    # ----------------------------------------------------------------- life cycle
    def start(self, timeout_s: float) -> None:
        """Start every replica and wait until each has loaded the model (RuntimeError naming a failed one)."""
        ctx = mp.get_context("spawn")
        world = self.job["tp"] * self.job["pp"]
        threads = max(1, (os.cpu_count() or 1) // (world * self.dp))
        for index in range(self.dp):
            inbox, outbox = ctx.Queue(), ctx.Queue()
            procs, results = start_ranks(replica_rank, world, index, self.job, inbox, outbox,
                                         threads_per_rank=threads)
            self.replicas.append(Replica(index, procs, results, inbox, outbox))
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            while replica.status == "starting":
                try:
                    message = replica.outbox.get(timeout=0.2)
                except queue.Empty:
                    message = None
                if message and message[0] == "ready":
                    replica.status = "up"
                elif self._dead_reason(replica) is not None or time.monotonic() > deadline:
                    reason = self._dead_reason(replica) or f"not ready within {timeout_s:g} s"
                    self.close(timeout_s=5)
                    raise RuntimeError(f"replica {replica.index} failed to start: {reason}")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin delivering events on ``loop`` and watching the processes."""
        self.loop = loop
        for replica in self.replicas:
            self._thread(self._read, replica)
        self._thread(self._monitor)

    def _thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every replica (each drains what it holds), then make sure no rank process is left. Idempotent."""
        if self.closing.is_set():
            return
        self.closing.set()
        for replica in self.replicas:
            if replica.status == "up":
                replica.inbox.put(("stop",))
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            for proc in replica.procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
            replica.kill()
            replica.status = "stopped" if replica.status == "up" else replica.status
            for q in (replica.inbox, replica.outbox, replica.results):
                q.close()
                q.cancel_join_thread()
        for thread in self.threads:
            thread.join(timeout=2)

    # ----------------------------------------------------------------- requests
    def submit(self, prompt: list[int], params: SamplingParams, timeout_s: Optional[float],
               events: Optional[asyncio.Queue] = None) -> Tracked:
        """Track a request and send it to the least loaded replica (Overloaded / NoReplica when none can take it).
        Its events go to ``events`` (default: a queue of its own; several requests may share one)."""
        tracked = Tracked(f"req-{next(self.ids)}", prompt, params, timeout_s,
                          asyncio.Queue() if events is None else events)
        self._send(tracked)
        return tracked

    def _send(self, tracked: Tracked) -> None:
        up = [r for r in self.replicas if r.status == "up"]
        if not up:
            raise NoReplica("no replica is up: " + "; ".join(f"replica {r.index}: {r.reason}" for r in self.replicas))
        free = [r for r in up if len(r.inflight) < self.capacity]
        if not free:
            raise Overloaded(f"all {len(up)} replicas hold {self.capacity} requests each")
        replica = min(free, key=lambda r: (r.outstanding(), r.index))
        tracked.replica = replica.index
        replica.inflight[tracked.rid] = tracked
        replica.inbox.put(("submit", tracked.rid, tracked.prompt, tracked.params, tracked.timeout_s))

    def cancel(self, tracked: Tracked) -> None:
        replica = self.replicas[tracked.replica]
        if replica.inflight.pop(tracked.rid, None) is not None and replica.status == "up":
            replica.inbox.put(("cancel", tracked.rid))

    def health(self) -> list[dict]:
        return [dict(replica=r.index, status=r.status, reason=r.reason, running=r.stats["running"],
                     waiting=r.stats["waiting"], kv_cache_used=r.stats["kv_used"],
                     pids=[p.pid for p in r.procs]) for r in self.replicas]

    # ----------------------------------------------------------------- threads -> loop
    def _read(self, replica: Replica) -> None:
        while not self.closing.is_set():
            try:
                message = replica.outbox.get(timeout=0.2)
            except (queue.Empty, OSError, EOFError, ValueError):
                continue
            if message[0] == "events":
                self.loop.call_soon_threadsafe(self._deliver, replica, message[2], message[3])

    def _monitor(self) -> None:
        while not self.closing.wait(MONITOR_EVERY_S):
            for replica in self.replicas:
                if replica.status == "up":
                    reason = self._dead_reason(replica)
                    if reason is not None:
                        self.loop.call_soon_threadsafe(self._mark_down, replica, reason)

    @staticmethod
    def _dead_reason(replica: Replica) -> Optional[str]:
        dead = [(rank, p.exitcode) for rank, p in enumerate(replica.procs) if p.exitcode is not None]
        if not dead:
            return None
        errors = []
        try:
            while True:
                rank, status, payload = replica.results.get_nowait()
                if status == "error":
                    errors.append(f"rank {rank}: {str(payload).strip().splitlines()[-1]}")
        except (queue.Empty, OSError, EOFError, ValueError):
            pass
        text = ", ".join(f"rank {rank} exited with code {code}" for rank, code in dead)
        return text + (f" ({'; '.join(errors)})" if errors else "")

    # ----------------------------------------------------------------- on the loop
    def _deliver(self, replica: Replica, events: list[Event], stats: dict) -> None:
        replica.stats = stats
        if self.on_stats is not None:
            self.on_stats(replica.index, stats)
        for event in events:
            tracked = replica.inflight.get(event.rid)
            if tracked is None:
                continue
            if event.token is not None:
                tracked.produced += 1
            if event.finish_reason is not None:
                del replica.inflight[event.rid]
            tracked.events.put_nowait(event)

    def _mark_down(self, replica: Replica, reason: str) -> None:
        if replica.status != "up":
            return
        replica.status, replica.reason = "down", reason
        replica.kill()
        orphans, replica.inflight = list(replica.inflight.values()), {}
        for tracked in orphans:
            if tracked.produced == 0:
                try:
                    self._send(tracked)          # not started yet: another replica takes it
                    continue
                except (NoReplica, Overloaded):
                    pass
            tracked.events.put_nowait(Event(tracked.rid, None, "", "error",
                                            error=f"replica {replica.index} failed: {reason}"))
