"""The shm backend's wait strategy: fast back to back, cheap when a rank waits long.

A rank blocked in a collective spins for at most its learned budget (1 ms by default) and
then sleeps in the kernel, so a rank waiting seconds for a late peer (a server waiting for
requests) uses almost no CPU; back-to-back calls keep the budget up.
"""
import os
import time

import pytest
import torch

from plait.launch import run_ranks

LATE_S = 2.0


def idle_wait(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="idle")
    x = torch.ones(1024)
    for _ in range(200):  # back to back: the budget learns that waits are short
        comm.all_reduce(x)
    busy_budget = comm._group.spin_budget_us
    comm.barrier()
    if rank == 1:
        time.sleep(LATE_S)  # rank 0 waits in the all_reduce meanwhile
    wall, cpu = time.monotonic(), time.process_time()
    comm.all_reduce(x)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    report = {"wall_s": wall, "cpu_s": cpu, "busy_budget_us": busy_budget,
              "idle_budget_us": comm._group.spin_budget_us, "cap_us": comm._group.spin_cap_us}
    comm.close()
    dist.destroy_process_group()
    return report


def test_a_rank_blocked_in_a_collective_uses_little_cpu():
    waiting, _ = run_ranks(idle_wait, 2, timeout=120)
    assert waiting["wall_s"] > LATE_S * 0.9, waiting
    # it spins at most the 1 ms cap, then sleeps: well under 5% of a core
    assert waiting["cpu_s"] < 0.05 * waiting["wall_s"], waiting
    assert waiting["cap_us"] == 1000 and 0 < waiting["busy_budget_us"] <= waiting["cap_us"], waiting
    assert waiting["idle_budget_us"] < waiting["busy_budget_us"], "a long wait must lower the spin budget"


def stacked_then_freed(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="stacked")
    allowed = os.sched_getaffinity(0)
    x = torch.empty(1024)

    def calls(n: int) -> None:
        for _ in range(n):
            x.fill_(rank + 1)
            comm.all_reduce(x)
            assert torch.all(x == 3), "all_reduce gave a wrong sum"

    stuck_moves = 0
    # A few rounds: now and then the scheduler itself wakes a sleeping rank onto the idle CPU
    # first, and that round needs no move.
    for _ in range(ROUNDS):
        # Both ranks on one CPU and nowhere else: a waiter finds its peer there, cannot move, sleeps.
        os.sched_setaffinity(0, {min(allowed)})
        before = comm._group.moves
        calls(100)
        stuck_moves += comm._group.moves - before
        # Given every CPU back, both still queue on that CPU until one moves: the waiter moves itself.
        os.sched_setaffinity(0, allowed)
        calls(200)
        comm.barrier()
    report = {"stuck_moves": stuck_moves, "moves": comm._group.moves, "sleeps": comm._group.sleeps,
              "affinity_restored": os.sched_getaffinity(0) == allowed, "cpu": _cpu()}
    comm.close()
    dist.destroy_process_group()
    return report


ROUNDS = 4


def _cpu() -> int:
    import ctypes

    return ctypes.CDLL(None).sched_getcpu()


@pytest.mark.parametrize("move", ["1", "0"])
def test_ranks_queued_on_one_cpu_spread_out_at_once(move):

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    reports = run_ranks(stacked_then_freed, 2, timeout=120, env={"PLAIT_SHM_MOVE": move})
    # Pinned to one CPU there is nowhere to go: no move, and the waits slept instead of spinning.
    assert all(r["stuck_moves"] == 0 for r in reports), reports
    assert sum(r["sleeps"] for r in reports) > 0, reports
    assert all(r["affinity_restored"] for r in reports), reports
    if move == "0":  # PLAIT_SHM_MOVE=0: waiters only sleep, and the scheduler spreads the ranks in its own time
        assert all(r["moves"] == 0 for r in reports), reports
        return
    # Freed, a waiter that found its peer on its own CPU moved off it (in most rounds), and kept its full CPU set.
    assert sum(r["moves"] for r in reports) >= 1, reports
    assert reports[0]["cpu"] != reports[1]["cpu"], reports


def test_move_setting_is_read_and_checked(monkeypatch):
    from plait.comm.shm_config import ShmConfig

    assert ShmConfig.from_env(2).move is True
    monkeypatch.setenv("PLAIT_SHM_MOVE", "0")
    assert ShmConfig.from_env(2).move is False
    monkeypatch.setenv("PLAIT_SHM_MOVE", "yes")
    with pytest.raises(ValueError, match="PLAIT_SHM_MOVE='yes'"):
        ShmConfig.from_env(2)
