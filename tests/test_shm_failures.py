"""The shm communicator when a peer dies or never comes: bounded, named errors, no leftovers.

The killed-rank test starts its own processes (plait.launch.run_ranks would, rightly,
fail the whole run as soon as a rank dies) and kills one with SIGKILL while all of
them are inside back-to-back multi-chunk all-reduces.
"""
import multiprocessing as mp
import os
import pathlib
import queue
import signal
import time

import torch

from plait.launch import free_port, run_ranks

TIMEOUT_S = 3.0


def start_ranks(target, world: int):
    """Start ``target(rank, world, port, results)`` in ``world`` spawned processes (plait.launch.run_ranks
    would fail the run as soon as one dies); return the processes and the queue they report to."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    return procs, results


def join_rank(rank: int, world: int, port: int) -> None:
    """Inside a rank started by start_ranks: the torchrun environment, one thread."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)


def looping_rank(rank: int, world: int, port: int, results) -> None:
    """All-reduce 4 MB tensors until an error; report ready after 3 calls, then the error."""
    join_rank(rank, world, port)
    import torch.distributed as dist

    from plait.comm import Communicator

    try:
        dist.init_process_group("gloo")
        comm = Communicator.create("shm", None, name="tp", timeout_s=TIMEOUT_S)
        x = torch.ones(1 << 20)  # 4 MB: several chunks, two barriers each
        calls = 0
        while True:
            start = time.monotonic()
            try:
                comm.all_reduce(x)
            except Exception as exc:  # noqa: BLE001 - reported to the test
                results.put((rank, type(exc).__name__, str(exc), time.monotonic() - start, calls))
                break
            calls += 1
            if calls == 3:
                results.put((rank, "ready", "", 0.0, calls))
            x.fill_(1.0)
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def test_killed_rank_makes_survivors_time_out_and_leaves_no_segment():
    procs, results = start_ranks(looping_rank, 3)
    try:
        ready = set()
        deadline = time.monotonic() + 120
        while len(ready) < 3:
            rank, status, message, _, _ = results.get(timeout=max(1.0, deadline - time.monotonic()))
            assert status == "ready", f"rank {rank} failed before the kill: {status}: {message}"
            ready.add(rank)
        time.sleep(0.2)
        os.kill(procs[2].pid, signal.SIGKILL)
        reports = {}
        while len(reports) < 2:
            rank, status, message, elapsed, calls = results.get(timeout=60)
            if status != "ready":
                reports[rank] = (status, message, elapsed, calls)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert procs[2].exitcode == -signal.SIGKILL
    for rank, (status, message, elapsed, calls) in sorted(reports.items()):
        assert status == "CommTimeoutError", f"rank {rank}: {status}: {message}"
        assert elapsed < TIMEOUT_S + 1.5, f"rank {rank} needed {elapsed:.1f} s for a {TIMEOUT_S} s bound"
        assert f"rank {rank} of group 'tp'" in message and "all_reduce(float32[1048576])" in message
        assert "chunk" in message and "3 s" in message
    assert any("rank 2 (pid" in m and "no longer running" in m for _, m, _, _ in reports.values()), reports
    job = os.environ["PLAIT_SHM_JOB"]
    assert not list(pathlib.Path("/dev/shm").glob(f"plait-{job}-*")), "a segment outlived its ranks"


def absent_peer(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.comm import Communicator
    from plait.errors import CommError, CommTimeoutError

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="pp", timeout_s=2.0)
    report = {}
    start = time.monotonic()
    try:
        if rank == 0:
            comm.recv(torch.empty(8), src=1)  # rank 1 never sends
        else:
            time.sleep(0.5)
    except CommTimeoutError as exc:
        report["recv"] = (str(exc), time.monotonic() - start)
    dist.barrier()
    comm2 = Communicator.create("shm", None, name="tp", timeout_s=2.0)
    start = time.monotonic()
    if rank == 1:
        time.sleep(4.0)  # arrives long after rank 0 gave up
    try:
        comm2.all_reduce(torch.ones(16))
    except CommTimeoutError as exc:
        report["all_reduce"] = (str(exc), time.monotonic() - start)
    try:
        comm2.barrier()
    except CommError as exc:
        report["after"] = (f"{type(exc).__name__}: {exc}", 0.0)
    dist.destroy_process_group()
    return report


def test_absent_peer_times_out_naming_rank_group_and_op():
    first, second = run_ranks(absent_peer, 2, timeout=120)
    message, elapsed = first["recv"]
    assert elapsed < 3.5 and "rank 0 of group 'pp'" in message and "recv(from group rank 1)" in message
    assert "group rank 1 to send" in message and "within 2 s" in message
    assert "recv" not in second
    message, elapsed = first["all_reduce"]
    assert elapsed < 3.5 and "rank 0 of group 'tp'" in message and "group rank 1 to arrive" in message
    message, elapsed = second["all_reduce"]  # the late rank fails at once: its peer already gave up
    assert elapsed < 4.0 + 1.0 and "rank 1 of group 'tp'" in message and "group rank 0 gave up" in message
    for report in (first, second):
        assert report["after"][0].startswith("CommError") and "unusable" in report["after"][0]


def mismatched_calls(rank: int, world: int) -> dict:
    """Each case: the ranks make different collective calls on a fresh communicator."""
    import torch.distributed as dist

    from plait.comm import Communicator
    from plait.errors import CommError

    dist.init_process_group("gloo")
    last = world - 1
    cases = {
        "count": lambda c, x: c.all_reduce(x if rank != last else torch.ones(100_000)),  # one-shot vs two-shot
        "dtype": lambda c, x: c.all_reduce(x if rank != last else x.to(torch.int32)),
        "op": lambda c, x: c.all_reduce(x, op="max" if rank == last else "sum"),
        "barrier": lambda c, x: c.barrier() if rank == last else c.all_reduce(x),
        "src": lambda c, x: c.broadcast(x, src=1 if rank == last else 0),
        "dim": lambda c, x: c.all_gather(x.view(10, 10), dim=1 if rank == last else 0),
        "skipped": lambda c, x: c.all_reduce(x[:0] if rank == 0 else x),  # an empty call still takes part
    }
    report = {}
    for name, call in cases.items():
        comm = Communicator.create("shm", None, name=name, timeout_s=2.0)
        x = torch.arange(100, dtype=torch.float32) + rank
        start = time.monotonic()
        try:
            call(comm, x)
            report[name] = "no error"
        except CommError as exc:
            report[name] = str(exc)
        report[name + " s"] = time.monotonic() - start
        report[name + " untouched"] = torch.equal(x, torch.arange(100, dtype=torch.float32) + rank)
    dist.destroy_process_group()
    return report


def test_mismatched_calls_fail_on_every_rank_without_touching_data():
    reports = run_ranks(mismatched_calls, 3, timeout=120)
    for rank, report in enumerate(reports):
        for name in ("count", "dtype", "op", "barrier", "src", "dim", "skipped"):
            message = report[name]
            assert "the ranks made different collective calls" in message, f"rank {rank}, {name}: {message}"
            assert f"rank {rank} of group '{name}'" in message and report[name + " s"] < 1.5
            assert report[name + " untouched"], f"rank {rank}, {name}: the tensor changed"
    assert "all_reduce(float32 x 100000, sum)" in reports[0]["count"]
    assert "int32" in reports[0]["dtype"] and "max" in reports[0]["op"] and "called barrier" in reports[0]["barrier"]
    assert "from group rank 1" in reports[0]["src"] and "10 rows" in reports[0]["dim"]
    assert "all_reduce(float32 x 0, sum)" in reports[1]["skipped"]


def creator_killed_in_setup(rank: int, world: int, port: int, results) -> None:
    """Group rank 0 kills itself at the name exchange of Communicator.create("shm"): after it
    created the segment, before any peer knew its name (so nobody else can unlink it)."""
    join_rank(rank, world, port)
    import torch.distributed as dist

    from plait.comm import Communicator, shm_setup

    dist.init_process_group("gloo")
    if rank == 0:
        def die_at_exchange(comm, text):
            results.put((rank, text))
            results.close()
            results.join_thread()
            os.kill(os.getpid(), signal.SIGKILL)

        shm_setup.all_gather_text = die_at_exchange
    Communicator.create("shm", None, name="setup", timeout_s=TIMEOUT_S)
    os._exit(0)


def next_job(rank: int, world: int) -> float:
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="next")
    value = comm.all_reduce(torch.ones(4)).sum().item()
    dist.destroy_process_group()
    return value


def test_segment_left_by_a_creator_killed_in_setup_is_reclaimed_by_the_next_job():
    procs, results = start_ranks(creator_killed_in_setup, 2)
    try:
        rank, name = results.get(timeout=120)
        procs[0].join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()  # rank 1 waits for the name rank 0 never sends
            p.join(timeout=10)
    assert rank == 0 and procs[0].exitcode == -signal.SIGKILL
    left = pathlib.Path("/dev/shm") / name.lstrip("/")
    assert left.exists(), f"the killed creator's segment {name} should still be there before the next job"
    assert run_ranks(next_job, 2, timeout=120) == [8.0, 8.0]
    assert not left.exists(), f"the next job did not reclaim {name}, whose creator is gone"
    job = os.environ["PLAIT_SHM_JOB"]
    assert not list(pathlib.Path("/dev/shm").glob(f"plait-{job}-*")), "a segment outlived its ranks"
