"""bench/plan_validation.py as a regression guard: the planner stays within the issue's error targets."""
from __future__ import annotations

import statistics

from plait.bench import plan_validation


def test_median_errors_stay_within_targets() -> None:
    rows, errors, independent = plan_validation.run_throughput(rank_splits=False)
    _, memory_errors = plan_validation.run_memory()
    assert len(rows) == len(plan_validation.THROUGHPUT_ROWS) >= 20
    assert statistics.median(errors) <= 0.15
    assert statistics.median(independent) <= 0.15  # rows not used to calibrate any constant
    assert statistics.median(memory_errors) <= 0.10


def test_every_published_layout_fits_the_memory_model() -> None:
    # A published run that our memory model says cannot fit would be a memory-model bug.
    for source, name, gpu, gpus, tp, pp, batch, settings, metric, _ in plan_validation.THROUGHPUT_ROWS:
        _, best = plan_validation._predict(name, gpu, gpus, tp, pp, batch, settings, metric)
        assert best.fits, (source, name)
