"""``Schedule.validate()``: prove a schedule correct and deadlock-free before it runs.

Checks, in order (the first fault raises :class:`ScheduleError`, a ValueError whose
message holds a step x rank grid with the faulty cells marked ``>like this<``):

1. every action names an existing stage and microbatch, on the rank the stage lives on;
2. counts: one F per (stage, microbatch), and one B or one I plus one W;
3. same-rank order: nothing runs before an action on its own rank that it needs
   (F before its B/I, I before its W, stage s before s+1 when both share a rank);
4. communication (lowered schedules): every transfer has one SEND after its producer and
   one RECV before its consumer, and no SEND/RECV names a transfer that does not exist;
5. a dry run of the lowered schedule under the strictest transport rules (each pair of
   ranks matches its transfers first-in first-out, as NCCL does): no crossing, no deadlock.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from .actions import Action, Kind
from .graph import Transfer, backward_kinds, compute_deps, transfer_into, transfer_of_comm, transfer_out
from .schedule import Schedule

CONTEXT_ROWS = 6  # grid rows shown around the marked cells


class ScheduleError(ValueError):
    """A schedule fault; ``problem`` says what, ``grid`` shows where."""

    def __init__(self, problem: str, grid: str, marks: dict[tuple[int, int], str]) -> None:
        super().__init__(f"{problem}\n{grid}")
        self.problem = problem
        self.grid = grid
        self.marks = marks


def render_grid(schedule: Schedule, marks: dict[tuple[int, int], str], rows: Optional[range] = None) -> str:
    """Step x rank table of ``schedule``; cells in ``marks`` (rank, step) are shown ``>cell<``
    and their notes listed below. Without ``rows``, shows the marked region (or everything)."""
    depth = max((len(r) for r in schedule.actions), default=0)
    if rows is None:
        if marks:
            lo = max(0, min(step for _, step in marks) - CONTEXT_ROWS)
            hi = min(depth, max(step for _, step in marks) + CONTEXT_ROWS + 1)
            rows = range(lo, max(hi, lo + 1))
        else:
            rows = range(depth)
    cells = [[("" if step >= len(schedule.actions[r]) else str(schedule.actions[r][step]))
              for r in range(schedule.num_ranks)] for step in rows]
    for i, step in enumerate(rows):
        for r in range(schedule.num_ranks):
            if (r, step) in marks:
                cells[i][r] = f">{cells[i][r] or '(end)'}<"
    header = ["step"] + [f"rank {r}" for r in range(schedule.num_ranks)]
    widths = [max(len(header[0]), len(str(rows.stop)))] + [
        max([len(header[r + 1])] + [len(line[r]) for line in cells]) for r in range(schedule.num_ranks)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    if rows.start > 0:
        lines.append(f"... {rows.start} earlier steps")
    for step, line in zip(rows, cells):
        lines.append(" | ".join(c.ljust(w) for c, w in zip([str(step)] + line, widths)))
    if rows.stop < depth:
        lines.append(f"... {depth - rows.stop} later steps")
    for (r, step), note in sorted(marks.items()):
        if note:
            lines.append(f"  rank {r} step {step}: {note}")
    return "\n".join(lines)


def _fail(schedule: Schedule, problem: str, marks: dict[tuple[int, int], str]) -> ScheduleError:
    return ScheduleError(problem, render_grid(schedule, marks), marks)


def _positions(schedule: Schedule) -> dict[Action, list[tuple[int, int]]]:
    where: dict[Action, list[tuple[int, int]]] = {}
    for rank, row in enumerate(schedule.actions):
        for step, action in enumerate(row):
            where.setdefault(action, []).append((rank, step))
    return where


def check_structure(schedule: Schedule) -> None:
    """Checks 1-4 of the module docstring; raises :class:`ScheduleError`."""
    s_count, m = schedule.num_stages, schedule.num_microbatches
    for rank, row in enumerate(schedule.actions):
        for step, a in enumerate(row):
            if a.stage >= s_count:
                raise _fail(schedule, f"{a} names stage {a.stage}, but the schedule has stages 0..{s_count - 1}",
                            {(rank, step): "no such stage"})
            if a.microbatch >= m:
                raise _fail(schedule, f"{a} names microbatch {a.microbatch}, but there are {m} (0..{m - 1})",
                            {(rank, step): "no such microbatch"})
            if schedule.placement[a.stage] != rank:
                raise _fail(schedule, f"{a} is on rank {rank}, but stage {a.stage} lives on rank "
                            f"{schedule.placement[a.stage]}; move it there",
                            {(rank, step): f"belongs on rank {schedule.placement[a.stage]}"})
    where = _positions(schedule)
    _check_counts(schedule, where)
    _check_local_order(schedule, where)
    if schedule.is_lowered:
        _check_comm(schedule, where)


def _check_counts(schedule: Schedule, where: dict[Action, list[tuple[int, int]]]) -> None:
    for action, spots in where.items():
        if len(spots) > 1:
            raise _fail(schedule, f"{action} appears {len(spots)} times; each action must appear once "
                        f"(a duplicated microbatch?)", {spot: "duplicate" for spot in spots})
    forward_only = schedule.is_forward_only
    for s in range(schedule.num_stages):
        rank = schedule.placement[s]
        end = (rank, len(schedule.actions[rank]))  # where a missing action is pointed at
        for mb in range(schedule.num_microbatches):
            spot = {k: where.get(Action(s, k, mb), [None])[0] for k in (Kind.F, Kind.B, Kind.I, Kind.W)}
            if spot[Kind.F] is None:
                raise _fail(schedule, f"stage {s} never runs the forward of microbatch {mb}: add {s}F{mb} to "
                            f"rank {rank}", {spot[Kind.B] or spot[Kind.I] or end: f"{s}F{mb} is missing"})
            if forward_only:
                continue
            if spot[Kind.B] and (spot[Kind.I] or spot[Kind.W]):
                raise _fail(schedule, f"stage {s} microbatch {mb} has both a full backward B and a split "
                            f"one (I/W); keep one of them",
                            {spot[k]: "conflict" for k in (Kind.B, Kind.I, Kind.W) if spot[k]})
            if not spot[Kind.B] and not (spot[Kind.I] and spot[Kind.W]):
                missing = "B" if not (spot[Kind.I] or spot[Kind.W]) else ("W" if spot[Kind.I] else "I")
                raise _fail(schedule, f"stage {s} never runs the backward {missing} of microbatch {mb}: add "
                            f"{s}{missing}{mb} to rank {rank}",
                            {spot[Kind.I] or spot[Kind.W] or spot[Kind.F]: f"{s}{missing}{mb} is missing"})


def _check_local_order(schedule: Schedule, where: dict[Action, list[tuple[int, int]]]) -> None:
    bwd = backward_kinds(schedule)
    for rank, row in enumerate(schedule.actions):
        for step, a in enumerate(row):
            if not a.kind.is_compute:
                continue
            for need in compute_deps(a, schedule, bwd):
                spot = where.get(need, [None])[0]
                if spot is not None and spot[0] == rank and spot[1] > step:
                    raise _fail(schedule, f"{a} at step {step} of rank {rank} needs {need}, which comes later "
                                f"on the same rank (step {spot[1]}); swap them",
                                {(rank, step): f"needs {need}", spot: "too late"})


def _check_comm(schedule: Schedule, where: dict[Action, list[tuple[int, int]]]) -> None:
    bwd = backward_kinds(schedule)
    for rank, row in enumerate(schedule.actions):
        for step, a in enumerate(row):
            if a.kind.is_comm and transfer_of_comm(a, schedule) is None:
                raise _fail(schedule, f"{a} names no transfer: its stages do not exist or share a rank; "
                            f"remove it", {(rank, step): "no such transfer"})
            if a.kind.is_comm and a.kind in (Kind.SEND_B, Kind.RECV_B) and schedule.is_forward_only:
                raise _fail(schedule, f"{a} in a forward-only schedule", {(rank, step): "no backward here"})
    needed: list[tuple[Transfer, Action, Action]] = []
    for row in schedule.actions:
        for a in row:
            if a.kind.is_compute:
                out = transfer_out(a, schedule)
                if out is not None:
                    needed.append((out, a, _consumer(out, bwd)))
    wanted = {t.send for t, _, _ in needed} | {t.recv for t, _, _ in needed}
    for rank, row in enumerate(schedule.actions):
        for step, a in enumerate(row):
            if a.kind.is_comm and a not in wanted:
                raise _fail(schedule, f"{a} has no compute action to feed it; remove it", {(rank, step): "unused"})
    for transfer, producer, consumer in needed:
        (p_rank, p_step), (c_rank, c_step) = where[producer][0], where[consumer][0]
        send, recv = where.get(transfer.send), where.get(transfer.recv)
        if send is None:
            marks = {(p_rank, p_step): f"its result is never sent (add {transfer.send} after it)"}
            if recv is not None:
                marks[recv[0]] = "waits for a send that never comes"
            raise _fail(schedule, f"missing {transfer.send} on rank {transfer.src_rank}: {producer}'s result "
                        f"must reach {consumer} on rank {transfer.dst_rank} (a dropped send?)", marks)
        if recv is None:
            raise _fail(schedule, f"missing {transfer.recv} on rank {transfer.dst_rank}: {consumer} needs "
                        f"{producer}'s result from rank {transfer.src_rank}",
                        {(c_rank, c_step): f"add {transfer.recv} before it", send[0]: "never received"})
        if send[0][1] < p_step:
            raise _fail(schedule, f"{transfer.send} comes before {producer}, whose result it sends; move it after",
                        {send[0]: "too early", (p_rank, p_step): "producer"})
        if recv[0][1] > c_step:
            raise _fail(schedule, f"{transfer.recv} comes after {consumer}, which needs it; move it before",
                        {recv[0]: "too late", (c_rank, c_step): "consumer"})


def _consumer(transfer: Transfer, bwd: dict[tuple[int, int], Kind]) -> Action:
    if transfer.direction == "F":
        return Action(transfer.dst_stage, Kind.F, transfer.microbatch)
    return Action(transfer.dst_stage, bwd.get((transfer.dst_stage, transfer.microbatch), Kind.B), transfer.microbatch)


def deadlock_error(schedule: Schedule, pointer: list[int], rows: list[list[Action]], deps, done) -> ScheduleError:
    """The error for ranks that wait on each other forever, naming what each one waits for."""
    marks, waits = {}, []
    for rank, row in enumerate(rows):
        if pointer[rank] < len(row):
            step = pointer[rank]
            missing = [d for d in deps[rank][step] if d not in done]
            text = ", ".join(f"{d} (rank {schedule.placement[d.stage]})" for d in missing) or "nothing"
            marks[(rank, step)] = f"waits for {text}"
            waits.append(f"rank {rank} at {row[step]} waits for {text}")
    return _fail(schedule, "deadlock: no rank can go on; " + "; ".join(waits) +
                 ". Reorder the actions so each one's inputs are produced earlier", marks)


def dry_run(schedule: Schedule) -> None:
    """Run a lowered schedule's communication (check 5); raise :class:`ScheduleError` on crossing or deadlock."""
    bwd = backward_kinds(schedule)
    queues: dict[tuple[int, int], dict[int, deque]] = {}
    arrived: set[Transfer] = set()
    pointer = [0] * schedule.num_ranks

    def match(pair: tuple[int, int]) -> None:
        a, b = pair
        qa, qb = queues[pair][a], queues[pair][b]
        while qa and qb:
            (ta, sa), (tb, sb) = qa[0], qb[0]
            if ta != tb:
                raise _fail(schedule, f"ranks {a} and {b} post their transfers in different orders: rank {a}'s "
                            f"next is {_name(ta, a)}, rank {b}'s is {_name(tb, b)}; with in-order matching "
                            f"(NCCL) this mismatches or deadlocks. Post them in one order on both ranks",
                            {(a, sa): "posted here", (b, sb): "but this one here"})
            qa.popleft(), qb.popleft()
            arrived.add(ta)

    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(schedule.actions):
            while pointer[rank] < len(row):
                step, a = pointer[rank], row[pointer[rank]]
                if a.kind.is_comm:
                    t = transfer_of_comm(a, schedule)
                    peer = t.dst_rank if t.src_rank == rank else t.src_rank
                    pair = (min(rank, peer), max(rank, peer))
                    queues.setdefault(pair, {pair[0]: deque(), pair[1]: deque()})[rank].append((t, step))
                    match(pair)
                elif any(t not in arrived for t in transfer_into(a, schedule, bwd)):
                    break
                pointer[rank] += 1
                progress = True
    stuck = [r for r in range(schedule.num_ranks) if pointer[r] < len(schedule.actions[r])]
    if stuck:
        marks, waits = {}, []
        for rank in stuck:
            a = schedule.actions[rank][pointer[rank]]
            missing = [t for t in transfer_into(a, schedule, bwd) if t not in arrived]
            text = ", ".join(f"{t.send} from rank {t.src_rank}" for t in missing)
            marks[(rank, pointer[rank])] = f"waits for {text}"
            waits.append(f"rank {rank} at {a} waits for {text}")
        raise _fail(schedule, "deadlock in the communication dry run: " + "; ".join(waits), marks)


def _name(t: Transfer, rank: int) -> str:
    return str(t.send if t.src_rank == rank else t.recv)


def validate(schedule: Schedule) -> None:
    """All checks of the module docstring; raises :class:`ScheduleError` on the first fault."""
    from .simulate import run_events, unit_costs

    if not schedule.is_lowered:
        dry_run(schedule.lower())   # lower() runs check_structure and run_events itself
        return
    check_structure(schedule)
    run_events(schedule, unit_costs(schedule.num_stages), 0.0)  # compute-level deadlocks, named by action
    dry_run(schedule)

