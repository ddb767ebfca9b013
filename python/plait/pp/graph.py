"""Who needs whom: the data dependencies between a schedule's compute actions.

Shared by the validator, the simulator and the lowering pass, so the three agree
on what a schedule means:

=============  ==============================================================
action         needs
=============  ==============================================================
F(s, mb)       F(s-1, mb), for s > 0 (the stage's input)
B/I(s, mb)     F(s, mb), and B/I(s+1, mb) for s < last (its output's gradient)
W(s, mb)       I(s, mb)
=============  ==============================================================

A dependency between stages on different ranks is a *transfer*: forward
activations (``F``) go from stage s to s+1, input gradients (``B``) from s+1 to s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .actions import BACKWARD_INPUT, Action, Kind
from .schedule import Schedule


@dataclass(frozen=True, order=True)
class Transfer:
    """One tensor crossing ranks: ``direction`` "F" (activation) or "B" (gradient)."""

    direction: str
    src_stage: int
    dst_stage: int
    microbatch: int
    src_rank: int
    dst_rank: int

    @property
    def send(self) -> Action:
        return Action(self.src_stage, Kind.SEND_F if self.direction == "F" else Kind.SEND_B, self.microbatch)

    @property
    def recv(self) -> Action:
        return Action(self.dst_stage, Kind.RECV_F if self.direction == "F" else Kind.RECV_B, self.microbatch)


def backward_kinds(schedule: Schedule) -> dict[tuple[int, int], Kind]:
    """(stage, mb) -> the kind (B or I) that makes that stage's input gradient."""
    kinds: dict[tuple[int, int], Kind] = {}
    for row in schedule.actions:
        for a in row:
            if a.kind in BACKWARD_INPUT:
                kinds.setdefault((a.stage, a.microbatch), a.kind)
    return kinds


def compute_deps(action: Action, schedule: Schedule, bwd: dict[tuple[int, int], Kind]) -> list[Action]:
    """The compute actions ``action`` needs (see the module table)."""
    s, mb, last = action.stage, action.microbatch, schedule.num_stages - 1
    if action.kind == Kind.F:
        return [Action(s - 1, Kind.F, mb)] if s > 0 else []
    if action.kind in BACKWARD_INPUT:
        deps = [Action(s, Kind.F, mb)]
        if s < last:
            deps.append(Action(s + 1, bwd.get((s + 1, mb), Kind.B), mb))
        return deps
    if action.kind == Kind.W:
        return [Action(s, Kind.I, mb)]
    raise ValueError(f"{action} is not a compute action")


def transfer_into(action: Action, schedule: Schedule, bwd: dict[tuple[int, int], Kind]) -> list[Transfer]:
    """Transfers a compute action must receive before it runs (cross-rank deps only)."""
    s, mb, last, where = action.stage, action.microbatch, schedule.num_stages - 1, schedule.placement
    if action.kind == Kind.F and s > 0 and where[s - 1] != where[s]:
        return [Transfer("F", s - 1, s, mb, where[s - 1], where[s])]
    if action.kind in BACKWARD_INPUT and s < last and where[s + 1] != where[s]:
        return [Transfer("B", s + 1, s, mb, where[s + 1], where[s])]
    return []


def transfer_out(action: Action, schedule: Schedule) -> Optional[Transfer]:
    """The transfer a compute action's result feeds, if its consumer is on another rank."""
    s, mb, last, where = action.stage, action.microbatch, schedule.num_stages - 1, schedule.placement
    if action.kind == Kind.F and s < last and where[s + 1] != where[s]:
        return Transfer("F", s, s + 1, mb, where[s], where[s + 1])
    if action.kind in BACKWARD_INPUT and s > 0 and where[s - 1] != where[s]:
        return Transfer("B", s, s - 1, mb, where[s], where[s - 1])
    return None



def transfer_of_comm(action: Action, schedule: Schedule) -> Optional[Transfer]:
    """The transfer a SEND/RECV action names; None when that stage pair shares a rank or does not exist."""
    s, mb, last, where = action.stage, action.microbatch, schedule.num_stages - 1, schedule.placement
    if s > last:
        return None
    pairs = {Kind.SEND_F: ("F", s, s + 1), Kind.RECV_F: ("F", s - 1, s),
             Kind.SEND_B: ("B", s, s - 1), Kind.RECV_B: ("B", s + 1, s)}
    direction, src, dst = pairs[action.kind]
    if not (0 <= src <= last and 0 <= dst <= last) or where[src] == where[dst]:
        return None
    return Transfer(direction, src, dst, mb, where[src], where[dst])
