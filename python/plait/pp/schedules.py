"""Schedule generators: GPipe, 1F1B, interleaved 1F1B and zero-bubble ZB1P.

``build_schedule(name, num_stages, num_microbatches, num_virtual=1)`` returns a
compute-only :class:`~plait.pp.schedule.Schedule`. ``num_stages`` is the number of
pipeline ranks ``p``; with ``num_virtual = v`` each rank holds ``v`` model stages, placed
in a loop (stage ``s`` on rank ``s % p``), so actions name stages ``0 .. p*v - 1``.

==============  ====  ======================================================  =====================
name            v     order on rank r                                         bubble (unit costs)
==============  ====  ======================================================  =====================
``gpipe``       1     all forwards, then all backwards                        (p-1)/(m+p-1)
``1f1b``        1     p-1-r forwards, then one forward one backward, drain    (p-1)/(m+p-1)
``interleaved`` >=2   Megatron's interleaved 1F1B, microbatches in rounds     ((p-1)/v)/(m+(p-1)/v)
``zb1p``        >=1   1F1B with B split in I and W; W deferred r steps into   about 1/3 of 1F1B's
                      the bubbles (ZB-H1 for v=1, interleaved ZB for v>=2)
==============  ====  ======================================================  =====================

Interleaved and ZB1P process microbatches in rounds of about ``p`` (``max(1, m // p)``
rounds, sizes differing by at most one), as ``torch.distributed.pipelining`` does, which
lets any ``m`` work; the interleaved formula is exact when ``p`` divides ``m``. Every
generator works for fewer microbatches than stages (the bubble is then large).
"""
from __future__ import annotations

from ..config import SCHEDULES, ParallelConfig, canonical_schedule
from .actions import Action, Kind
from .schedule import Schedule


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (peak activations = m)."""
    p, m = num_stages, num_microbatches
    rows = [[Action(r, Kind.F, i) for i in range(m)] + [Action(r, Kind.B, i) for i in range(m)] for r in range(p)]
    return Schedule.from_lists(rows, m, list(range(p)), "gpipe")


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B: rank r runs p-1-r warm-up forwards, then alternates forward and backward (peak p-r)."""
    p, m = num_stages, num_microbatches
    rows = []
    for r in range(p):
        warmup = min(p - 1 - r, m)
        row = [Action(r, Kind.F, i) for i in range(warmup)]
        for i in range(m - warmup):
            row += [Action(r, Kind.F, warmup + i), Action(r, Kind.B, i)]
        row += [Action(r, Kind.B, i) for i in range(m - warmup, m)]
        rows.append(row)
    return Schedule.from_lists(rows, m, list(range(p)), "1f1b")


def round_sizes(num_stages: int, num_microbatches: int) -> list[int]:
    """Microbatches per round for the interleaved schedules: ``max(1, m // p)`` rounds, near-equal."""
    rounds = max(1, num_microbatches // num_stages)
    base, extra = divmod(num_microbatches, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def _chunk_order(sizes: list[int], num_virtual: int, reverse: bool) -> list[tuple[int, int]]:
    """(chunk, microbatch) pairs: round by round, each round chunk by chunk."""
    order, start = [], 0
    chunks = list(range(num_virtual))
    for size in sizes:
        for chunk in (reversed(chunks) if reverse else chunks):
            order += [(chunk, mb) for mb in range(start, start + size)]
        start += size
    return order


def _interleaved_rows(p: int, m: int, v: int, zero_bubble: bool) -> list[list[Action]]:
    sizes = round_sizes(p, m)
    fwd, bwd = _chunk_order(sizes, v, False), _chunk_order(sizes, v, True)
    total = m * v
    rows = []
    for r in range(p):
        def act(pair: tuple[int, int], kind: Kind) -> Action:
            return Action(pair[0] * p + r, kind, pair[1])

        # Forwards before the first backward: enough to keep the rank busy until its first
        # gradient comes back (two hops per rank for B, one for the shorter I).
        warmup = min((v - 1) * sizes[0] + (1 if zero_bubble else 2) * (p - 1 - r), total)
        row = [act(fwd[i], Kind.F) for i in range(warmup)]
        weights = 0
        for i in range(total):
            if warmup + i < total:
                row.append(act(fwd[warmup + i], Kind.F))
            row.append(act(bwd[i], Kind.I if zero_bubble else Kind.B))
            if zero_bubble and i >= r:  # rank r defers its weight gradients by r steps
                row.append(act(bwd[weights], Kind.W))
                weights += 1
        if zero_bubble:
            row += [act(bwd[i], Kind.W) for i in range(weights, total)]
        rows.append(row)
    return rows


def interleaved(num_stages: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021) with ``num_virtual`` >= 2 looped stages per rank."""
    p, m, v = num_stages, num_microbatches, num_virtual
    placement = [s % p for s in range(p * v)]
    return Schedule.from_lists(_interleaved_rows(p, m, v, False), m, placement, "interleaved")


def zb1p(num_stages: int, num_microbatches: int, num_virtual: int = 1) -> Schedule:
    """Zero-bubble ZB1P (Qi et al. 2024): 1F1B order with B split into I and a deferred W.

    With ``num_virtual=1`` this is the paper's ZB-H1; with more it is the interleaved
    variant torch calls ``ScheduleInterleavedZeroBubble``.
    """
    p, m, v = num_stages, num_microbatches, num_virtual
    placement = [s % p for s in range(p * v)]
    return Schedule.from_lists(_interleaved_rows(p, m, v, True), m, placement, "zb1p")


def build_schedule(name: str, num_stages: int, num_microbatches: int, num_virtual: int = 1) -> Schedule:
    """The compute-only schedule ``name`` (one of :data:`SCHEDULES`) for ``num_stages`` pipeline
    ranks, ``num_microbatches`` microbatches and ``num_virtual`` stages per rank."""
    try:
        name = canonical_schedule(name)
    except ValueError as err:
        raise ValueError(f"{err}, or write your own with plait.pp.parse_schedule") from None
    p = _positive("num_stages", num_stages)
    m = _positive("num_microbatches", num_microbatches)
    v = _positive("num_virtual", num_virtual)
    ParallelConfig(pp=p, num_virtual=v, schedule=name)   # the schedule/virtual-stage rules live there
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    return zb1p(p, m, v)
