"""Pipeline bubble and in-flight activations of a schedule: from plait.pp's simulator, else closed forms.

``pipeline_bubble(schedule, p, m, v)`` answers two questions for p stages, m microbatches
and v virtual chunks per rank, with uniform stage times (forward 1, backward 2 of which
the weight-gradient part W is 1):

* ``fraction``: the share of a rank's step time spent idle (bubble / (work + bubble));
* ``peak_inflight``: how many microbatch-chunks the first rank holds activations for at
  once, the multiplier of its activation memory (a chunk is 1/v of its layers);
* ``last_inflight``: the same for the last rank, which also holds the output layer.

When ``plait.pp.build_schedule`` is importable the schedule is built and simulated
(``Schedule.simulate``); else, or when the schedule is too long to simulate quickly, the
closed forms below answer:

    schedule      bubble fraction              in flight, first rank     last rank
    gpipe         (p-1) / (m+p-1)              m                         m
    1f1b          (p-1) / (m+p-1)              min(m, p)                 1
    interleaved   ((p-1)/v) / (m+(p-1)/v)      min(m*v, v*p + p - 1)     min(m*v, (v-1)*p + 1)
    zb1p          (p-1) / (3m+p-1)             min(m, p)                 min(m, p)

GPipe and 1F1B: Huang et al. 2019, Narayanan et al. 2021 (eq. 1). Interleaved 1F1B:
Narayanan et al. 2021, sec. 2.2.2; its in-flight count is Megatron-LM's warm-up of
2(p-1) + (v-1)p chunks plus one, which gives Korthikanti et al.'s activation factor
L(1 + (p-1)/(pv)). ZB-H1: Qi et al. 2023, "Zero Bubble Pipeline Parallelism": the bubble
shrinks from (p-1)(F+B+W) to (p-1)(F+B-W) at 1F1B's memory; with F = B = W that is a third
(its last rank keeps activations until the deferred W passes run, hence min(m, p) there).
With these unit costs the closed forms equal plait.pp's simulation exactly.

Results are cached per (schedule, p, m, v): the search asks the same few questions many times.
"""
from __future__ import annotations

import functools
import time
import warnings
from typing import Any, NamedTuple

from .layout import SCHEDULES  # the same names plait.pp builds

# Above this many scheduled actions (3*p*m*v) the closed form answers instead of the
# simulator (pure Python, about 20 us per action plus a few ms per schedule), and once a
# process has spent SIMULATION_BUDGET_S simulating, the closed forms answer the rest; they
# equal the simulation for these schedules (tests/test_plan_costs.py), so only the
# reported source changes, and a search stays well under a second.
MAX_SIMULATED_ACTIONS = 600
SIMULATION_BUDGET_S = 0.2
_spent_s = 0.0


class Bubble(NamedTuple):
    """Idle share of the step, peak microbatch-chunks held by the first and last ranks, and who answered."""

    fraction: float
    peak_inflight: int
    source: str  # "simulator" or "closed-form"
    last_inflight: int = 1


def closed_form_bubble(schedule: str, p: int, m: int, v: int = 1) -> Bubble:
    """The table in the module docstring; p=1 has no bubble and holds one microbatch (gpipe: m)."""
    if p == 1:
        held = m if schedule == "gpipe" else 1
        return Bubble(0.0, held, "closed-form", held)
    if schedule in ("gpipe", "1f1b"):
        fraction = (p - 1) / (m + p - 1)
        if schedule == "gpipe":
            return Bubble(fraction, m, "closed-form", m)
        return Bubble(fraction, min(m, p), "closed-form", 1)
    if schedule == "interleaved":
        warm = (p - 1) / v
        return Bubble(warm / (m + warm), min(m * v, v * p + p - 1), "closed-form", min(m * v, (v - 1) * p + 1))
    if schedule == "zb1p":   # v virtual stages shrink the warm-up as in interleaved
        warm = (p - 1) / v
        return Bubble(warm / (3 * m + warm), min(m * v, v * p), "closed-form", min(m, p))
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


def _simulator() -> Any | None:
    """plait.pp.build_schedule when the pipeline package is installed, else None."""
    try:
        from plait.pp import build_schedule
    except ImportError:
        return None
    return build_schedule


def _rank(value: Any, index: int) -> float:
    """Entry `index` (0: first rank, -1: last) of a per-rank sequence or mapping, or the value itself."""
    if isinstance(value, dict):
        return float(value[sorted(value)[index]])
    if isinstance(value, (list, tuple)):
        return float(value[index])
    return float(value)


def _worst(value: Any) -> float:
    """The largest entry of a per-rank sequence or mapping (or the value itself)."""
    if isinstance(value, dict):
        return float(max(value.values()))
    if isinstance(value, (list, tuple)):
        return float(max(value))
    return float(value)


def simulated_bubble(schedule: str, p: int, m: int, v: int = 1) -> Bubble | None:
    """Simulate the schedule with plait.pp (forward 1, backward 2, W 1); None if unavailable or unknown."""
    build = _simulator()
    if build is None:
        return None
    if schedule not in SCHEDULES:
        return None
    try:
        sched = build(schedule, num_stages=p, num_microbatches=m, num_virtual=v)
    except ValueError:  # a combination plait.pp does not build (e.g. interleaved with v=1)
        return None
    sim = sched.simulate(forward=1.0, backward=2.0, weight=1.0 if schedule == "zb1p" else None)
    held = sim.peak_activations
    return Bubble(_worst(sim.bubble_fraction), int(round(_rank(held, 0))), "simulator", int(round(_rank(held, -1))))


@functools.lru_cache(maxsize=4096)
def pipeline_bubble(schedule: str, p: int, m: int, v: int = 1) -> Bubble:
    """Bubble and peak in-flight chunks: simulated when plait.pp is there and the run is small, else closed form."""
    global _spent_s
    if p > 1 and 3 * p * m * v <= MAX_SIMULATED_ACTIONS and _spent_s < SIMULATION_BUDGET_S:
        start = time.perf_counter()
        try:
            simulated = simulated_bubble(schedule, p, m, v)
        except Exception as exc:  # noqa: BLE001 - a simulator bug must not stop planning
            warnings.warn(f"plait.pp's simulator failed for {schedule} p={p} m={m} v={v} ({exc}); "
                          f"using the closed-form bubble", RuntimeWarning, stacklevel=2)
            simulated = None
        _spent_s += time.perf_counter() - start
        if simulated is not None:
            return simulated
    return closed_form_bubble(schedule, p, m, v)
