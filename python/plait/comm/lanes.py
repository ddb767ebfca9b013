"""Ordered background execution for point-to-point transfers, and their handles.

A send or recv may have to wait for its peer, so ``async_op=True`` must not block
the caller: each (direction, peer) gets a *lane*, one worker thread that runs that
channel's transfers in issue order. Sends and recvs to different peers, and the
two directions of one pair, progress independently, so the usual exchange
pattern (post a send and a recv, then wait on both) cannot deadlock. The
compiled calls release the GIL, so lanes run beside Python code.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Callable, Optional

import torch

from ..errors import CommTimeoutError
from .base import Handle


class Lane:
    """One worker thread running one channel direction's transfers in order."""

    def __init__(self, label: str) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plait-{label}")
        self._lock = threading.Lock()
        self._pending = 0

    def idle(self) -> bool:
        """Whether nothing is queued or running (a synchronous call may then run inline)."""
        with self._lock:
            return self._pending == 0

    def submit(self, work: Callable[[], None]) -> cf.Future:
        with self._lock:
            self._pending += 1
        future = self._pool.submit(work)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: cf.Future) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class Lanes:
    """The lanes of one communicator, made on first use: ("send", peer) and ("recv", peer)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._lanes: dict[tuple[str, int], Lane] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, peer: int) -> Lane:
        with self._lock:
            lane = self._lanes.get((kind, peer))
            if lane is None:
                lane = self._lanes[(kind, peer)] = Lane(f"{self._prefix}-{kind}{peer}")
            return lane

    def shutdown(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.shutdown()


class FutureHandle(Handle):
    """A transfer running on a lane; ``wait`` re-raises its error or times out naming the op."""

    def __init__(self, future: cf.Future, result: Optional[torch.Tensor], where: str, timeout_s: float) -> None:
        self._future = future
        self._result = result
        self._where = where
        self._timeout_s = timeout_s

    def wait(self, timeout_s: Optional[float] = None) -> Optional[torch.Tensor]:
        limit = timeout_s if timeout_s is not None else self._timeout_s
        done, _ = cf.wait([self._future], timeout=limit)
        if not done:
            raise CommTimeoutError(f"{self._where} did not complete within {limit:g} s: a peer rank may have "
                                   f"died or skipped this call (set PLAIT_TIMEOUT_S to change the bound)")
        self._future.result()  # re-raises the transfer's own error (already naming rank, group, op)
        return self._result

    def is_completed(self) -> bool:
        return self._future.done()
