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
    """Both ranks pinned to one CPU, then rank 0 freed while it runs there and waits for rank 1."""
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="stacked")  # created with every CPU allowed
    allowed = os.sched_getaffinity(0)
    first = min(allowed)
    x = torch.empty(1024)

    def call() -> None:
        x.fill_(rank + 1)
        comm.all_reduce(x)
        assert torch.all(x == 3), "all_reduce gave a wrong sum"

    # Both ranks on one CPU and nowhere else: a waiter finds its peer there, cannot move, sleeps.
    os.sched_setaffinity(0, {first})
    for _ in range(100):
        call()
    comm.barrier()
    stuck_moves = comm._group.moves
    # Rank 0 is freed while it runs on `first` (a running thread stays where it is), enters the call
    # first and spins; rank 1, pinned to `first`, last ran there, so the waiter is stacked and should
    # move. The sleeps also pass the 1 ms between two attempts to move (the pinned waits tried and
    # found no CPU). Rank 1 arrives 3 ms later, so rank 0 is surely waiting by then (it moves at the
    # start of its wait, whether or not its spin budget lasts until rank 1 comes).
    if rank == 0:
        time.sleep(0.005)
        os.sched_setaffinity(0, allowed)
    else:
        time.sleep(0.008)
    call()
    report = {"stuck_moves": stuck_moves, "moves": comm._group.moves - stuck_moves, "sleeps": comm._group.sleeps,
              "affinity_kept": os.sched_getaffinity(0) == (allowed if rank == 0 else {first})}
    os.sched_setaffinity(0, allowed)
    comm.close()
    dist.destroy_process_group()
    return report


@pytest.mark.parametrize("move", ["1", "0"])
def test_a_waiter_queued_on_its_peers_cpu_moves_to_a_free_one(move):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    freed, pinned = run_ranks(stacked_then_freed, 2, timeout=120, env={"PLAIT_SHM_MOVE": move})
    # Pinned to one CPU there is nowhere to go: no move, and the waits slept instead of spinning.
    assert freed["stuck_moves"] == 0 and pinned["stuck_moves"] == 0, (freed, pinned)
    assert freed["sleeps"] + pinned["sleeps"] > 0, (freed, pinned)
    assert pinned["moves"] == 0 and freed["affinity_kept"] and pinned["affinity_kept"], (freed, pinned)
    if move == "0":  # PLAIT_SHM_MOVE=0: the waiter only sleeps
        assert freed["moves"] == 0, freed
        return
    # The freed waiter found its peer's CPU equal to its own, moved off it, and kept its whole allowed set.
    assert freed["moves"] == 1, freed


def test_move_setting_is_read_and_checked(monkeypatch):
    from plait.comm.shm_config import ShmConfig

    assert ShmConfig.from_env(2).move is True
    monkeypatch.setenv("PLAIT_SHM_MOVE", "0")
    assert ShmConfig.from_env(2).move is False
    monkeypatch.setenv("PLAIT_SHM_MOVE", "yes")
    with pytest.raises(ValueError, match="PLAIT_SHM_MOVE='yes'"):
        ShmConfig.from_env(2)
