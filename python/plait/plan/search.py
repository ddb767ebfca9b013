"""Search: every valid layout, estimated, filtered by memory (and latency target), ranked, explained.

Enumerated (``candidate_layouts``): tp over divisors of the GPU count that fit in a node
and that the model's dimensions take (the runtime's own verdict, ``ParallelConfig.misfit``:
heads and FFN divisible by tp, KV heads split or replicated, a real vocabulary row on every
rank); pp over divisors of the rest that divide the layers (unless uneven stages are
allowed); dp for the rest; microbatch sizes dividing the per-replica
batch (up to ``max_microbatch_size``); schedules 1F1B, ZB-H1 and interleaved 1F1B with
every v >= 2 that divides the layers per rank (GPipe is left out: same bubble as 1F1B,
more memory); recomputation none / selective / full unless the job fixes it.

Objectives: ``throughput`` (training: tokens/s; inference: requests/s within the latency
target), ``latency`` (training: step time, which for a fixed global batch ranks as
throughput does; inference: time per output token, then time to first token), ``memory``
(least memory per GPU, then throughput).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import ParallelConfig
from .config import RECOMPUTE_MODES, HardwareSpec, JobSpec, ModelSpec
from .estimate import Estimate, capacity_gb, estimate
from .explain import explain
from .layout import Layout
from .memory import GB, OPTIMIZER_BYTES, WEIGHT_BYTES, grad_bytes, value_bytes

OBJECTIVES = ("throughput", "latency", "memory")


@dataclass
class Plan:
    """Ranked layouts that fit (best first), the words explaining the winner, and what was discarded."""

    objective: str
    estimates: list[Estimate]
    explanation: str
    considered: int
    discarded: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def best(self) -> Estimate:
        return self.estimates[0]

    def as_dict(self, top: int | None = None) -> dict[str, Any]:
        return {"objective": self.objective, "considered": self.considered, "discarded": self.discarded,
                "elapsed_s": self.elapsed_s, "explanation": self.explanation,
                "layouts": [e.as_dict() for e in self.estimates[:top]]}


MAX_CANDIDATES = 200_000  # layouts one search may estimate (about 30 s on one core)


def _prime_factors(n: int) -> dict[int, int]:
    """{prime: exponent} of n >= 1, by trial division up to sqrt(n) (fast for n < 2**40)."""
    factors: dict[int, int] = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        factors[n] = factors.get(n, 0) + 1
    return factors


def divisors(n: int, limit: int | None = None) -> list[int]:
    """The divisors of n >= 1 up to `limit` (default n), ascending, built from n's factorization:
    a number of GPUs such as 10**9 has 100 divisors, not 10**9 candidates to try one by one."""
    if n < 1:
        raise ValueError(f"divisors: n={n} must be >= 1")
    limit = n if limit is None else limit
    found = [1]
    for prime, exponent in _prime_factors(n).items():
        found = [d * prime ** e for d in found for e in range(exponent + 1) if d * prime ** e <= limit]
    return sorted(d for d in found if d <= limit)


def _tp_fits(model: ModelSpec, job: JobSpec, tp: int) -> bool:
    """Whether the model's dimensions take this tp, by the runtime's verdict (sequence parallelism counts
    only when the job asks for it: left to "auto" it is simply off where tp does not divide the sequence)."""
    config = ParallelConfig(tp=tp, sequence_parallel=bool(job.training and job.sequence_parallel))
    return config.misfit(model.shape()) is None


def _schedules(model: ModelSpec, pp: int, m: int) -> Iterator[tuple[str, int]]:
    if pp == 1:
        yield "1f1b", 1
        return
    yield "1f1b", 1
    yield "zb1p", 1
    if m % pp == 0:
        per_rank = model.num_layers // pp
        for v in range(2, min(per_rank, 8) + 1):
            if per_rank % v == 0:
                yield "interleaved", v


def recompute_modes(job: JobSpec) -> tuple[str, ...]:
    """Modes worth trying: the job's, or all three; with flash attention "selective" costs and
    saves exactly what "none" does (the kernel keeps no scores), so it is not tried twice."""
    if job.recompute != "auto":
        return (job.recompute,)
    return ("none", "full") if job.flash_attention else RECOMPUTE_MODES


def _candidates(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, allow_uneven: bool,
                max_microbatch_size: int) -> Iterator[Layout]:
    n = cluster.num_gpus
    recomputes = recompute_modes(job)
    for tp in divisors(n, cluster.gpus_per_node):
        if not _tp_fits(model, job, tp):
            continue
        for pp in divisors(n // tp, model.num_layers):
            if model.num_layers % pp and not allow_uneven:
                continue
            dp = n // (tp * pp)
            if not job.training:
                if job.batch % dp == 0:
                    yield Layout(dp, pp, tp)
                continue
            if job.global_batch % dp:
                continue
            per_replica = job.global_batch // dp
            for mbs in (d for d in range(1, min(per_replica, max_microbatch_size) + 1) if per_replica % d == 0):
                for schedule, v in _schedules(model, pp, per_replica // mbs):
                    yield from (Layout(dp, pp, tp, v, mbs, schedule, r) for r in recomputes)


def candidate_layouts(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, allow_uneven: bool = False,
                      max_microbatch_size: int = 16, limit: int = MAX_CANDIDATES) -> list[Layout]:
    """Every layout the rules allow (see the module docstring), recomputation included.

    Raises ValueError when there are more than `limit`, so that no input makes a search unbounded.
    """
    out = []
    for layout in _candidates(model, cluster, job, allow_uneven, max_microbatch_size):
        if len(out) == limit:
            raise ValueError(f"more than {limit:,} layouts of {model.name} on {cluster.num_gpus} GPUs to search; "
                             f"give a layout (--tp, --pp, ...) to estimate it instead, fix --recompute, or use "
                             f"fewer GPUs")
        out.append(layout)
    return out


def rank_key(objective: str, est: Estimate) -> tuple[float, ...]:
    """Sort key, smaller is better, for `objective`."""
    speed = -(est.requests_per_s if est.mode == "inference" else est.tokens_per_s)
    if objective == "memory":
        return est.memory_gb, speed
    if objective == "latency":
        return (est.tpot_s, est.ttft_s, speed) if est.mode == "inference" else (est.step_time_s, est.memory_gb)
    return speed, est.memory_gb


def check_model_fits_cluster(model: ModelSpec, cluster: HardwareSpec, job: JobSpec) -> None:
    """ValueError when the weights (and, training, gradients and optimizer states) exceed all GPUs together."""
    per_param = (WEIGHT_BYTES + grad_bytes(job) + OPTIMIZER_BYTES) if job.training else value_bytes(job)
    need = model.num_params() * per_param / GB
    have = cluster.num_gpus * capacity_gb(cluster, job)
    if need > have:
        what = "weights, gradients and optimizer states" if job.training else "weights"
        raise ValueError(f"{model.name} ({model.num_params() / 1e9:.1f}B parameters) needs {need:,.0f} GB for its "
                         f"{what}, but {cluster.num_gpus} x {cluster.gpu.name} hold {have:,.0f} GB usable; "
                         f"use at least {int(need / capacity_gb(cluster, job)) + 1} GPUs")


def search(*, model: ModelSpec, cluster: HardwareSpec, job: JobSpec, objective: str = "throughput",
           allow_uneven: bool = False, max_microbatch_size: int = 16,
           progress: Callable[[int, int], None] | None = None) -> Plan:
    """Estimate every candidate layout, keep those that fit, rank them by `objective` and explain the winner.

    Raises ValueError for an unknown objective, a model larger than the cluster, or when no
    layout fits (the message names the closest miss). `progress(done, total)` is called
    about every 1% of the candidates.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    start = time.perf_counter()
    check_model_fits_cluster(model, cluster, job)
    candidates = candidate_layouts(model, cluster, job, allow_uneven, max_microbatch_size)
    if not candidates:
        raise ValueError(f"no valid layout of {model.name} on {cluster.num_gpus} GPUs: check that the GPU count, "
                         f"heads ({model.num_heads}), layers ({model.num_layers}) and batch share divisors")
    kept, discarded, closest = [], {"memory": 0, "latency_target": 0}, None
    step = max(1, len(candidates) // 100)
    for i, layout in enumerate(candidates):
        est = estimate(model=model, cluster=cluster, job=job, layout=layout, allow_uneven=allow_uneven)
        if not est.fits:
            discarded["memory"] += 1
            if closest is None or (not closest.fits and est.memory_gb < closest.memory_gb):
                closest = est
        elif not est.meets_target:
            discarded["latency_target"] += 1
            if closest is None or closest.fits is False or est.tpot_s < closest.tpot_s:
                closest = est
        else:
            kept.append(est)
        if progress is not None and (i + 1) % step == 0:
            progress(i + 1, len(candidates))
    if not kept:
        hint = "" if allow_uneven else "; or allow uneven stages (--allow-uneven) for more pipeline depths"
        raise ValueError(_nothing_fits(closest, job) + hint)
    kept.sort(key=lambda e: rank_key(objective, e))
    return Plan(objective, kept, explain(kept, objective), len(candidates), discarded,
                time.perf_counter() - start)


def _nothing_fits(closest: Estimate, job: JobSpec) -> str:
    if closest.fits:
        return (f"no layout meets the latency target of {job.latency_target_ms} ms per token; the fastest, "
                f"{closest.layout.short()}, takes {closest.tpot_s * 1e3:.1f} ms: relax the target or add GPUs")
    return (f"no layout fits in GPU memory: the smallest, {closest.layout.short()} with {closest.recompute} "
            f"recomputation, needs {closest.memory_gb:.1f} GB per GPU of {closest.memory_capacity_gb:.1f} GB usable "
            f"({', '.join(f'{k} {v:.1f}' for k, v in closest.memory.as_dict().items() if v and k != 'total')}); "
            f"add GPUs, raise the ZeRO stage, or lower the batch/sequence")
