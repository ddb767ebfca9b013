"""Event simulation of a schedule: makespan, idle time, bubble and memory per rank.

Costs are per action of one model stage on one microbatch: ``forward`` for F,
``backward`` for a full B, and ``weight`` for the part of B that computes weight
gradients (default half), so I costs ``backward - weight`` and W costs ``weight``.
One set of costs therefore describes every schedule and comparisons are fair. A
dependency between ranks adds ``p2p``.

Each rank runs its actions in list order; an action starts when the rank is free and
everything it needs (:mod:`plait.pp.graph`) has finished. With unit costs the results
are the published ones, e.g. ``(p-1)/(m+p-1)`` for GPipe and 1F1B.

``peak_activations[r]`` counts stage-microbatches whose forward ran on rank ``r`` and
whose backward (B, or W for a split backward) has not finished: the activations the rank
holds. With ``num_virtual`` stages per rank one unit is one stage's share, ``1/num_virtual``
of the rank's layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .actions import Action, Kind
from .graph import backward_kinds, compute_deps
from .schedule import Schedule


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` predicts; times are in the units of the costs given."""

    makespan: float
    busy: tuple[float, ...]
    idle: tuple[float, ...]
    bubble_fraction: float
    peak_activations: tuple[int, ...]
    timeline: tuple[tuple[int, Action, float, float], ...]  # (rank, action, start, end)

    @property
    def bubble_time(self) -> float:
        """Idle time summed over ranks."""
        return sum(self.idle)


Cost = Union[float, Sequence[float]]


def unit_costs(num_stages: int) -> dict[Kind, list[float]]:
    """F=1, B=2, I=W=1 for every stage: the costs lowering and validation use."""
    return stage_costs(1.0, 2.0, 1.0, 0.0, num_stages)


def stage_costs(forward: Cost, backward: Cost, weight: Optional[Cost], p2p: float,
                num_stages: int) -> dict[Kind, list[float]]:
    """Per-kind, per-stage costs from numbers (every stage alike) or one value per stage."""
    def per_stage(name: str, value) -> list[float]:
        values = [value] * num_stages if isinstance(value, (int, float)) else list(value)
        if len(values) != num_stages:
            raise ValueError(f"{name} has {len(values)} values, but the schedule has {num_stages} stages; give "
                             f"one number, or one per stage")
        for v in values:
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ValueError(f"{name} must be non-negative numbers, got {v!r}")
        return [float(v) for v in values]

    f, b = per_stage("forward", forward), per_stage("backward", backward)
    w = [x / 2 for x in b] if weight is None else per_stage("weight", weight)
    if not isinstance(p2p, (int, float)) or p2p != p2p or p2p < 0:
        raise ValueError(f"p2p must be a non-negative number of time units, got {p2p!r}")
    if min(f) <= 0 or min(b) <= 0:
        raise ValueError(f"forward and backward must be positive, got forward={forward}, backward={backward}")
    if any(wi > bi for wi, bi in zip(w, b)):
        raise ValueError(f"weight={weight} is the weight-gradient part of backward={backward}, so it cannot "
                         f"exceed it; pass weight <= backward")
    return {Kind.F: f, Kind.B: b, Kind.I: [bi - wi for bi, wi in zip(b, w)], Kind.W: w}


def peak_activations(schedule: Schedule) -> tuple[int, ...]:
    """Per rank, the most stage-microbatches held at once, from the list order alone."""
    split = {(a.stage, a.microbatch) for row in schedule.actions for a in row if a.kind == Kind.W}
    peaks = []
    if schedule.is_forward_only:
        return tuple(0 for _ in schedule.actions)
    for row in schedule.actions:
        held = peak = 0
        for a in row:
            if a.kind == Kind.F:
                held += 1
                peak = max(peak, held)
            elif a.kind in (Kind.B, Kind.W) or (a.kind == Kind.I and (a.stage, a.microbatch) not in split):
                held -= 1  # freed by the action that ends its backward
        peaks.append(peak)
    return tuple(peaks)


def run_events(schedule: Schedule, costs: dict[Kind, list[float]], p2p: float) -> dict[Action, tuple[int, float, float]]:
    """Start and end of every compute action: action -> (rank, start, end).

    Raises :class:`~plait.pp.validate.ScheduleError` with the blocked actions when the
    ranks wait on each other forever.
    """
    rows = [[a for a in row if a.kind.is_compute] for row in schedule.actions]
    index = {a: (rank, i) for rank, row in enumerate(rows) for i, a in enumerate(row)}
    bwd = backward_kinds(schedule)
    deps = [[compute_deps(a, schedule, bwd) for a in row] for row in rows]
    # Dependencies as (rank, position); a missing one can never finish: (-1, -1).
    needs = [[[index.get(d, (-1, -1)) for d in ds] for ds in row] for row in deps]
    ends = [[-1.0] * len(row) for row in rows]  # -1: not run yet
    pointer = [0] * len(rows)
    free = [0.0] * len(rows)
    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(rows):
            while pointer[rank] < len(row):
                i = pointer[rank]
                start = free[rank]
                for d_rank, d_i in needs[rank][i]:
                    d_end = ends[d_rank][d_i] if d_rank >= 0 else -1.0
                    if d_end < 0:
                        break
                    start = max(start, d_end + (p2p if d_rank != rank else 0.0))
                else:
                    ends[rank][i] = free[rank] = start + costs[row[i].kind][row[i].stage]
                    pointer[rank] += 1
                    progress = True
                    continue
                break
    done = {row[i]: (rank, ends[rank][i] - costs[row[i].kind][row[i].stage], ends[rank][i])
            for rank, row in enumerate(rows) for i in range(pointer[rank])}
    if any(pointer[r] < len(rows[r]) for r in range(len(rows))):
        from .validate import deadlock_error

        raise deadlock_error(schedule.compute_only(), pointer, rows, deps, done)
    return done


def simulate(schedule: Schedule, forward: Cost = 1.0, backward: Cost = 2.0, weight: Optional[Cost] = None,
             p2p: float = 0.0) -> SimResult:
    """Simulate ``schedule`` with the given costs; see the module docstring.

    Each cost is one number for every stage, or a sequence with one per model stage
    (e.g. measured times of unbalanced stages).

    The schedule's structure is checked first (a ValueError with a step x rank grid
    names any fault), so the numbers always describe a schedule that can run.
    """
    from .validate import check_structure

    check_structure(schedule.compute_only())
    costs = stage_costs(forward, backward, weight, p2p, schedule.num_stages)
    done = run_events(schedule, costs, float(p2p))
    makespan = max((end for _, _, end in done.values()), default=0.0)
    busy = [0.0] * schedule.num_ranks
    for rank, start, end in done.values():
        busy[rank] += end - start
    idle = tuple(makespan - b for b in busy)
    bubble = sum(idle) / (schedule.num_ranks * makespan) if makespan > 0 else 0.0
    timeline = tuple(sorted(((r, a, s, e) for a, (r, s, e) in done.items()), key=lambda x: (x[0], x[2])))
    return SimResult(makespan, tuple(busy), idle, bubble, peak_activations(schedule), timeline)
