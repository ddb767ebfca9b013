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
from .actions import Action, Kind, parse_action
from .engine import PipelineEngine
from .schedule import Schedule
from .schedule_io import load_schedule, parse_schedule
from .schedules import SCHEDULES, build_schedule
from .simulate import SimResult, simulate
from .timeline import Event, chrome_trace, gantt_png, measured_bubble
from .validate import ScheduleError

__all__ = ["Action", "Kind", "parse_action", "Schedule", "build_schedule", "SCHEDULES", "parse_schedule",
           "load_schedule", "simulate", "SimResult", "ScheduleError", "PipelineEngine", "Event", "chrome_trace",
           "gantt_png", "measured_bubble"]
