"""A layout: how one job is split over the GPUs, and the rules that make it runnable.

``Layout(dp, pp, tp, num_virtual, microbatch_size, schedule, recompute, sequence_parallel)``;
``check_layout`` raises ValueError saying which rule a layout breaks and how to fix it:

    model fits the layout       the runtime's own verdict, ParallelConfig.check_model: heads % tp
                                (KV heads replicated when tp does not divide them), FFN % tp, the
                                last TP rank holds a real vocabulary row, layers >= pp * v, and
                                under sequence parallelism seq % tp
    dp * pp * tp == GPUs        every GPU has exactly one place
    tp <= GPUs per node         tensor parallelism talks on every layer: keep it on NVLink
    layers % (pp * v) == 0      equal stages (unless uneven stages are allowed; plait runs both)
    global batch % dp == 0, per-replica batch % microbatch size == 0
    interleaved: v >= 2, pp >= 2 and microbatches % pp == 0 (Megatron-LM's rule)

The rules after the first are the planner's choices of what to estimate, not limits of the
runtime; the first is the runtime's, so a layout the planner offers is one plait runs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import SCHEDULE_ALIASES, SCHEDULES, ModelShape, ParallelConfig
from .config import RECOMPUTE_MODES, HardwareSpec, JobSpec, ModelSpec


@dataclass(frozen=True)
class Layout:
    """Degrees of data, pipeline and tensor parallelism plus the pipeline's microbatching.

    ``recompute`` and ``sequence_parallel`` left None follow the job (``JobSpec``).
    For inference ``microbatch_size`` and ``schedule`` are unused.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    num_virtual: int = 1
    microbatch_size: int = 1
    schedule: str = "1f1b"
    recompute: str | None = None
    sequence_parallel: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.microbatch_size, int) or self.microbatch_size < 1:
            raise ValueError(f"layout: microbatch_size={self.microbatch_size!r} must be a positive int")
        try:   # the layout rules (sizes, schedule, virtual stages) have one owner: ParallelConfig
            config = self.parallel_config()
        except ValueError as err:
            raise ValueError(f"layout: {err}") from None
        object.__setattr__(self, "schedule", config.schedule)  # frozen; canonical name (aliases resolved)
        if self.recompute is not None and self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"layout: unknown recompute {self.recompute!r}; use one of {RECOMPUTE_MODES}")

    def parallel_config(self) -> ParallelConfig:
        """This layout as the ParallelConfig that init_mesh, parallelize and plait train take."""
        return ParallelConfig(dp=self.dp, pp=self.pp, tp=self.tp, num_virtual=self.num_virtual,
                              schedule=self.schedule, sequence_parallel=bool(self.sequence_parallel))

    @property
    def num_gpus(self) -> int:
        return self.dp * self.pp * self.tp

    def short(self) -> str:
        """Compact text such as 'dp8 pp4 tp8 v2 mbs1 interleaved'."""
        v = f" v{self.num_virtual}" if self.num_virtual > 1 else ""
        return f"dp{self.dp} pp{self.pp} tp{self.tp}{v} mbs{self.microbatch_size} {self.schedule}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def num_microbatches(job: JobSpec, layout: Layout) -> int:
    """Microbatches per replica per step (training); 1 for inference."""
    if not job.training:
        return 1
    return job.global_batch // (layout.dp * layout.microbatch_size)


def layers_per_stage(model: ModelSpec, layout: Layout) -> int:
    """Layers on the most loaded pipeline rank (all its virtual chunks together)."""
    chunks = layout.pp * layout.num_virtual
    return math.ceil(model.num_layers / chunks) * layout.num_virtual


def resolve_sp(job: JobSpec, layout: Layout, model: ModelSpec) -> bool:
    """Sequence parallelism: the layout's choice, else the job's, else on whenever tp > 1 and divides the
    sequence length (an explicit choice the sequence does not allow is refused by ``check_layout``)."""
    for choice in (layout.sequence_parallel, job.sequence_parallel):
        if choice is not None:
            return bool(choice) and layout.tp > 1
    return layout.tp > 1 and model.seq_len % layout.tp == 0


@functools.lru_cache(maxsize=4096)
def _misfit(shape: ModelShape, dp: int, pp: int, tp: int, num_virtual: int, schedule: str, sp: bool) -> str | None:
    """The runtime's verdict, remembered: a search judges many layouts that differ only in microbatching."""
    return ParallelConfig(dp=dp, pp=pp, tp=tp, num_virtual=num_virtual, schedule=schedule,
                          sequence_parallel=sp).misfit(shape)


def misfit(model: ModelSpec, job: JobSpec, layout: Layout) -> str | None:
    """Why the runtime cannot run `model` on `layout` (:meth:`ParallelConfig.misfit`), or None."""
    sp = job.training and resolve_sp(job, layout, model)
    return _misfit(model.shape(), layout.dp, layout.pp, layout.tp, layout.num_virtual, layout.schedule, sp)


def check_layout(model: ModelSpec, cluster: HardwareSpec, job: JobSpec, layout: Layout,
                 allow_uneven: bool = False) -> None:
    """Raise ValueError with the first rule `layout` breaks (see the module docstring)."""
    where = f"layout {layout.short()}"
    if layout.num_gpus != cluster.num_gpus:
        raise ValueError(f"{where}: dp*pp*tp = {layout.num_gpus} but the cluster has {cluster.num_gpus} GPUs")
    if layout.tp > cluster.gpus_per_node:
        raise ValueError(f"{where}: tp={layout.tp} spans nodes of {cluster.gpus_per_node} GPUs; "
                         f"keep tp <= {cluster.gpus_per_node} and use pp or dp for the rest")
    reason = misfit(model, job, layout)
    if reason:
        raise ValueError(f"{where}: {reason}")
    chunks = layout.pp * layout.num_virtual
    if model.num_layers % chunks and not allow_uneven:
        raise ValueError(f"{where}: num_layers={model.num_layers} is not divisible by pp*v = {chunks}; "
                         f"choose pp and v that divide it, or allow uneven stages")
    if layout.schedule == "interleaved" and (layout.num_virtual < 2 or layout.pp < 2):
        raise ValueError(f"{where}: the interleaved schedule needs pp >= 2 and num_virtual >= 2")
    if layout.pp == 1 and layout.schedule not in ("1f1b", "gpipe"):
        raise ValueError(f"{where}: schedule {layout.schedule!r} needs pp >= 2")
    if job.training:
        _check_batch(job, layout, where)
    elif job.batch % layout.dp:
        raise ValueError(f"{where}: batch={job.batch} requests do not split over dp={layout.dp} replicas")


def _check_batch(job: JobSpec, layout: Layout, where: str) -> None:
    if job.global_batch % layout.dp:
        raise ValueError(f"{where}: global_batch={job.global_batch} is not divisible by dp={layout.dp}")
    per_replica = job.global_batch // layout.dp
    if per_replica % layout.microbatch_size:
        raise ValueError(f"{where}: the per-replica batch {per_replica} is not divisible by "
                         f"microbatch_size={layout.microbatch_size}")
    m = per_replica // layout.microbatch_size
    if layout.schedule == "interleaved" and m % layout.pp:
        raise ValueError(f"{where}: the interleaved schedule needs microbatches ({m}) divisible by pp={layout.pp}")
