"""The shm backend's wait strategy: fast back to back, cheap when a rank waits long.

A rank blocked in a collective spins for at most its learned budget (1 ms by default) and
then sleeps in the kernel, so a rank waiting seconds for a late peer (a server waiting for
requests) uses almost no CPU; back-to-back calls keep the budget up.
"""
import time

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
