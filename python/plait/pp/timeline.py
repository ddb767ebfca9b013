"""What the engine did and when: per-rank events, a Chrome trace and a Gantt chart.

The engine records, for each step, every compute action (``F``/``B``/``I``/``W``) and
every wait for a transfer, with ``time.perf_counter()`` start and end (CUDA events on a GPU). Ranks on one host
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

from .actions import Action, Kind

CATEGORIES = ("compute", "wait", "post")
_KINDS = tuple(Kind)
COLORS = {Kind.F: "#4C72B0", Kind.B: "#55A868", Kind.I: "#DD8452", Kind.W: "#8172B3"}


@dataclass(frozen=True)
class Event:
    """One interval on one rank: a compute action (category "compute"), posting a send or
    receive ("post"), or waiting for the transfer ``action`` names ("wait")."""

    rank: int
    action: Action
    category: str
    start: float
    end: float

    @property
    def name(self) -> str:
        return str(self.action) if self.category != "wait" else f"wait {self.action}"


class Recorder:
    """Collects one step's events on one rank (cheap: two clock reads per action).

    On CUDA the times come from CUDA events (kernels run after the host returns), turned
    into host clock times at :meth:`finish` relative to an event recorded at :meth:`reset`.
    """

    def __init__(self, rank: int, enabled: bool = True, device: Optional[torch.device] = None) -> None:
        self.rank = rank
        self.enabled = enabled
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.events: list[Event] = []
        self._pending: list[tuple[Action, str, object, object]] = []
        self._ref = None
        self._ref_host = 0.0

    def reset(self) -> None:
        self.events, self._pending = [], []
        if self.enabled and self.cuda:
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
            self._ref_host = time.perf_counter()

    def start(self):
        """A start mark for :meth:`stop`."""
        if not self.enabled:
            return None
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
            return mark
        return time.perf_counter()

    def stop(self, action: Action, category: str, start) -> None:
        """Record ``action`` from ``start`` (a :meth:`start` mark) until now."""
        if not self.enabled:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((action, category, start, end))
        else:
            self.events.append(Event(self.rank, action, category, start, time.perf_counter()))

    def finish(self) -> None:
        """Resolve CUDA marks into times (waits for the device); nothing to do on CPU."""
        if self._pending:
            torch.cuda.synchronize()
            host = lambda mark: self._ref_host + self._ref.elapsed_time(mark) / 1e3  # noqa: E731
            self.events += [Event(self.rank, a, c, host(s), host(e)) for a, c, s, e in self._pending]
            self._pending = []


def gather_events(events: Sequence[Event], comm, device: Optional[torch.device] = None) -> list[Event]:
    """Every rank's events on every rank of ``comm`` (a Communicator), by all-gather on ``device``."""
    rows = [[CATEGORIES.index(e.category), e.action.stage, _KINDS.index(e.action.kind), e.action.microbatch,
             e.start, e.end] for e in events]
    count = torch.tensor([len(rows)], dtype=torch.float64, device=device)
    longest = int(comm.all_gather(count, dim=0).max().item())
    table = torch.full((max(longest, 1), 6), -1.0, dtype=torch.float64, device=device)
    if rows:
        table[: len(rows)] = torch.tensor(rows, dtype=torch.float64, device=device)
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


def gantt_png(events: Union[Iterable[Event], Sequence[tuple[str, Iterable[Event]]]], path: Union[str, Path],
              title: str = "") -> Optional[Path]:
    """Draw compute actions per rank as a Gantt chart PNG; None (nothing written) without matplotlib.

    ``events`` is one step's events, or a list of ``(title, events)`` panels drawn one
    above the other (e.g. one per schedule).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    items = list(events)
    panels = [(title, items)] if not items or isinstance(items[0], Event) else [(t, list(e)) for t, e in items]
    heights = [0.45 * max(1, len({e.rank for e in evs})) + 0.9 for _, evs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (panel_title, panel_events) in zip(axes[:, 0], panels):
        _draw(ax, [e for e in panel_events if e.category == "compute"], panel_title, Patch)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _draw(ax, events: list[Event], title: str, patch) -> None:
    t0 = min((e.start for e in events), default=0.0)
    ranks = sorted({e.rank for e in events})
    for e in events:
        start, width = (e.start - t0) * 1e3, (e.end - e.start) * 1e3
        ax.broken_barh([(start, width)], (e.rank - 0.4, 0.8), facecolors=COLORS.get(e.action.kind, "grey"),
                       edgecolor="white", linewidth=0.5)
        ax.text(start + width / 2, e.rank, str(e.action.microbatch), ha="center", va="center", fontsize=6,
                color="white", clip_on=True)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    used = sorted({e.action.kind for e in events}, key=_KINDS.index)
    ax.legend(handles=[patch(color=COLORS[k], label=k.value) for k in used], loc="upper right", fontsize=7)
