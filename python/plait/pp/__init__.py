"""plait.pp: pipeline parallelism -- schedule IR, generators, validator, simulator, engine.

    sched = plait.pp.build_schedule("1f1b", num_stages=4, num_microbatches=8)
    sched.validate()                       # raises with a step x rank grid on error
    sim = sched.simulate(forward=1.0, backward=2.0, weight=1.0)
    sim.bubble_fraction, sim.peak_activations
    engine = plait.PipelineEngine(stage_modules, mesh, schedule="1f1b", num_microbatches=8, loss_fn=fn)

Modules, one job each: ``actions`` (the IR's atoms), ``schedule`` (the Schedule type),
``schedules`` (generators), ``schedule_io`` (text/CSV), ``graph`` (dependencies),
``lowering`` (adds communication), ``validate``, ``simulate``, ``split_backward`` (I/W),
``p2p`` (transport), ``runner`` (one step), ``engine`` (PipelineEngine), ``timeline``.
"""
from __future__ import annotations

import importlib
from typing import Any

from .actions import Action, Kind, parse_action
from .schedule import Schedule
from .schedule_io import load_schedule, parse_schedule
from .schedules import SCHEDULES, build_schedule
from .simulate import SimResult, simulate
from .validate import ScheduleError

# The schedule tools above need no torch; the engine and timeline do, so they load on first use
# (``plait plan`` simulates schedules without paying for ``import torch``).
_LAZY_NAMES = {"PipelineEngine": "engine", "Event": "timeline", "chrome_trace": "timeline",
               "gantt_png": "timeline", "measured_bubble": "timeline"}

__all__ = ["Action", "Kind", "parse_action", "Schedule", "build_schedule", "SCHEDULES", "parse_schedule",
           "load_schedule", "simulate", "SimResult", "ScheduleError", "PipelineEngine", "Event", "chrome_trace",
           "gantt_png", "measured_bubble"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module 'plait.pp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value
