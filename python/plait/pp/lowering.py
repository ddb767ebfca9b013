"""Pure passes over schedules: add the communication, keep only the forwards.

``lower`` places every transfer's SEND and RECV by the time it happens in a unit-cost
simulation (F=1, I=W=1, B=2): each rank's list becomes its compute, sends and receives
sorted by that time. Two properties follow, and the engine relies on both:

* every pair of ranks posts the transfers between them in one order (the global
  order of their times), so in-order transports such as NCCL can never cross;
* a receive is posted when, ideally, its data is sent -- early enough to overlap
  compute, and never ahead of an action another rank is waiting for, so even a
  receive that blocks cannot deadlock (the simulation is a run that works).
"""
from __future__ import annotations

from .actions import Kind
from .graph import transfer_out
from .schedule import Schedule

def lower(schedule: Schedule) -> Schedule:
    """``schedule`` with SEND_F/RECV_F/SEND_B/RECV_B added; returned unchanged if it has them."""
    if schedule.is_lowered:
        return schedule
    from .simulate import run_events, unit_costs
    from .validate import check_structure

    check_structure(schedule)
    done = run_events(schedule, unit_costs(schedule.num_stages), 0.0)
    events: list[list[tuple]] = [[] for _ in range(schedule.num_ranks)]
    for rank, row in enumerate(schedule.actions):
        for step, action in enumerate(row):
            _, start, end = done[action]
            events[rank].append(((start, 1, step), action))
            transfer = transfer_out(action, schedule)
            if transfer is not None:
                key = (end, 0, transfer.src_rank, transfer.dst_rank, transfer.direction, transfer.src_stage,
                       transfer.microbatch)
                events[rank].append((key, transfer.send))
                events[transfer.dst_rank].append((key, transfer.recv))
    rows = [tuple(action for _, action in sorted(row, key=lambda e: e[0])) for row in events]
    return Schedule(tuple(rows), schedule.num_microbatches, schedule.placement, schedule.name)


def forward_only(schedule: Schedule) -> Schedule:
    """Only the F actions of ``schedule``, in its order (compute-only; lower it to run)."""
    rows = tuple(tuple(a for a in row if a.kind == Kind.F) for row in schedule.actions)
    return Schedule(rows, schedule.num_microbatches, schedule.placement, f"{schedule.name}-forward")
