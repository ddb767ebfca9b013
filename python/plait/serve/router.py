"""The router: DP replicas, on this host and on others, behind one front door.

It starts each local replica's rank processes (:mod:`plait.serve.replica`), takes replicas of other
hosts as they register (:mod:`plait.serve.remote`), sends every request to the replica with the
fewest outstanding tokens, and turns the replicas' events into one ``asyncio.Queue`` per request.
A thread per local replica reads its outbox; a monitor thread watches the processes. When a
replica goes down (a rank died; for another host: it stopped answering), it is marked down within
a poll interval, requests it had not started go to another replica (they wait in the router's
own queue, ``pending``, while every replica up is full), and the ones it had started end with an
error naming the replica. Only when no replica is up do requests that had not started fail.

All request state is touched on the event loop's thread only (threads hand over with
``call_soon_threadsafe``).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..launch import start_ranks
from .replica import LocalReplica, Replica, replica_rank
from .sampling import SamplingParams
from .scheduler import Event

MONITOR_EVERY_S = 0.2
log = logging.getLogger("plait.serve")


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


class Router:
    """See the module docstring. ``job``: model, tp, pp, dtype, max_batch, max_queue, max_len."""

    def __init__(self, job: dict, dp: int, on_stats=None) -> None:
        self.job, self.dp, self.on_stats = job, dp, on_stats
        self.replicas: list[Replica] = []
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.closing = threading.Event()
        self.ids = itertools.count()
        self.threads: list[threading.Thread] = []
        self.remote = None              # plait.serve.remote.RemoteHosts once a host registers
        self.pending: collections.deque[Tracked] = collections.deque()   # failed over, waiting for room

    @property
    def capacity(self) -> int:
        """Requests one local replica holds at once: its batch plus its waiting queue."""
        return self.job["max_batch"] + self.job["max_queue"]

    # ----------------------------------------------------------------- life cycle
    def start(self, timeout_s: float) -> None:
        """Start every local replica and wait until each has loaded the model (RuntimeError naming a failed one)."""
        ctx = mp.get_context("spawn")
        world = self.job["tp"] * self.job["pp"]
        threads = max(1, (os.cpu_count() or 1) // max(1, world * self.dp))
        local: list[LocalReplica] = []
        for index in range(self.dp):
            inbox, outbox = ctx.Queue(), ctx.Queue()
            procs, results = start_ranks(replica_rank, world, index, self.job, inbox, outbox,
                                         threads_per_rank=threads)
            local.append(LocalReplica(index, self.capacity, procs=procs, results=results, inbox=inbox, outbox=outbox))
        self.replicas.extend(local)
        deadline = time.monotonic() + timeout_s
        for replica in local:
            while replica.status == "starting":
                try:
                    message = replica.outbox.get(timeout=0.2)
                except queue.Empty:
                    message = None
                if message and message[0] == "ready":
                    replica.status = "up"
                    continue
                dead = replica.dead_reason()                # reads the ranks' errors off their queue: once
                if dead is not None or time.monotonic() > deadline:
                    reason = dead or f"not ready within {timeout_s:g} s"
                    self.close(timeout_s=5)
                    raise RuntimeError(f"replica {replica.index} failed to start: {reason}")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin delivering events on ``loop`` and watching the processes."""
        self.loop = loop
        for replica in self._local():
            self._thread(self._read, replica)
        self._thread(self._monitor)

    def _local(self) -> list[LocalReplica]:
        return [r for r in self.replicas if isinstance(r, LocalReplica)]

    def _thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every local replica (each drains what it holds), then make sure no rank process is left, and let
        go of other hosts' replicas (they keep running). Idempotent; callable from any thread."""
        if self.closing.is_set():
            return
        self.closing.set()
        if self.remote is not None:
            self.remote.close()
        for replica in self._local():
            replica.stop()
        deadline = time.monotonic() + timeout_s
        for replica in self._local():
            for proc in replica.procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
            replica.kill()
            replica.status = "stopped" if replica.status == "up" else replica.status
            replica.close_queues()
        for thread in self.threads:
            thread.join(timeout=2)

    # ----------------------------------------------------------------- requests
    def submit(self, prompt: list[int], params: SamplingParams, timeout_s: Optional[float],
               replica: Optional[int] = None, events: Optional[asyncio.Queue] = None) -> Tracked:
        """Track a request and send it to the least loaded replica, or to ``replica`` (Overloaded / NoReplica when
        none can take it). Its events go to ``events`` (default: a queue of its own; several requests may share
        one)."""
        tracked = Tracked(f"req-{next(self.ids)}", prompt, params, timeout_s,
                          asyncio.Queue() if events is None else events)
        self._send(tracked, replica)
        return tracked

    def _send(self, tracked: Tracked, only: Optional[int] = None) -> None:
        candidates = self.replicas if only is None else [r for r in self.replicas if r.index == only]
        up = [r for r in candidates if r.status == "up"]
        if not up:
            raise NoReplica("no replica is up: " + "; ".join(f"replica {r.index}: {r.status} {r.reason}".strip()
                                                             for r in candidates))
        free = [r for r in up if len(r.inflight) < r.capacity]
        if not free:
            raise Overloaded(f"all {len(up)} replicas up hold as many requests as they can")
        replica = min(free, key=lambda r: (r.outstanding(), r.index))
        tracked.replica = replica.index
        replica.inflight[tracked.rid] = tracked
        replica.submit(tracked)

    def cancel(self, tracked: Tracked) -> None:
        if tracked in self.pending:
            self.pending.remove(tracked)
            return
        replica = self.replicas[tracked.replica]
        if replica.inflight.pop(tracked.rid, None) is not None:
            replica.cancel(tracked.rid)

    def health(self) -> list[dict]:
        return [r.health() for r in self.replicas]

    # ----------------------------------------------------------------- threads -> loop
    def _read(self, replica: LocalReplica) -> None:
        while not self.closing.is_set():
            try:
                message = replica.outbox.get(timeout=0.2)
            except (queue.Empty, OSError, EOFError, ValueError):
                continue
            if message[0] == "events":
                self.loop.call_soon_threadsafe(self.deliver, replica, message[2], message[3])

    def _monitor(self) -> None:
        while not self.closing.wait(MONITOR_EVERY_S):
            for replica in self._local():
                if replica.status == "up":
                    reason = replica.dead_reason()
                    if reason is not None:
                        self.loop.call_soon_threadsafe(self.mark_down, replica, reason)

    # ----------------------------------------------------------------- on the loop
    def add(self, replica: Replica) -> None:
        """Take a new replica (another host's) under this router; its index is its place in ``replicas``."""
        assert replica.index == len(self.replicas)
        self.replicas.append(replica)

    def deliver(self, replica: Replica, events: list[Event], stats: Optional[dict] = None) -> None:
        """A replica's events (and its latest stats) reach their requests."""
        if stats is not None:
            self.update_stats(replica, stats)
        for event in events:
            tracked = replica.inflight.get(event.rid)
            if tracked is None:
                continue
            if event.token is not None:
                tracked.produced += 1
            if event.finish_reason is not None:
                del replica.inflight[event.rid]
            tracked.events.put_nowait(event)
        if self.pending:
            self.resend_pending()

    def resend_pending(self) -> None:
        """Send failed-over requests on as replicas have room (each call: as many as fit)."""
        while self.pending:
            try:
                self._send(self.pending[0])
            except Overloaded:
                return
            except NoReplica as err:
                while self.pending:
                    tracked = self.pending.popleft()
                    tracked.events.put_nowait(Event(tracked.rid, None, "", "error", error=str(err)))
                return
            self.pending.popleft()

    def update_stats(self, replica: Replica, stats: dict) -> None:
        replica.stats = stats
        if self.on_stats is not None:
            self.on_stats(replica.index, stats)

    def mark_down(self, replica: Replica, reason: str) -> None:
        """The replica failed: stop it, send the requests it had not started elsewhere, fail the others."""
        if replica.status not in ("up", "draining"):
            return
        log.warning("plait serve: replica %d (%s) is down: %s", replica.index, replica.host, reason)
        replica.status, replica.reason = "down", reason
        replica.kill()
        orphans, replica.inflight = list(replica.inflight.values()), {}
        error = f"replica {replica.index} ({replica.host}) failed: {reason}"
        for tracked in orphans:
            if tracked.produced == 0:        # not started yet: another replica takes it, now or when it has room
                self.pending.append(tracked)
            else:
                tracked.events.put_nowait(Event(tracked.rid, None, "", "error", error=error))
        if not any(r.status == "up" for r in self.replicas):
            for tracked in self.pending:
                tracked.events.put_nowait(Event(tracked.rid, None, "", "error", error=error))
            self.pending.clear()
        self.resend_pending()
