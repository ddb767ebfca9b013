"""What the engine did and when: per-rank events, a Chrome trace and a Gantt chart.

The engine records, for each step, every compute action (``F``/``B``/``I``/``W``) and
every wait for a transfer, with ``time.perf_counter()`` start and end. Ranks on one host
share that clock, so :func:`gather_events` can put all pipeline ranks on one time axis.

* :func:`chrome_trace` writes JSON for ``chrome://tracing`` or https://ui.perfetto.dev
  (one process per rank);
* :func:`gantt_png` draws the same as a PNG when matplotlib is installed (``pip install
  matplotlib``; otherwise it returns None and writes nothing);
* :func:`measured_bubble` gives the fraction of rank-time not spent computing, the
  measured counterpart of :attr:`SimResult.bubble_fraction`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from .actions import Action, Kind

CATEGORIES = ("compute", "wait")
_KINDS = tuple(Kind)
COLORS = {Kind.F: "#4C72B0", Kind.B: "#55A868", Kind.I: "#DD8452", Kind.W: "#8172B3"}


@dataclass(frozen=True)
class Event:
    """One interval on one rank: a compute action, or a wait for the transfer ``action`` names."""

    rank: int
    action: Action
    category: str
    start: float
    end: float

    @property
    def name(self) -> str:
        return str(self.action) if self.category == "compute" else f"wait {self.action}"


class Recorder:
    """Collects one step's events on one rank (cheap: two clock reads per action)."""

    def __init__(self, rank: int, enabled: bool = True) -> None:
        self.rank = rank
        self.enabled = enabled
        self.events: list[Event] = []

    def reset(self) -> None:
        self.events = []

    def add(self, action: Action, category: str, start: float, end: float) -> None:
        if self.enabled:
            self.events.append(Event(self.rank, action, category, start, end))


def gather_events(events: Sequence[Event], comm) -> list[Event]:
    """Every rank's events on every rank of ``comm`` (a Communicator), by all-gather."""
    rows = [[CATEGORIES.index(e.category), e.action.stage, _KINDS.index(e.action.kind), e.action.microbatch,
             e.start, e.end] for e in events]
    count = torch.tensor([len(rows)], dtype=torch.float64)
    longest = int(comm.all_gather(count, dim=0).max().item())
    table = torch.full((max(longest, 1), 6), -1.0, dtype=torch.float64)
    if rows:
        table[: len(rows)] = torch.tensor(rows, dtype=torch.float64)
    everything = comm.all_gather(table, dim=0).view(comm.size, -1, 6).tolist()
    out = []
    for rank, table_rows in enumerate(everything):
        for cat, stage, kind, mb, start, end in table_rows:
            if cat >= 0:
                out.append(Event(rank, Action(int(stage), _KINDS[int(kind)], int(mb)), CATEGORIES[int(cat)],
                                 start, end))
    return out


def measured_bubble(events: Iterable[Event], num_ranks: int) -> dict:
    """makespan (s), compute time per rank (s) and the fraction of rank-time spent not computing."""
    events = list(events)
    if not events:
        return {"makespan": 0.0, "busy": [0.0] * num_ranks, "bubble_fraction": 0.0}
    t0 = min(e.start for e in events)
    makespan = max(e.end for e in events) - t0
    busy = [0.0] * num_ranks
    for e in events:
        if e.category == "compute":
            busy[e.rank] += e.end - e.start
    bubble = 1.0 - sum(busy) / (num_ranks * makespan) if makespan > 0 else 0.0
    return {"makespan": makespan, "busy": busy, "bubble_fraction": bubble}


def chrome_trace(events: Iterable[Event], path: Optional[Union[str, Path]] = None) -> dict:
    """The events as a Chrome trace (dict); written as JSON to ``path`` when given."""
    events = list(events)
    t0 = min((e.start for e in events), default=0.0)
    trace = [{"name": e.name, "cat": e.category, "ph": "X", "pid": e.rank, "tid": e.category,
              "ts": (e.start - t0) * 1e6, "dur": (e.end - e.start) * 1e6,
              "args": {"stage": e.action.stage, "microbatch": e.action.microbatch}} for e in events]
    trace += [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"pipeline rank {r}"}}
              for r in sorted({e.rank for e in events})]
    document = {"traceEvents": trace, "displayTimeUnit": "ms"}
    if path is not None:
        Path(path).write_text(json.dumps(document))
    return document


def gantt_png(events: Iterable[Event], path: Union[str, Path], title: str = "") -> Optional[Path]:
    """Draw compute actions per rank as a Gantt chart PNG; None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    events = [e for e in events if e.category == "compute"]
    t0 = min((e.start for e in events), default=0.0)
    ranks = sorted({e.rank for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.2))
    for e in events:
        start, width = (e.start - t0) * 1e3, (e.end - e.start) * 1e3
        ax.broken_barh([(start, width)], (e.rank - 0.4, 0.8), facecolors=COLORS.get(e.action.kind, "grey"),
                       edgecolor="white", linewidth=0.5)
        ax.text(start + width / 2, e.rank, str(e.action.microbatch), ha="center", va="center", fontsize=6,
                color="white", clip_on=True)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title)
    used = sorted({e.action.kind for e in events}, key=_KINDS.index)
    ax.legend(handles=[Patch(color=COLORS[k], label=k.value) for k in used], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
