"""Run a function on N local ranks in fresh processes, as torchrun would.

Used by the tests, the demo and the benchmarks to start a small job without
torchrun.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` spawned processes with
the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls
``fn(rank, world_size, *args)`` in each and returns the list of results by
rank. Any exception on any rank fails the call with every rank's traceback; a
rank that does not finish within ``timeout`` fails it too, naming the ranks,
and every process is killed, so a test can never hang the suite.

Over several hosts (``node``, a :class:`~plait.nodes.NodeSpec`) each host calls it with the
same arguments and its own node rank: it starts only this host's consecutive block of global
ranks, all meeting at node 0's ``master_addr:master_port``, and returns their results.

``fn`` must be a module-level function (it is pickled by reference), and the
calling script must keep its top-level code under ``if __name__ == "__main__":``
(spawned processes re-import it).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import threading
import time
import traceback
from typing import Any, Callable, Optional

from .nodes import NodeSpec


class RanksFailed(RuntimeError):
    """A rank raised, died, or did not finish in time; the message holds every rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ORPHAN_CHECK_S = 1.0


def _exit_when_orphaned(parent: int) -> None:
    """End this rank when the process that started it is gone (killed, crashed): a rank left behind would
    wait for commands that never come (a serving replica polls its queue forever) and hold its memory."""
    while True:
        time.sleep(ORPHAN_CHECK_S)
        if os.getppid() != parent:
            os._exit(1)


def _worker(rank: int, world_size: int, node: NodeSpec, env: dict, threads: int, fn: Callable, args: tuple,
            results, parent: int) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="plait-orphan-check", daemon=True).start()
    local = node.local_ranks(world_size)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank - local.start),
                       "LOCAL_WORLD_SIZE": str(len(local)), "GROUP_RANK": str(node.node_rank),
                       "MASTER_ADDR": node.master_addr, "MASTER_PORT": str(node.master_port), **env})
    import torch

    torch.set_num_threads(threads)
    try:
        value = fn(rank, world_size, *args)
        # Plain pickle, by value: the queue's own pickler would send tensors as
        # shared-memory handles, which die with this process.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        # Skip interpreter teardown: a rank whose peers timed out may hold gloo
        # threads that would block a normal exit.
        os._exit(0)


def start_ranks(fn: Callable, world_size: int, *args: Any, env: dict | None = None, threads_per_rank: int = 1,
                daemon: bool = True, node: Optional[NodeSpec] = None) -> tuple[list, Any]:
    """Start ``fn(rank, world_size, *args)`` on this host's ranks (all ``world_size`` without ``node``, with
    their own rendezvous port) and return at once: (the processes in rank order, the queue each rank puts
    ``(rank, "ok"|"error", payload)`` on)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    node = node or NodeSpec()
    if node.master_port is None:
        node = NodeSpec(node.nnodes, node.node_rank, node.master_addr, free_port())
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child_env = {"OMP_NUM_THREADS": str(threads_per_rank), **(env or {})}
    procs = [ctx.Process(target=_worker, args=(r, world_size, node, child_env, threads_per_rank, fn, args, results,
                                               os.getpid()),
                         daemon=daemon)
             for r in node.local_ranks(world_size)]
    for proc in procs:
        proc.start()
    return procs, results


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0,
              env: dict | None = None, threads_per_rank: int = 1, node: Optional[NodeSpec] = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on this host's ranks (all ``world_size`` without ``node``); return
    their results in rank order.

    ``env`` adds environment variables for the ranks; ``threads_per_rank`` sets
    torch's intra-op threads in each (1 by default: ranks share the cores).
    """
    procs, results = start_ranks(fn, world_size, *args, env=env, threads_per_rank=threads_per_rank, node=node)
    ranks = list((node or NodeSpec()).local_ranks(world_size))
    by_rank = dict(zip(ranks, procs))
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < len(ranks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(ranks) - set(outcome))
                raise RanksFailed(f"{fn.__name__} on {world_size} ranks: ranks {missing} did not finish "
                                     f"within {timeout:g} s" + _errors(outcome))
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in by_rank.items() if r not in outcome and p.exitcode not in (None, 0)]
                if dead:
                    raise RanksFailed(f"{fn.__name__}: ranks {dead} died (exit codes "
                                         f"{[by_rank[r].exitcode for r in dead]})" + _errors(outcome))
                continue
            outcome[rank] = (status, pickle.loads(value) if status == "ok" else value)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = {r: v for r, (s, v) in outcome.items() if s == "error"}
    if failed:
        raise RanksFailed(f"{fn.__name__} failed on ranks {sorted(failed)}" + _errors(outcome))
    return [outcome[r][1] for r in ranks]


def _errors(outcome: dict) -> str:
    return "".join(f"\n--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error")
